"""The user guide's offline quickstart runs verbatim (no __main__ guard) on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_prints_four_completions():
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/offline_inference/neuron.py")],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Prompt:")]
    assert len(lines) == 4, proc.stdout
    assert "Paris" in next(line for line in lines if "France" in line)
    logs = proc.stdout + proc.stderr
    assert logs.count("no Neuron device found") == 1
    assert "Neuron ready: framework=neuronx-distributed-inference backend=cpu" in logs
    # The script ends with its LLM alive: the engine core is stopped, not found dead.
    assert "died unexpectedly" not in logs
    assert not [line for line in logs.splitlines() if " ERROR " in line], logs[-3000:]
