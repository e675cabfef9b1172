"""Checks shared by the end-to-end tests of every backend (CPU and both simulators)."""

from __future__ import annotations

import os
import re
import sys

import pytest
from vllm import SamplingParams

SIMULATORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simulators")


def prefill_args(prompts, lines=None):
    """(input_ids, position_ids, seq_ids) of a prefill call, from the runner's own builder."""
    from vllm_neuronx.worker.inputs import SequenceRow, prefill_inputs

    lines = list(range(len(prompts))) if lines is None else lines
    rows = [SequenceRow(str(i), line, list(p), (1, 1.0, 1.0))
            for i, (p, line) in enumerate(zip(prompts, lines, strict=True))]
    step = prefill_inputs(rows)
    return step.input_ids, step.position_ids, step.seq_ids


def check_greedy_matches_hf(llm, model: str, prompts: list[list[int]],
                            max_tokens: list[int]) -> None:
    """LLM.generate's greedy tokens equal HF transformers' for the same prompts."""
    from tests.conftest import hf_greedy

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
              for n in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [list(o.outputs[0].token_ids) for o in outputs] == hf_greedy(model, prompts, max_tokens)


def lines_in_use(llm) -> int:
    """KV lines the runner holds. Finished ids reach it with the next step: the busy
    loop of a multiprocess engine runs that step by itself, in-process we run it here."""
    llm.llm_engine.step()
    (count,) = llm.collective_rpc("kv_lines_in_use")
    return count


def check_aborts_free_lines(llm, max_num_seqs: int, prefix: str = "abort") -> None:
    """Abort two running requests and a waiting one: the rest finish, every line comes
    back, and the engine still serves."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, detokenize=False)
    ids = [f"{prefix}-{i}" for i in range(max_num_seqs + 3)]
    for i, req_id in enumerate(ids):
        engine.add_request(req_id, {"prompt_token_ids": [3 + i, 4, 5]}, params)
    for _ in range(4):
        engine.step()
    assert llm.collective_rpc("kv_lines_in_use") == [max_num_seqs]
    aborted = {ids[0], ids[1], ids[-1]}  # two running, one still waiting
    engine.abort_request(sorted(aborted))
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == set(ids) - aborted
    assert lines_in_use(llm) == 0
    out = llm.generate([{"prompt_token_ids": [7, 8]}], params)
    assert len(out[0].outputs[0].token_ids) == 40
    assert lines_in_use(llm) == 0


def check_stop_tokens(llm, model: str) -> None:
    """Each request ends at its own stop token, where HF's greedy tokens put it."""
    from tests.conftest import hf_greedy

    prompts = [[1, 40, 41, 42], [1, 7, 8]]
    full = hf_greedy(model, prompts, [20, 20])
    stops = [full[0][5], full[1][2]]  # each request's 6th and 3rd tokens stop it
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[s],
                             detokenize=False) for s in stops]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [f[:f.index(s) + 1] for f, s in zip(full, stops, strict=True)]
    assert lines_in_use(llm) == 0


def check_host_rows_beside_device_rows(llm, model: str) -> None:
    """A row sampled on the host (logprobs) in one batch with rows sampled on the device:
    every row's greedy tokens equal HF's, and the host row gets its logprobs."""
    from tests.conftest import hf_greedy

    prompts = [[1, 11, 12], [1, 13], [1, 14, 15, 16]]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False)
    host = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False,
                          logprobs=2, repetition_penalty=1.0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [plain, host, plain])
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(model, prompts, [12] * 3)
    logprobs = outs[1].outputs[0].logprobs
    assert len(logprobs) == 12 and all(len(step) >= 2 for step in logprobs)


