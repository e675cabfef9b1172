"""Multi-LoRA through vLLM's offline API on the CPU backend (in-process, so the test can watch
the scheduler): LLM(enable_lora=True, max_loras=2, max_cpu_loras=2) and
generate(..., lora_request=...). Each request's greedy tokens equal HF transformers with
PEFT's unmerged adapter (tests/lora_utils.py), in batches that mix adapters and the base
model; a KV line reused after an adapter request serves the base model; more adapters
than slots swap through the host pool without breaking upstream's max_loras assertion;
add/remove/pin/list go through the engine; a bad adapter is a ValueError naming it, and
the engine serves the next call."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

from tests.conftest import make_tiny_llama
from tests.engine_checks import in_process_engine_env, leave_in_process_engine_env, lines_in_use
from tests.lora_utils import make_peft_adapter, peft_greedy

MAX_NUM_SEQS = 4
MAX_LORAS = 2
MAX_RANK = 8


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, str]:
    """Four adapters of the tiny Llama: all projections, rsLoRA at another rank, and two
    of some projections only."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": make_peft_adapter(tiny_llama, root / "a1", seed=1, r=8, alpha=16),
        "a2": make_peft_adapter(tiny_llama, root / "a2", seed=2, r=4, alpha=8, use_rslora=True),
        "a3": make_peft_adapter(tiny_llama, root / "a3", seed=3,
                                targets=("q_proj", "v_proj", "down_proj")),
        "a4": make_peft_adapter(tiny_llama, root / "a4", seed=4, r=2,
                                targets=("o_proj", "gate_proj", "up_proj")),
    }


IDS = {"a1": 1, "a2": 2, "a3": 3, "a4": 4}


def lora(adapters, name: str | None) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, IDS[name], adapters[name])


@pytest.fixture(scope="module")
def llm(tiny_llama):
    mp = pytest.MonkeyPatch()
    in_process_engine_env(mp)  # so the tests can watch the scheduler
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32", enable_lora=True,
              max_loras=MAX_LORAS, max_cpu_loras=MAX_LORAS, max_lora_rank=MAX_RANK)
    yield llm
    del llm
    leave_in_process_engine_env(mp)


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)


def generate(llm, prompts, max_tokens, lora_requests):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           [params(n) for n in max_tokens], lora_request=lora_requests)
    return [list(o.outputs[0].token_ids) for o in outputs]


def references(model, paths, prompts, max_tokens):
    """HF + PEFT greedy tokens of each request (path None: the base model)."""
    out = [None] * len(prompts)
    for path in dict.fromkeys(paths):
        rows = [i for i, p in enumerate(paths) if p == path]
        got = peft_greedy(model, path, [prompts[i] for i in rows], [max_tokens[i] for i in rows])
        for i, tokens in zip(rows, got, strict=True):
            out[i] = tokens
    return out


def random_prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def test_one_batch_mixing_two_adapters_and_the_base_model_matches_hf_peft(llm, tiny_llama,
                                                                           adapters):
    names = ["a1", "a2", None, "a1", None, "a2", "a1"]
    prompts = random_prompts(0, len(names))
    max_tokens = [12, 9, 14, 5, 11, 16, 1]
    got = generate(llm, prompts, max_tokens, [lora(adapters, n) for n in names])
    paths = [adapters[n] if n else None for n in names]
    assert got == references(tiny_llama, paths, prompts, max_tokens)
    # The adapters change the tokens (else the test would prove nothing).
    base = references(tiny_llama, [None] * len(names), prompts, max_tokens)
    assert all(g != b for g, b, n in zip(got, base, names, strict=True) if n and len(g) > 1)
    assert lines_in_use(llm) == 0


def test_one_adapter_for_every_prompt(llm, tiny_llama, adapters):
    """A single LoRARequest applies to every prompt of the call."""
    prompts = random_prompts(1, 3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params(8),
                           lora_request=lora(adapters, "a3"))
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert got == peft_greedy(tiny_llama, adapters["a3"], prompts, 8)


def test_a_kv_line_reused_after_an_adapter_request_serves_the_base_model(llm, tiny_llama,
                                                                         adapters):
    prompt = [7, 8, 9, 10]
    [with_adapter] = generate(llm, [prompt], [10], [lora(adapters, "a1")])
    assert lines_in_use(llm) == 0
    # Line 0 again (the pool hands out the lowest free line), now for the base model: its
    # prefill and every decode step must use no adapter.
    [base] = generate(llm, [prompt], [10], None)
    assert base == peft_greedy(tiny_llama, None, [prompt], 10)[0]
    assert with_adapter == peft_greedy(tiny_llama, adapters["a1"], [prompt], 10)[0]
    assert base != with_adapter


