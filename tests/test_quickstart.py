"""The user guide's offline quickstart runs verbatim (no __main__ guard) on the CPU, and so
do its int8 variant (examples/offline_inference/neuron_int8_quantize.py), the multi-LoRA
example (neuron_multi_lora.py) and the speculative decoding ones (neuron_speculation.py,
neuron_eagle.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> tuple[list[str], str]:
    """The example's ``Prompt:`` lines and its whole output, after checking it ran cleanly
    on the CPU backend."""
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/offline_inference" / name)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Prompt:")]
    logs = proc.stdout + proc.stderr
    assert logs.count("no Neuron device found") == 1
    assert "Neuron ready: framework=neuronx-distributed-inference backend=cpu" in logs
    # The script ends with its LLM alive: the engine core is stopped, not found dead.
    assert "died unexpectedly" not in logs
    assert not [line for line in logs.splitlines() if " ERROR " in line], logs[-3000:]
    return lines, logs


def test_quickstart_prints_four_completions():
    lines, logs = run_example("neuron.py")
    assert len(lines) == 4, logs[-3000:]
    assert "Paris" in next(line for line in lines if "France" in line)


def test_int8_example_prints_a_completion_of_each_prompt():
    lines, logs = run_example("neuron_int8_quantize.py")
    prompts = ["Hello, my name is", "The president of the United States is",
               "The capital of France is", "The future of AI is"]
    assert [line.split(", Generated text: ")[0] for line in lines] == [
        f"Prompt: {p!r}" for p in prompts], logs[-3000:]
    assert all(line.split(", Generated text: ")[1] not in ("''", '""') for line in lines)
    assert "Paris" in lines[2]
    # Quantized from the neuron config's keys; vLLM's own --quantization stays unset.
    assert "'quantized': True" in logs and "quantization=None" in logs


def test_multi_lora_example_prints_each_prompt_with_each_adapter_and_the_base_model():
    lines, logs = run_example("neuron_multi_lora.py")
    prompts = ["The capital of France is", "The future of AI is"]
    adapters = ["adapter-1", "adapter-2", "base model"]
    assert [line.split(", Generated text: ")[0] for line in lines] == [
        f"Prompt: {p!r}, Adapter: {a}" for p in prompts for a in adapters], logs[-3000:]
    texts = [line.split(", Generated text: ")[1] for line in lines]
    assert all(t not in ("''", '""') for t in texts)
    assert "Paris" in texts[2]  # the base model
    # Each adapter changes the text of at least one prompt, each in its own way.
    assert texts[0] != texts[2] or texts[3] != texts[5]
    assert texts[1] != texts[2] or texts[4] != texts[5]
    assert texts[0] != texts[1] or texts[3] != texts[4]


def speculation_rate(logs: str) -> float:
    line = next(x for x in logs.splitlines() if x.startswith("Speculation: "))
    accepted, proposed = (int(w) for w in line.split()[1:4:2])
    assert 0 < proposed
    return accepted / proposed


def test_speculation_example_drafts_from_int8_weights_and_keeps_the_models_text():
    lines, logs = run_example("neuron_speculation.py")
    assert len(lines) == 4, logs[-3000:]
    assert "Paris" in lines[0]
    assert "speculation=draft_model k=4" in logs
    assert speculation_rate(logs) > 0.5  # int8 weights agree with the model most of the time


def test_eagle_example_runs_a_head_made_from_the_model():
    lines, logs = run_example("neuron_eagle.py")
    assert len(lines) == 2 and "Paris" in lines[0], logs[-3000:]
    assert "speculation=eagle k=4" in logs
    assert 0 <= speculation_rate(logs) < 1
