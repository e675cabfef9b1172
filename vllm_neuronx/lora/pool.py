"""The worker's host pool of adapters: up to ``max_cpu_loras`` prepared, least recently used
evicted first, pinned ones kept, and none dropped while a request uses it.

An adapter enters the pool by ``add`` (vLLM's ``add_lora``: ``--lora-modules``, the server's
``/v1/load_lora_adapter``, ``llm.llm_engine.add_lora``) or by ``acquire``, when the runner
admits a request naming an adapter the pool does not hold (offline ``LoRARequest``s are
never added first; an evicted adapter comes back the same way, its path is in the
request). Entering, it is checked (``peft.inspect``) and handed to the backend
(``prepare_adapter``); leaving, the backend lets it go (``release_adapter``).

The pool holds one adapter per id: the same id with another folder replaces it, and
``load_inplace`` reads its folder again. A replaced or removed adapter still used by
running requests stays with them (their KV lines are bound to it) and goes when the last
one finishes; until then it is another adapter than the new load, for the scheduler too
(``admission.replaced``), so both count against max_loras.

Capacity: the scheduler runs at most ``max_loras <= max_cpu_loras`` adapters at once, so
the pool can always make room for an admitted request's adapter unless pins hold the
slots; then it goes over ``max_cpu_loras`` until a slot frees (like upstream vLLM), rather
than fail a request it already admitted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from vllm_neuronx.log import get_logger
from vllm_neuronx.lora import admission, peft

logger = get_logger(__name__)

# How many ids the pool remembers the request of after their adapter left it (so that
# pin_lora can bring an evicted adapter back).
_REMEMBERED = 1024


def _key(lora_request) -> tuple[int, str]:
    return (lora_request.lora_int_id, lora_request.lora_path)


@dataclass(slots=True, eq=False)
class _Entry:
    request: object  # the LoRARequest it was loaded from
    spec: peft.AdapterSpec
    handle: object  # the backend's (prepare_adapter)
    users: int = 0  # running requests bound to it
    pinned: bool = False
    retired: bool = False  # replaced or removed while in use: goes with its last user


class AdapterPool:
    def __init__(self, backend, lora_config, dims: peft.ModelDims) -> None:
        self.backend = backend
        self.capacity = lora_config.max_cpu_loras or lora_config.max_loras
        self.max_lora_rank = lora_config.max_lora_rank
        self.dims = dims
        self._entries: OrderedDict[tuple[int, str], _Entry] = OrderedDict()  # LRU first
        self._users: dict[str, _Entry] = {}
        self._seen: OrderedDict[int, object] = OrderedDict()  # id -> its last request

    # -- vLLM's worker methods (add_lora, remove_lora, pin_lora, list_loras) ----------
    def add(self, lora_request) -> bool:
        """Check and prepare the adapter (or touch it, if held); True once it is held.
        ``load_inplace`` reads its folder again. An AdapterError names a bad adapter."""
        key = _key(lora_request)
        entry = self._entries.get(key)
        self._remember(lora_request)
        if entry is not None and not lora_request.load_inplace:
            self._entries.move_to_end(key)
            return True
        pinned = sum(e.pinned for e in self._entries.values())
        if entry is None and pinned >= self.capacity:
            raise ValueError(
                f"cannot load LoRA adapter '{lora_request.lora_name}': all {self.capacity} "
                "host adapter slots (max_cpu_loras) are pinned")
        new = self._load(lora_request)  # a bad adapter fails before anything is dropped
        if entry is not None:
            new.pinned = entry.pinned
            self._retire(key, self._entries.pop(key))
        self._enter(key, new)
        return True

    def remove(self, lora_id: int) -> bool:
        """Drop the adapter with this id (once its running requests finish); False if the
        pool does not hold it."""
        self._seen.pop(lora_id, None)
        found = [k for k in self._entries if k[0] == lora_id]
        for key in found:
            self._retire(key, self._entries.pop(key))
        return bool(found)

    def pin(self, lora_id: int) -> bool:
        """Keep this adapter in the pool until it is removed; an adapter evicted since a
        request used it is loaded again. False if the id is unknown."""
        entry = self._current(lora_id)
        if entry is None:
            request = self._seen.get(lora_id)
            if request is None:
                return False
            self.add(request)
            entry = self._current(lora_id)
        if not entry.pinned:
            pinned = sum(e.pinned for e in self._entries.values())
            if pinned >= self.capacity:
                raise ValueError(
                    f"cannot pin LoRA adapter {lora_id}: all {self.capacity} host adapter "
                    "slots (max_cpu_loras) are pinned already")
            entry.pinned = True
        return True

    def list(self) -> set[int]:
        """The ids of the adapters the pool holds."""
        return {lora_id for lora_id, _ in self._entries}

    # -- the runner -----------------------------------------------------------------
    def acquire(self, req_id: str, lora_request) -> object | None:
        """The backend handle of a newly admitted request's adapter (None: the base model),
        loading it if the pool does not hold it; the request uses it until ``release``."""
        if lora_request is None:
            return None
        if req_id in self._users:
            raise RuntimeError(f"request {req_id} acquired an adapter twice")
        key = _key(lora_request)
        self._remember(lora_request)
        entry = self._entries.get(key)
        if entry is None:
            try:
                entry = self._load(lora_request)
            except Exception as e:
                # The front end checked it when the request arrived: its folder changed since.
                raise RuntimeError(f"{e} (the adapter passed its check when the request "
                                   "arrived; its folder changed since)") from e
            self._enter(key, entry)
        else:
            self._entries.move_to_end(key)
        entry.users += 1
        self._users[req_id] = entry
        return entry.handle

    def release(self, req_id: str) -> None:
        """The request finished or was aborted: its adapter may leave the pool now."""
        entry = self._users.pop(req_id, None)
        if entry is None:
            return
        entry.users -= 1
        if entry.users == 0:
            if entry.retired:
                self.backend.release_adapter(entry.handle)
            else:
                self._trim()

    # -- inside -------------------------------------------------------------------------
    def _load(self, lora_request) -> _Entry:
        spec = peft.inspect(lora_request.lora_name, lora_request.lora_path, self.dims,
                            self.max_lora_rank)
        return _Entry(lora_request, spec, self.backend.prepare_adapter(spec))

    def _enter(self, key: tuple[int, str], entry: _Entry) -> None:
        """Hold ``entry`` as the adapter of its id (another folder under that id goes) and
        evict down to capacity, never ``entry`` itself."""
        for other in [k for k in self._entries if k[0] == key[0] and k != key]:
            self._retire(other, self._entries.pop(other))
        self._entries[key] = entry
        self._trim(keep=key)

    def _retire(self, key: tuple[int, str], entry: _Entry) -> None:
        """``entry`` leaves the pool: now, or with its last running request (a new load
        under its id and folder is then another adapter for the scheduler)."""
        if entry.users:
            entry.retired = True
            admission.replaced(*key)
        else:
            self.backend.release_adapter(entry.handle)

    def _trim(self, keep: tuple[int, str] | None = None) -> None:
        """Evict least recently used adapters that are neither pinned nor in use while the
        pool holds more than ``capacity``."""
        while len(self._entries) > self.capacity:
            victim = next((k for k, e in self._entries.items()
                           if k != keep and not e.users and not e.pinned), None)
            if victim is None:
                logger.debug("LoRA host pool over max_cpu_loras=%d: every other adapter is "
                              "pinned or in use", self.capacity)
                return
            self.backend.release_adapter(self._entries.pop(victim).handle)

    def _current(self, lora_id: int) -> _Entry | None:
        return next((e for (i, _), e in self._entries.items() if i == lora_id), None)

    def _remember(self, lora_request) -> None:
        self._seen[lora_request.lora_int_id] = lora_request
        self._seen.move_to_end(lora_request.lora_int_id)
        while len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)
