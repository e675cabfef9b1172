"""The scheduler's LoRA rule (vllm_neuronx/lora/admission.py), pure: at most max_loras
adapters among the running requests and the admitted ones, later adapter requests held
behind a held one, base-model requests always admissible, and nobody waits forever."""

from __future__ import annotations

import random

import pytest
from vllm.lora.request import LoRARequest

from vllm_neuronx.lora.admission import adapter_key, admit, replaced


def test_the_cap_counts_running_and_new_adapters_together():
    # "a" runs; one more adapter fits in max_loras=2: "b". "c" would be the third.
    assert admit(["b", "c"], {"a"}, 2) == [True, False]
    assert admit(["a", "b", "a", "b"], {"a"}, 2) == [True, True, True, True]
    assert admit(["c"], {"a", "b"}, 2) == [False]
    assert admit(["a", "b"], {"a", "b"}, 2) == [True, True]


def test_base_model_requests_always_pass():
    assert admit([None, "c", None, None], {"a", "b"}, 2) == [True, False, True, True]
    assert admit([None, None], set(), 1) == [True, True]


def test_adapter_requests_behind_a_held_one_wait_even_for_a_running_adapter():
    # "c" is held: the later "a" waits too, although "a" runs, so "a" and "b" drain and
    # "c" gets a slot. The earlier "a" passes.
    assert admit(["a", "c", "a", None, "b"], {"a", "b"}, 2) == [True, False, False, True, False]


def test_more_adapters_running_than_slots_is_a_scheduling_bug():
    with pytest.raises(RuntimeError, match="3 adapters are running but max_loras=2"):
        admit(["a"], {"a", "b", "c"}, 2)
    with pytest.raises(ValueError, match="max_loras must be at least 1"):
        admit([], set(), 0)


def test_an_adapter_is_its_id_with_its_folder_and_its_replacements():
    assert adapter_key(None) is None
    assert adapter_key(LoRARequest("a", 1, "/x")) == (1, "/x", 0)
    # The same id with another folder is another adapter (the pool replaces the old one
    # once its requests finish; both are in flight until then).
    assert adapter_key(LoRARequest("a", 1, "/y")) != adapter_key(LoRARequest("a", 1, "/x"))
    # So is a load that replaced one still in use (tests/test_lora_pool.py).
    replaced(1, "/only-here")
    assert adapter_key(LoRARequest("a", 1, "/only-here")) == (1, "/only-here", 1)


def simulate(arrivals: list[list[str | None]], *, max_loras: int, lines: int, length):
    """A scheduler loop of prefill steps over ``lines`` KV lines: each step admits waiting
    requests in queue order while lines are free (the rule's choices only); a running
    request holds its line for ``length(req)`` steps. ``arrivals[step]``: the adapters
    (None: base) arriving at that step. Runs until every request was admitted (or gives up
    after far too long); returns ({request: (adapter, arrival step, admission step)}, the
    most adapters ever in flight, the requests never admitted)."""
    waiting: list[tuple[int, str | None, int]] = []  # (request, adapter, arrival step)
    running: list[tuple[int, str | None, int]] = []  # (request, adapter, end step)
    waits: dict[int, tuple[str | None, int, int]] = {}
    peak = 0
    next_id = 0
    for step in range(len(arrivals) + 100_000):
        for adapter in arrivals[step] if step < len(arrivals) else []:
            waiting.append((next_id, adapter, step))
            next_id += 1
        running = [r for r in running if r[2] > step]
        allowed = admit([w[1] for w in waiting], {r[1] for r in running if r[1]}, max_loras)
        kept = []
        for (req, adapter, arrived), ok in zip(waiting, allowed, strict=True):
            if ok and len(running) < lines:
                running.append((req, adapter, step + length(req)))
                waits[req] = (adapter, arrived, step)
            else:
                kept.append((req, adapter, arrived))
        waiting = kept
        peak = max(peak, len({r[1] for r in running if r[1]}))
        if step >= len(arrivals) and not waiting:
            break
    return waits, peak, waiting


def test_a_held_adapter_is_served_while_two_busy_adapters_keep_arriving():
    """"a" and "b" arrive every step, faster than they are served; one "c" request arrives
    at step 5. With max_loras=2 it is held, the adapter requests behind it wait, "a" and
    "b" drain and "c" runs: once the requests queued before it have run, within one
    request's lifetime; no request that came after it runs before it."""
    arrivals = [["a", "b", *(["c"] if step == 5 else [])] for step in range(3000)]
    waits, peak, left = simulate(arrivals, max_loras=2, lines=4, length=lambda r: 7)
    assert peak <= 2
    assert not left
    [(c_arrived, c_admitted)] = [(a, s) for k, a, s in waits.values() if k == "c"]
    ahead = [s for k, a, s in waits.values() if a <= c_arrived and k != "c"]
    assert c_admitted <= max(ahead) + 7
    assert all(s >= c_admitted for k, a, s in waits.values() if a > c_arrived)


@pytest.mark.parametrize("seed", range(6))
def test_every_request_of_a_random_mix_is_admitted_and_the_cap_always_holds(seed):
    rng = random.Random(seed)
    adapters = [None, "a", "b", "c", "d", "e"]
    max_loras = rng.choice([1, 2, 3])
    arrivals = [[rng.choice(adapters) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
                for _ in range(400)]
    lengths = [rng.randint(1, 12) for _ in range(sum(map(len, arrivals)))]
    waits, peak, left = simulate(arrivals, max_loras=max_loras, lines=4,
                                 length=lengths.__getitem__)
    assert not left, "requests still waiting long after the last arrival"
    assert peak <= max_loras
    assert len(waits) == len(lengths)
