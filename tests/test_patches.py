"""The user guide's arguments on upstream's EngineArgs, LLM and CLI."""

from __future__ import annotations

import re

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

from vllm_neuronx.neuron_config import NeuronConfigError

MODEL = ""


@pytest.fixture(autouse=True)
def _model(tiny_llama):
    global MODEL
    MODEL = tiny_llama


def parse(*argv: str):
    parser = make_arg_parser(FlexibleArgumentParser())
    return parser.parse_args(["--model", MODEL, *argv])


def test_cli_accepts_the_user_guide_flags():
    args = parse("--device", "neuron", "--tensor-parallel-size", "8",
                 "--override-neuron-config", '{"enable_bucketing": false}')
    engine_args = AsyncEngineArgs.from_cli_args(args)
    overrides = engine_args.additional_config["override_neuron_config"]
    assert overrides == {"enable_bucketing": False, "tp_degree": 8}
    assert engine_args.tensor_parallel_size == 1  # vLLM's own world stays one process


def test_cli_malformed_json_names_the_problem(capsys):
    with pytest.raises(SystemExit):
        parse("--override-neuron-config", "{enable_bucketing: false}")
    assert "override_neuron_config is not valid JSON" in capsys.readouterr().err


def test_cli_refuses_other_devices(capsys):
    with pytest.raises(SystemExit):
        parse("--device", "cuda")
    assert "--device" in capsys.readouterr().err


def test_engine_args_accept_device_and_overrides_without_mutating_them():
    overrides = {"on_device_sampling_config": {"global_topk": 64}}
    args = EngineArgs(model=MODEL, device="neuron", override_neuron_config=overrides,
                      tensor_parallel_size=2)
    assert args.additional_config["override_neuron_config"] == {
        "on_device_sampling_config": {"global_topk": 64}, "tp_degree": 2}
    assert overrides == {"on_device_sampling_config": {"global_topk": 64}}
    assert args.max_num_seqs == 32  # a sane compiled batch when the user gives none


def test_explicit_tp_degree_in_the_override_wins():
    args = EngineArgs(model=MODEL, override_neuron_config={"tp_degree": 4}, tensor_parallel_size=2)
    assert args.additional_config["override_neuron_config"]["tp_degree"] == 4


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(device="cuda"), ValueError, "device='cuda' is not supported"),
        (dict(override_neuron_config={"sequence_paralel_enabled": True}), NeuronConfigError,
         "unknown override_neuron_config key 'sequence_paralel_enabled'"),
        (dict(override_neuron_config="{oops"), NeuronConfigError, "not valid JSON"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        EngineArgs(model=MODEL, **kwargs)


def test_neuron_quant_is_known_to_vllm_and_answered_by_the_backend():
    """vLLM 0.16 has no neuron_quant; registered, it reaches our backend's validation."""
    with pytest.raises(Exception, match="the CPU backend quantizes from the neuron config"):
        EngineArgs(model=MODEL, quantization="neuron_quant", skip_tokenizer_init=True,
                   max_model_len=64).create_engine_config()


def test_unsupported_architecture_is_refused_when_the_config_is_built(tmp_path):
    import json
    import shutil

    from vllm_neuronx.backends.cpu.llama import SUPPORTED_ARCHITECTURES

    folder = tmp_path / "dbrx"
    shutil.copytree(MODEL, folder, ignore=shutil.ignore_patterns("neuron-compiled-artifacts"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["DbrxForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    supported = re.escape(str(sorted(SUPPORTED_ARCHITECTURES)))
    with pytest.raises(Exception, match=r"does not serve architectures \['DbrxForCausalLM'\]; "
                                        rf"supported: {supported}"):
        EngineArgs(model=str(folder), skip_tokenizer_init=True,
                   max_model_len=64).create_engine_config()