def check_n_children(llm) -> None:
    """``n`` > 1: each child its own KV line, seeded children the same on a second run."""
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True,
                            detokenize=False)
    (out,) = llm.generate([{"prompt_token_ids": [1, 2, 3]}], params)
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 10 for c in out.outputs)
    again = llm.generate([{"prompt_token_ids": [1, 2, 3]}], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert lines_in_use(llm) == 0


def check_structured_output(llm) -> None:
    """A regex and a choice grammar beside a row with none, in one batch (``llm`` serves a
    model with a tokenizer)."""
    from vllm.sampling_params import StructuredOutputsParams

    params = [SamplingParams(temperature=0, max_tokens=8,
                             structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}")),
              SamplingParams(temperature=0, max_tokens=8,
                             structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
              SamplingParams(temperature=0, max_tokens=8, logprobs=1)]  # no grammar
    outs = llm.generate(["A number:", "Yes or no?", "Hello"], params)
    assert re.fullmatch(r"[0-9]{3}", outs[0].outputs[0].text), outs[0].outputs[0].text
    assert outs[1].outputs[0].text in ("yes", "no")
    assert len(outs[2].outputs[0].token_ids) == 8


def check_stop_strings(llm) -> None:
    """A stop string ends the text right before it, as the same greedy run without it
    shows (``llm`` serves a model with a tokenizer)."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate(["Once upon a time"], params)[0].outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full, full
    stopped = llm.generate(["Once upon a time"], SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert stopped.text == full[:full.index(stop)] and stopped.finish_reason == "stop"


def forget_module(package: str, *also: str) -> None:
    """Drop a simulator package from sys.modules so other test modules cannot import it."""
    for name in [m for m in sys.modules if m.split(".")[0] == package]:
        del sys.modules[name]
    for name in also:
        sys.modules.pop(name, None)


def in_process_engine_env(mp: pytest.MonkeyPatch, **env: str) -> None:
    """Set ``env`` and run engines in this process. An engine core made in-process turns
    on vLLM's cache of its environment variables (enable_envs_cache) for the whole test
    process; it is turned off here and by ``leave_in_process_engine_env``, so a later
    module's engine reads the variables as they are then (multiprocess again)."""
    from vllm import envs

    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for name, value in env.items():
        mp.setenv(name, value)
    envs.disable_envs_cache()


def leave_in_process_engine_env(mp: pytest.MonkeyPatch) -> None:
    from vllm import envs

    mp.undo()
    envs.disable_envs_cache()


def in_process_engines():
    """Generator for a module fixture: this module's engines run in this process."""
    mp = pytest.MonkeyPatch()
    in_process_engine_env(mp)
    try:
        yield
    finally:
        leave_in_process_engine_env(mp)


def nxdi_simulator_server_env(tmp_path_factory=None, folder=None) -> dict[str, str]:
    """The environment of a server (a process of its own) on the NxDI backend over its
    simulator, compiling into ``folder`` or a new folder of this test session."""
    if folder is None:
        folder = tmp_path_factory.mktemp("nxdi") / "compiled"
    return {"PYTHONPATH": os.pathsep.join(filter(None, [SIMULATORS,
                                                        os.environ.get("PYTHONPATH")])),
            "VLLM_NEURONX_FORCE_BACKEND": "nxdi", "NEURON_COMPILED_ARTIFACTS": str(folder)}


def use_simulator(package: str, backend: str, **env: str):
    """Generator for a module fixture: the simulator of ``package`` is importable, the
    platform routes through ``backend`` and the engine runs in this process."""
    import importlib

    mp = pytest.MonkeyPatch()
    forget_module(package, f"vllm_neuronx.backends.{backend}")
    mp.syspath_prepend(SIMULATORS)
    in_process_engine_env(mp, VLLM_NEURONX_FORCE_BACKEND=backend, **env)
    simulator = importlib.import_module(package)
    assert os.path.dirname(simulator.__file__).startswith(SIMULATORS)
    try:
        yield simulator
    finally:
        leave_in_process_engine_env(mp)
        forget_module(package, f"vllm_neuronx.backends.{backend}")


def use_nxdi_simulator(**env: str):
    """``use_simulator`` for the NxDI simulator, its recorded state cleared first (another
    module's compiles and forwards must not count in this one's checks)."""
    for simulator in use_simulator("neuronx_distributed_inference", "nxdi", **env):
        simulator.reset_simulator()
        yield simulator
