"""What the plugin entry points cannot reach in upstream vLLM: one table, one mechanism.

Every change to an upstream object is a ``Patch`` in ``patches.table.PATCHES``: the
upstream module and attribute, what upstream does, why we change it and when the
patch can go. This module applies them: each as soon as its module has been
imported, by wrapping the target with the patch's ``wrap`` (patches without one are
applied by their owner at run time, e.g. the scheduler's per-step short cut, and are
only checked here).

The patches are written against one vLLM release, ``PINNED_VLLM``. Another installed
release, a target that is gone, or one whose parameters changed is an error at
start-up naming the patch and the vLLM version, never a silent no-op. README.md,
"Moving to a new vLLM", says how to move the pin.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)



def _pinned(package: str) -> str:
    """The version our own distribution requires of ``package`` (``==``).

    The pin is written once, in requirements/common.txt; setup.py puts it into the
    installed metadata, which this reads.
    """
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        lines = requires("vllm-neuronx") or []
    except PackageNotFoundError:
        lines = []
    for line in lines:
        req = Requirement(line)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if req.name == package and pins:
            return pins[0]
    raise RuntimeError(f"vllm-neuronx's {package} pin is not in its installed metadata; "
                       "install the project (scripts/setup.sh, or pip install -e .)")


PINNED_VLLM = _pinned("vllm")
PATCHED = "__neuronx_patched__"
_hooked: set[str] = set()  # modules whose import hook is installed


class PatchError(RuntimeError):
    """An upstream target a patch needs is not what the patch was written against."""


@dataclass(frozen=True, slots=True)
class Patch:
    name: str  # short handle, used in errors and the README table
    module: str  # the upstream module holding the target
    attribute: str  # the target in that module: "function" or "Class.method"
    upstream: str  # what upstream does there
    why: str  # why we change it
    until: str  # when the patch can go
    # original -> replacement; None when the owner named in ``why`` applies it at run time.
    wrap: Callable[[Callable], Callable] | None = None
    # Parameters the patch relies on, checked against the target's signature.
    params: tuple[str, ...] = ()
    # Parameters the target must not have (upstream taking them over would clash).
    absent: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attribute}"


def installed_vllm() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def check_version() -> None:
    installed = installed_vllm()
    if installed != PINNED_VLLM:
        from vllm_neuronx.patches.table import PATCHES

        raise PatchError(
            f"vllm-neuronx's {len(PATCHES)} patches of upstream vLLM were written against vLLM "
            f"{PINNED_VLLM}, but vLLM {installed} is installed; install vllm=={PINNED_VLLM} "
            "(scripts/setup.sh), or move the pin as README.md's 'Moving to a new vLLM' says"
        )


def resolve(patch: Patch, module=None) -> tuple[object, str, Callable]:
    """(owner, attribute name, target) of a patch, checked; PatchError if it does not fit."""
    if module is None:
        module = importlib.import_module(patch.module)
    *path, name = patch.attribute.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part, None)
    target = getattr(owner, name, None) if owner is not None else None
    if target is None:
        _fail(patch, "is missing")
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    missing = [p for p in patch.params if p not in params]
    clashing = [p for p in patch.absent if p in params]
    if missing:
        _fail(patch, f"has no parameter {', '.join(missing)}: its signature changed")
    if clashing:
        _fail(patch, f"now has the parameter {', '.join(clashing)} this patch adds")
    return owner, name, target


def _fail(patch: Patch, problem: str) -> None:
    raise PatchError(
        f"vllm-neuronx patch '{patch.name}': upstream {patch.target} {problem} in vLLM "
        f"{installed_vllm()} (the patch was written for {PINNED_VLLM})"
    )


def wrap(owner, name: str, make_wrapper: Callable[[Callable], Callable], tag: str) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)``, once per ``tag``.

    Idempotent because vLLM loads plugins once per process but our hooks may fire
    twice; two patches may wrap the same function (``run_server_worker``), each once.
    A staticmethod or classmethod is wrapped as its function and set back as the same
    kind.
    """
    original = getattr(owner, name)
    raw = inspect.getattr_static(owner, name, None) if isinstance(owner, type) else None
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    if kind is not None:
        original = raw.__func__
    done = getattr(original, PATCHED, frozenset())
    if tag in done:
        return
    wrapped = functools.wraps(original)(make_wrapper(original))
    setattr(wrapped, PATCHED, done | {tag})
    setattr(owner, name, wrapped if kind is None else kind(wrapped))


def _apply_module(name: str, module=None) -> None:
    from vllm_neuronx.patches.table import PATCHES

    module = module or sys.modules[name]
    for patch in PATCHES:
        if patch.module == name:
            owner, attr, _ = resolve(patch, module)
            if patch.wrap is not None:
                wrap(owner, attr, patch.wrap, patch.name)


def apply_all() -> None:
    """Check the vLLM version, then patch each target module as soon as it is imported.

    Safe to call again (vLLM loads plugins once per process, we are called from both
    hooks): a module imported since the last call, whose import hook may not have fired
    yet, is patched now; nothing is patched twice.
    """
    check_version()
    from vllm_neuronx.patches.table import PATCHES

    for name in dict.fromkeys(p.module for p in PATCHES if p.wrap is not None):
        if _imported(name):
            _apply_module(name)
        elif name not in _hooked:
            _hooked.add(name)
            after_import(name, functools.partial(_apply_module, name))


def apply_to_main() -> None:
    """Patch ``__main__`` when it is a target module run with ``python -m``.

    The user guide's ``python -m vllm.entrypoints.openai.api_server`` runs that module as
    ``__main__``: its functions call each other there, not in the imported module the
    import hook patches. Our CLI flags are added (``engine_args.cli_args``) while its main
    block builds the parser, after every function is defined: that is when this runs.
    """
    from vllm_neuronx.patches.table import PATCHES

    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name in {p.module for p in PATCHES if p.wrap is not None}:
        _apply_module(name, main)


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
    if _imported(name):
        callback()
    else:
        sys.meta_path.insert(0, _PatchOnImport(name, callback))
