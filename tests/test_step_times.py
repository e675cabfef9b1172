"""The runner's step record (worker/step_times.py): pure, no model."""

from __future__ import annotations

from vllm_neuronx.worker.step_times import StepTimes


def test_steps_are_tallied_by_phase_and_rows_with_the_gap_before_each():
    t = StepTimes()
    t.record("prefill", 2, start=10.0, end=10.5)
    t.record("decode", 2, start=10.502, end=10.512)
    t.record("decode", 2, start=10.514, end=10.524)
    t.record("decode", 1, start=30.0, end=30.01)  # after 19 s idle: no gap counted
    assert t.summary() == [
        {"phase": "decode", "rows": 1, "steps": 1, "backend_ms": 10.0, "gap_ms": 0.0},
        {"phase": "decode", "rows": 2, "steps": 2, "backend_ms": 10.0, "gap_ms": 2.0},
        {"phase": "prefill", "rows": 2, "steps": 1, "backend_ms": 500.0, "gap_ms": 0.0},
    ]
    assert t.describe().startswith("prefill 1 steps, 500.0 ms in the backend")
    # each phase's widest batch apart: a serving run's c32 steps beside its c1 ones
    assert "decode 3 steps, 10.0 ms in the backend and 1.3 ms between steps on average " \
        "(2 rows: 2 steps, 10.0 + 2.0 ms)" in t.describe()

