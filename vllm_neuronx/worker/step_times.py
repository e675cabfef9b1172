"""How long each model step takes inside the engine, by phase and batch size.

A backend measured alone can step faster than it does inside the server: the API
server, the client and the engine core's own loop share the cores with it. The
runner times every backend call and the gap before it (the engine's own work
between two steps), so ``cpu_backend.py --engine`` and the server's shutdown line
can set the step inside the engine beside the step measured alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class _Tally:
    steps: int = 0
    backend_s: float = 0.0
    gap_s: float = 0.0  # from the previous step's end to this one's start


@dataclass(slots=True)
class StepTimes:
    """Backend time and the engine's time between steps, per (phase, rows)."""

    tallies: dict[tuple[str, int], _Tally] = field(default_factory=dict)
    _last_end: float | None = None

    def record(self, phase: str, rows: int, start: float, end: float) -> None:
        tally = self.tallies.setdefault((phase, rows), _Tally())
        tally.steps += 1
        tally.backend_s += end - start
        # A gap longer than a second is the engine idle between requests, not overhead.
        if self._last_end is not None and start - self._last_end < 1.0:
            tally.gap_s += start - self._last_end
        self._last_end = end

    def summary(self) -> list[dict]:
        """One entry per (phase, rows): steps, mean backend ms, mean gap ms."""
        return [
            {"phase": phase, "rows": rows, "steps": t.steps,
             "backend_ms": round(t.backend_s / t.steps * 1e3, 2),
             "gap_ms": round(t.gap_s / t.steps * 1e3, 2)}
            for (phase, rows), t in sorted(self.tallies.items())
        ]

    def describe(self) -> str:
        """One line for the log: each phase's steps, mean backend and gap ms, and those of
        its widest batch (a serving run's c32 decode, apart from its c1 steps)."""
        parts = []
        for phase in ("prefill", "decode", "mixed"):  # mixed: chunked prefill's steps
            mine = {rows: t for (p, rows), t in self.tallies.items() if p == phase}
            steps = sum(t.steps for t in mine.values())
            if not steps:
                continue
            backend = sum(t.backend_s for t in mine.values()) / steps * 1e3
            gap = sum(t.gap_s for t in mine.values()) / steps * 1e3
            rows = max(mine)
            widest = mine[rows]
            parts.append(
                f"{phase} {steps} steps, {backend:.1f} ms in the backend and {gap:.1f} ms "
                f"between steps on average ({rows} rows: {widest.steps} steps, "
                f"{widest.backend_s / widest.steps * 1e3:.1f} + "
                f"{widest.gap_s / widest.steps * 1e3:.1f} ms)")
        return "; ".join(parts) or "no steps"
