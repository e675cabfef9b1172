"""The neuron config vLLM derives, how overrides merge, and what is refused."""

from __future__ import annotations

import pytest
import torch

from vllm_neuronx import neuron_config as nc


def resolve(overrides=None, **kw):
    args = dict(tp_degree=8, max_num_seqs=4, max_model_len=1024, dtype=torch.bfloat16)
    args.update(kw)
    return nc.resolve_neuron_config(overrides=overrides, **args)


def test_defaults_follow_the_user_guide_table():
    cfg = resolve()
    assert cfg["tp_degree"] == 8
    assert cfg["ctx_batch_size"] == 1
    assert cfg["batch_size"] == 4
    assert cfg["max_context_length"] == cfg["seq_len"] == 1024
    assert cfg["enable_bucketing"] is True
    assert cfg["is_continuous_batching"] is True
    assert cfg["quantized"] is False
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["padding_side"] == "right"
    assert cfg["on_device_sampling_config"]["global_topk"] == 256
    assert cfg["on_device_sampling_config"]["dynamic"] is True


@pytest.mark.parametrize(
    "dtype,name",
    [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
     ("float", "float32"), ("half", "float16"), ("bfloat16", "bfloat16")],
)
def test_dtype_mapping(dtype, name):
    assert resolve(dtype=dtype)["torch_dtype"] == name


def test_overrides_merge_and_nested_dicts_merge_per_key():
    cfg = resolve({"enable_bucketing": False, "on_device_sampling_config": {"global_topk": 64}})
    assert cfg["enable_bucketing"] is False
    assert cfg["on_device_sampling_config"]["global_topk"] == 64
    assert cfg["on_device_sampling_config"]["dynamic"] is True  # kept from the defaults
    assert cfg["batch_size"] == 4


def test_overrides_accept_json_and_none_disables_on_device_sampling():
    cfg = resolve('{"on_device_sampling_config": null}')
    assert cfg["on_device_sampling_config"] is None
    assert nc.global_topk(cfg) is None


def test_env_disables_on_device_sampling():
    cfg = nc.resolve_neuron_config(
        tp_degree=1, max_num_seqs=2, max_model_len=128, dtype="float32",
        on_device_sampling_disabled=True,
    )
    assert cfg["on_device_sampling_config"] is None


def test_user_overrides_are_not_mutated():
    overrides = {"on_device_sampling_config": {"global_topk": 64}}
    resolve(overrides)
    assert overrides == {"on_device_sampling_config": {"global_topk": 64}}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"enable_buckting": True}, "unknown override_neuron_config key 'enable_buckting'.*"
                                    "enable_bucketing"),
        ({"on_device_sampling_config": {"globl_topk": 3}}, "unknown on_device_sampling_config "
                                                           "key 'globl_topk'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"batch_size": 8}, "batch_size=8 contradicts max_num_seqs=4"),
        ({"seq_len": 512}, "seq_len=512 contradicts max_model_len=1024"),
        ({"context_encoding_buckets": [256, 128]}, "context_encoding_buckets must be sorted"),
        ({"context_encoding_buckets": [128, 2048]}, "go past max_context_length=1024"),
        ({"token_generation_buckets": [128, 512]}, "must end at seq_len=1024"),
        ({"token_generation_buckets": [0, 1024]}, "positive integers"),
        ({"tp_degree": 0}, "tp_degree must be a positive integer"),
        ({"torch_dtype": "int8"}, "torch_dtype 'int8' is not supported"),
        ({"on_device_sampling_config": {"global_topk": 0}}, "global_topk must be a positive"),
        ({"padding_side": "left"}, "padding_side must be 'right'"),
    ],
)
def test_refusals_name_the_field(overrides, message):
    with pytest.raises(nc.NeuronConfigError, match=message):
        resolve(overrides)


@pytest.mark.parametrize(
    "max_len,expected",
    [(128, [128]), (100, [100]), (1024, [128, 256, 512, 1024]), (300, [128, 300]),
     (700, [128, 256, 700]), (2048, [128, 256, 512, 1024, 2048])],
)
def test_automatic_buckets_are_nxdi_powers_of_two(max_len, expected):
    assert nc.generate_buckets(128, max_len) == expected
    cfg = resolve(max_model_len=max_len)
    assert nc.context_buckets(cfg) == expected
    assert nc.token_buckets(cfg) == expected


def test_bucketing_off_and_explicit_buckets():
    off = resolve({"enable_bucketing": False})
    assert nc.context_buckets(off) == [1024] and nc.token_buckets(off) == [1024]
    explicit = resolve({"context_encoding_buckets": [64, 512], "token_generation_buckets": [
        256, 1024]})
    assert nc.context_buckets(explicit) == [64, 512]
    assert nc.token_buckets(explicit) == [256, 1024]


@pytest.mark.parametrize(
    "length,bucket",
    [(1, 128), (127, 128), (128, 256), (129, 256), (511, 512), (512, 1024), (1024, 1024)],
)
def test_bucket_choice_is_strict_first_fit_with_equality_at_the_top(length, bucket):
    assert nc.pick_bucket([128, 256, 512, 1024], length) == bucket


def test_bucket_choice_refuses_past_the_largest():
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        nc.pick_bucket([128, 256], 257)