def test_more_adapters_than_slots_all_right_and_never_more_than_max_loras_running(
        llm, tiny_llama, adapters):
    """Four adapters and the base model over max_loras=2 slots and a host pool of
    max_cpu_loras=2: adapters wait for a slot, are evicted and loaded again, and every
    request's tokens are right. Upstream asserts the running adapters <= max_loras on
    every decode step; the scheduler's own record says the same."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    seen = []
    original = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append({r.lora_request.lora_int_id for r in scheduler.running if r.lora_request})
        return out

    names = ["a1", "a2", "a3", "a4", None, "a3", "a1", "a4", "a2", None, "a4", "a1"]
    prompts = random_prompts(2, len(names))
    max_tokens = [random.Random(i).randint(2, 14) for i in range(len(names))]
    scheduler.schedule = recording_schedule
    try:
        got = generate(llm, prompts, max_tokens, [lora(adapters, n) for n in names])
    finally:
        scheduler.schedule = original
    paths = [adapters[n] if n else None for n in names]
    assert got == references(tiny_llama, paths, prompts, max_tokens)
    assert max(len(s) for s in seen) == MAX_LORAS
    assert all(len(s) <= MAX_LORAS for s in seen)
    assert len(llm.llm_engine.list_loras()) <= MAX_LORAS  # max_cpu_loras
    assert lines_in_use(llm) == 0


def test_add_pin_list_remove_through_the_engine(llm, tiny_llama, adapters):
    engine = llm.llm_engine
    assert engine.add_lora(lora(adapters, "a3"))
    assert 3 in engine.list_loras()
    assert engine.pin_lora(3)
    # Two other adapters pass through the pool; the pinned one stays.
    prompts = random_prompts(3, 2)
    got = generate(llm, prompts, [6, 6], [lora(adapters, "a1"), lora(adapters, "a2")])
    assert got == references(tiny_llama, [adapters["a1"], adapters["a2"]], prompts, [6, 6])
    assert 3 in engine.list_loras()
    assert engine.remove_lora(3)
    assert 3 not in engine.list_loras()
    assert not engine.remove_lora(3)  # no longer held
    assert not engine.pin_lora(99)  # never seen
    # A removed adapter is loaded again by the next request naming it.
    [tokens] = generate(llm, [[5, 6, 7]], [6], [lora(adapters, "a3")])
    assert tokens == peft_greedy(tiny_llama, adapters["a3"], [[5, 6, 7]], 6)[0]


def test_the_same_id_with_another_folder_replaces_the_adapter(llm, tiny_llama, adapters):
    """vLLM identifies an adapter by its id; a request naming the id with another folder
    gets that folder's weights (the old adapter goes)."""
    prompt = [9, 10, 11, 12]
    [first] = generate(llm, [prompt], [8], [LoRARequest("x", 7, adapters["a1"])])
    [second] = generate(llm, [prompt], [8], [LoRARequest("x", 7, adapters["a2"])])
    assert first == peft_greedy(tiny_llama, adapters["a1"], [prompt], 8)[0]
    assert second == peft_greedy(tiny_llama, adapters["a2"], [prompt], 8)[0]
    assert llm.llm_engine.remove_lora(7)


def test_load_inplace_while_the_old_adapter_runs(llm, tiny_llama, adapters, tmp_path):
    """add_lora(load_inplace=True) of a folder rewritten while a request runs on it: that
    request finishes on the old weights, a new one gets the new weights, and the old and
    new loads count as two adapters against max_loras (a third adapter is running), so
    the new request waits for the old one: never more than max_loras in flight."""
    folder = tmp_path / "inplace"
    shutil.copytree(adapters["a1"], folder)
    x = LoRARequest("x", 8, str(folder))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    long_prompt, other_prompt, new_prompt = [20, 21, 22], [23, 24], [25, 26, 27, 28]
    engine.add_request("old", {"prompt_token_ids": long_prompt}, params(20), lora_request=x)
    engine.add_request("other", {"prompt_token_ids": other_prompt}, params(24),
                       lora_request=lora(adapters, "a3"))
    outputs = {}
    for _ in range(3):
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(Path(adapters["a2"], name), folder / name)
    assert engine.add_lora(LoRARequest("x", 8, str(folder), load_inplace=True))
    engine.add_request("new", {"prompt_token_ids": new_prompt}, params(6), lora_request=x)
    in_flight = []
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
        in_flight.append(len({scheduler._adapter_keys.get(r.request_id)
                              for r in scheduler.running if r.lora_request}))
    assert max(in_flight) <= MAX_LORAS
    got = {k: list(o.outputs[0].token_ids) for k, o in outputs.items()}
    assert got["old"] == peft_greedy(tiny_llama, adapters["a1"], [long_prompt], 20)[0]
    assert got["new"] == peft_greedy(tiny_llama, adapters["a2"], [new_prompt], 6)[0]
    assert got["other"] == peft_greedy(tiny_llama, adapters["a3"], [other_prompt], 24)[0]
    assert engine.remove_lora(8)
    assert lines_in_use(llm) == 0


