"""The KV line pool: lowest line first, freed on release, never over capacity."""

from __future__ import annotations

import pytest

from vllm_neuronx.worker.kv_lines import KVLinePool


def test_lines_are_reused_lowest_first():
    pool = KVLinePool(3)
    assert [pool.allocate(r) for r in "abc"] == [0, 1, 2]
    pool.release("b")
    pool.release("a")
    assert pool.allocate("d") == 0
    assert pool.allocate("e") == 1
    assert pool.in_use == 3


def test_exhaustion_and_double_allocation_are_errors():
    pool = KVLinePool(1)
    pool.allocate("a")
    with pytest.raises(RuntimeError, match="already holds"):
        pool.allocate("a")
    with pytest.raises(RuntimeError, match="no free KV line"):
        pool.allocate("b")
    assert pool.release("unknown") is None
    assert pool.release("a") == 0 and pool.in_use == 0
