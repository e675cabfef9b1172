"""The worker's host pool of adapters (vllm_neuronx/lora/pool.py), pure: a fake backend
records what it prepares and releases, a fake check stands in for peft.inspect.
max_cpu_loras adapters at most, least recently used evicted first, never one a running
request uses or one pinned; an adapter replaced (same id, another folder; load_inplace)
or removed while in use stays with its running requests, and is another adapter than the
new load for the scheduler (lora.admission.adapter_key)."""

from __future__ import annotations

import types

import pytest
from vllm.lora.request import LoRARequest

from vllm_neuronx.lora import admission
from vllm_neuronx.lora import pool as pool_module
from vllm_neuronx.lora.peft import AdapterError
from vllm_neuronx.lora.pool import AdapterPool


class Handle:
    def __init__(self, name: str, path: str, n: int) -> None:
        self.name, self.path, self.n = name, path, n


class FakeBackend:
    def __init__(self) -> None:
        self.live: list[object] = []
        self.prepared = 0

    def prepare_adapter(self, spec):
        self.prepared += 1
        handle = Handle(spec.name, spec.path, self.prepared)
        self.live.append(handle)
        return handle

    def release_adapter(self, handle) -> None:
        self.live.remove(handle)  # fails on a double release

    def names(self) -> list[str]:
        return sorted(h.name for h in self.live)


@pytest.fixture
def backend(monkeypatch) -> FakeBackend:
    def inspect(name, path, dims, max_lora_rank):
        if "bad" in path:
            raise AdapterError(name, path, "No adapter found for " + path)
        return types.SimpleNamespace(name=name, path=path)

    monkeypatch.setattr(pool_module.peft, "inspect", inspect)
    return FakeBackend()


def make_pool(backend, max_cpu_loras: int = 2, max_loras: int = 2) -> AdapterPool:
    config = types.SimpleNamespace(max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                                   max_lora_rank=8)
    return AdapterPool(backend, config, dims=None)


def req(name: str, lora_id: int, path: str | None = None, **kw) -> LoRARequest:
    return LoRARequest(name, lora_id, path or f"/adapters/{name}", **kw)


def test_least_recently_used_goes_first(backend):
    pool = make_pool(backend)
    assert pool.add(req("a", 1)) and pool.add(req("b", 2))
    pool.add(req("a", 1))  # touched: b is now the oldest
    pool.add(req("c", 3))
    assert pool.list() == {1, 3} and backend.names() == ["a", "c"]
    prepared = backend.prepared
    pool.add(req("a", 1))  # held: no second load
    assert backend.prepared == prepared


def test_an_adapter_in_use_is_never_evicted_and_the_pool_trims_after(backend):
    pool = make_pool(backend)
    ha = pool.acquire("r1", req("a", 1))
    hb = pool.acquire("r2", req("b", 2))
    assert pool.acquire("r3", req("a", 1)) is ha  # one handle per adapter
    hc = pool.acquire("r4", req("c", 3))  # every other slot in use: over capacity, for now
    assert {ha, hb, hc} <= set(backend.live) and len(pool.list()) == 3
    pool.release("r2")
    assert pool.list() == {1, 3} and backend.names() == ["a", "c"]
    for r in ("r1", "r3", "r4", "unknown"):
        pool.release(r)
    assert pool.list() == {1, 3}  # at capacity: nothing to evict
    assert pool.acquire("r5", None) is None  # the base model


def test_pins_survive_eviction_and_are_bounded(backend):
    pool = make_pool(backend)
    pool.acquire("r1", req("a", 1))
    pool.release("r1")
    pool.add(req("b", 2))
    pool.add(req("c", 3))  # evicts a
    assert 1 not in pool.list()
    assert pool.pin(1)  # seen before: loaded again
    assert 1 in pool.list()
    assert pool.pin(2)  # b (evicted by a's return) comes back, c goes
    assert pool.list() == {1, 2}
    with pytest.raises(ValueError, match="cannot load LoRA adapter 'c': all 2 host adapter "
                                         "slots .* are pinned"):
        pool.pin(3)
    # A request still gets its adapter: the pool goes over capacity until it finishes.
    pool.acquire("r2", req("d", 4))
    assert pool.list() == {1, 2, 4}
    with pytest.raises(ValueError, match="cannot pin LoRA adapter 4: all 2 host adapter "
                                         "slots .* are pinned already"):
        pool.pin(4)
    pool.release("r2")
    assert pool.list() == {1, 2}
    assert not pool.pin(99)


def test_removing_an_adapter_in_use_waits_for_its_last_request(backend):
    pool = make_pool(backend)
    handle = pool.acquire("r1", req("a", 1))
    assert pool.remove(1)
    assert pool.list() == set() and handle in backend.live
    assert not pool.remove(1)
    pool.release("r1")
    assert backend.live == []
    assert not pool.pin(1)  # removed: forgotten


def test_the_same_id_with_another_folder_replaces_the_adapter(backend):
    pool = make_pool(backend)
    old = pool.acquire("r1", req("a", 1, "/v1"))
    new = pool.acquire("r2", req("a", 1, "/v2"))
    assert admission.adapter_key(req("a", 1, "/v1")) != admission.adapter_key(req("a", 1, "/v2"))
    assert new is not old and {old, new} <= set(backend.live)  # both run, each its own
    assert pool.list() == {1}
    pool.release("r1")
    assert old not in backend.live
    assert pool.acquire("r3", req("a", 1, "/v2")) is new


def test_load_inplace_reads_the_adapter_again(backend):
    pool = make_pool(backend)
    first = pool.acquire("r1", req("a", 1))
    pool.release("r1")
    assert pool.pin(1)
    assert pool.add(req("a", 1, load_inplace=True))
    assert first not in backend.live and len(backend.live) == 1
    assert pool._current(1).pinned  # the pin stays with the adapter


def test_replacing_an_adapter_in_use_makes_the_new_load_another_adapter(backend):
    """Requests running on the old load keep it; new ones get the new load; for the
    scheduler they are two adapters (both count against max_loras) until the old goes."""
    pool = make_pool(backend)
    a = req("a", 1)
    old = pool.acquire("r1", a)
    before = admission.adapter_key(a)
    assert pool.add(req("a", 1, load_inplace=True))
    after = admission.adapter_key(a)
    assert after != before and after[:2] == before[:2]
    new = pool.acquire("r2", a)
    assert new is not old and old in backend.live and new in backend.live
    pool.release("r1")
    assert old not in backend.live and new in backend.live
    # Removed while in use: the same (the next load is another adapter again).
    assert pool.remove(1)
    assert admission.adapter_key(a) != after and new in backend.live
    pool.release("r2")
    assert backend.live == []


def test_a_bad_adapter_drops_nothing(backend):
    pool = make_pool(backend)
    pool.add(req("a", 1))
    pool.add(req("b", 2))
    with pytest.raises(AdapterError, match="No adapter found"):
        pool.add(req("a", 1, "/bad", load_inplace=True))
    with pytest.raises(AdapterError, match="No adapter found"):
        pool.add(req("x", 5, "/bad"))
    assert pool.list() == {1, 2} and backend.names() == ["a", "b"]
    # At a request's admission the front end had checked it: a folder gone since is fatal.
    with pytest.raises(RuntimeError, match="LoRA adapter 'x' .*its folder changed since"):
        pool.acquire("r1", req("x", 5, "/bad"))