@pytest.fixture(scope="module")
def bad_adapters(tiny_llama, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (folder, what the error says)."""
    root = tmp_path_factory.mktemp("bad-adapters")
    malformed = root / "malformed"
    malformed.mkdir()
    (malformed / "adapter_config.json").write_text("{not json")
    other = make_tiny_llama(root / "other-model", hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=1)
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    return {
        "missing": (str(root / "nothing-here"), "No adapter found"),
        "malformed": (str(malformed), "malformed adapter_config.json"),
        "no-weights": (str(no_weights), "no adapter weights"),
        "rank16": (make_peft_adapter(tiny_llama, root / "rank16", r=16),
                   "rank 16 is greater than max_lora_rank 8"),
        "lm-head": (make_peft_adapter(tiny_llama, root / "lm-head",
                                      targets=("q_proj", "lm_head")),
                    r"targets modules the model lacks.*lm_head"),
        "other-model": (make_peft_adapter(other, root / "other-model-adapter"),
                        r"lora_[AB] is \[.*\], the model needs \["),
        "dora": (make_peft_adapter(tiny_llama, root / "dora", use_dora=True),
                 "use_dora=True not supported"),
    }


@pytest.mark.parametrize("name", ["missing", "malformed", "no-weights", "rank16", "lm-head",
                                  "other-model", "dora"])
def test_a_bad_adapter_is_a_value_error_naming_it_and_the_engine_serves_on(
        llm, tiny_llama, adapters, bad_adapters, name):
    path, problem = bad_adapters[name]
    bad = LoRARequest(name, 50, path)
    with pytest.raises(ValueError, match=rf"LoRA adapter '{name}' \(.*\): .*{problem}"):
        generate(llm, [[5, 6, 7]], [4], [bad])
    # In a list: the good request before it is withdrawn with it, nothing is left running.
    with pytest.raises(ValueError, match=f"LoRA adapter '{name}'"):
        generate(llm, [[5, 6, 7], [8, 9]], [4, 4], [lora(adapters, "a1"), bad])
    # add_lora refuses it the same way (the server's --lora-modules and runtime loads).
    with pytest.raises(ValueError, match=f"LoRA adapter '{name}'"):
        llm.llm_engine.add_lora(bad)
    assert 50 not in llm.llm_engine.list_loras()
    assert lines_in_use(llm) == 0
    prompts = [[5, 6, 7], [8, 9]]
    got = generate(llm, prompts, [4, 4], [lora(adapters, "a1"), None])
    assert got == references(tiny_llama, [adapters["a1"], None], prompts, [4, 4])


def test_without_enable_lora_the_worker_says_so(tiny_llama):
    """The worker's LoRA calls on an engine started without LoRA (upstream's front end
    refuses a LoRARequest there first)."""
    from vllm_neuronx.worker.worker import NeuronWorker

    worker = NeuronWorker.__new__(NeuronWorker)
    worker.model_runner = type("Runner", (), {"lora": None})()
    for call in (lambda: worker.add_lora(LoRARequest("a", 1, "/x")),
                 lambda: worker.remove_lora(1), lambda: worker.pin_lora(1),
                 lambda: worker.list_loras()):
        with pytest.raises(ValueError, match="LoRA is not enabled: start the engine with "
                                             r"enable_lora=True \(--enable-lora\)"):
            call()


def test_smollm2_batch_mixing_two_adapters_and_the_base_model_matches_hf_peft(tmp_path):
    """The default model in fp32, through LLM.generate with its tokenizer."""
    from transformers import AutoTokenizer

    from vllm_neuronx.default_model import default_model_path

    model = default_model_path()
    tok = AutoTokenizer.from_pretrained(model)
    texts = ["The capital of France is", "Hello, my name is", "def fibonacci(n):",
             "Water boils at", "The future of AI is"]
    prompts = [tok(t)["input_ids"] for t in texts]
    a1 = make_peft_adapter(model, tmp_path / "a1", seed=1, b_scale=0.1)
    a2 = make_peft_adapter(model, tmp_path / "a2", seed=2, r=8, alpha=8, b_scale=0.1,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    names = ["a1", "a2", None, "a1", "a2"]
    requests = {"a1": LoRARequest("a1", 1, a1), "a2": LoRARequest("a2", 2, a2), None: None}
    llm = LLM(model=model, device="neuron", max_num_seqs=4, max_model_len=128,
              dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    try:
        max_tokens = [10, 12, 8, 6, 10]
        got = generate(llm, prompts, max_tokens, [requests[n] for n in names])
    finally:
        del llm
    paths = [{"a1": a1, "a2": a2}.get(n) for n in names]
    assert got == references(model, paths, prompts, max_tokens)
    assert got[0] != references(model, [None], prompts[:1], max_tokens[:1])[0]
