"""What the plugin entry points cannot reach in upstream vLLM, patched in one place.

Every patch names what it changes and why, and applies only to the vLLM version
it was written against: on another version it logs an error and stays out.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import sys
from collections.abc import Callable

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

PINNED_VLLM = "0.33.0"
ARG_UTILS = "vllm.engine.arg_utils"
PATCHED = "__neuronx_patched__"
_applied = False


def vllm_version_matches() -> bool:
    import vllm

    return vllm.__version__.split("+")[0] == PINNED_VLLM


def apply_all() -> None:
    """Idempotent: vLLM loads plugins once per process, we may be called from both hooks."""
    global _applied
    if _applied:
        if _imported(ARG_UTILS):  # the import hook may not have fired yet
            from vllm_neuronx.patches import engine_args

            engine_args.apply()
        return
    _applied = True
    if not vllm_version_matches():
        import vllm

        logger.error(
            "vllm-neuronx patches target vLLM %s but %s is installed; device= and "
            "override_neuron_config are unavailable",
            PINNED_VLLM,
            vllm.__version__,
        )
        return
    from vllm_neuronx.patches import best_of, engine_args, engine_death, max_tokens

    after_import(ARG_UTILS, engine_args.apply)
    for name in max_tokens.USERS:
        after_import(name, functools.partial(_patch_named, name, max_tokens.patch_module))
    for name, patch in engine_death.PATCHES.items():
        after_import(name, functools.partial(_patch_named, name, patch))
    for name, patch in best_of.PATCHES.items():
        after_import(name, functools.partial(_patch_named, name, patch))
    from vllm_neuronx.patches import drain, queue_bound, startup_signal

    for name, patch in (
        *drain.PATCHES.items(),
        (queue_bound.ASYNC_LLM, queue_bound.patch_module),
        (startup_signal.WORKER, startup_signal.patch_module),
    ):
        after_import(name, functools.partial(_patch_named, name, patch))


def wrap_once(owner, name: str, make_wrapper: Callable[[Callable], Callable]) -> bool:
    """Replace ``owner.name`` by ``make_wrapper(original)``, once per patch module.

    Idempotent because vLLM loads plugins once per process but our hooks may fire
    twice. The wrapper gets ``functools.wraps(original)`` and a marker naming the
    patch module (``make_wrapper.__module__``), so two patches may wrap the same
    function (``run_server_worker``: engine_death and startup_signal) and each
    still applies once. A staticmethod or classmethod is wrapped as its function
    and set back as the same kind. False when there is nothing to wrap or it is
    already wrapped.
    """
    original = getattr(owner, name, None)
    if original is None:
        return False
    raw = inspect.getattr_static(owner, name, None) if isinstance(owner, type) else None
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    if kind is not None:
        original = raw.__func__
    done = getattr(original, PATCHED, frozenset())
    if make_wrapper.__module__ in done:
        return False
    wrapped = functools.wraps(original)(make_wrapper(original))
    setattr(wrapped, PATCHED, done | {make_wrapper.__module__})
    setattr(owner, name, wrapped if kind is None else kind(wrapped))
    return True


def _patch_named(name: str, patch: Callable) -> None:
    patch(sys.modules[name])


class _RunAfterExec(importlib.abc.Loader):
    def __init__(self, loader, callback: Callable[[], None]) -> None:
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._callback()


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs a patch as soon as a module has finished importing.

    The platform plugin is resolved while vLLM is still importing (sometimes in
    the middle of ``vllm.engine.arg_utils`` itself), so the patch cannot run then.
    Either the module's own import is wrapped, or, if it is already under way,
    the next import anywhere finds it complete and runs the patch.
    """

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def _done(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback()

    def find_spec(self, fullname, path, target=None):
        if _imported(self.name):
            self._done()
            return None
        if fullname != self.name or fullname in sys.modules:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfterExec(spec.loader, self.callback)
        return spec


def _imported(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` now if ``name`` is imported, else right after it is."""
    if (
        name in sys.modules
        and getattr(sys.modules[name], "__spec__", None) is not None
        and not getattr(sys.modules[name].__spec__, "_initializing", False)
    ):
        callback()
    else:
        sys.meta_path.insert(0, _PatchOnImport(name, callback))
