"""The neuron config vLLM derives, how overrides merge, and what is refused."""

from __future__ import annotations

import json

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


# -- the override keys: NxDI's own, read from its source ---------------------------------------
HEAD_ONLY_KEYS = (
    "qkv_nki_kernel_enabled", "mlp_tkg_nki_kernel_enabled", "attn_block_cte_nki_kernel_enabled",
    "is_eagle3", "padded_hidden_size", "lm_head_pad_alignment_size", "tensor_replacement_config",
)

# A NeuronConfig written the ways NxDI's releases take keys: popped from **kwargs,
# tested with `in`, read in a helper that is handed the dict, named parameters of a
# subclass, a base reached through super(), and another class's from_kwargs (NxD core).
SYNTHETIC_NXDI = '''
import logging

class NeuronConfig:
    def __init__(self, **kwargs):
        self.batch_size = kwargs.pop("batch_size", 1)
        if "torch_dtype" in kwargs:
            self.torch_dtype = kwargs.pop("torch_dtype")
        self.seq_len = kwargs.get("seq_len", 128)
        self.lnc = self._lnc(kwargs)
        other = {"not_a_key": 1}
        other.pop("not_a_key")
        self.sampling = OnDeviceSamplingConfig(**self.sampling_dict)
        if kwargs:
            logging.warning(f"Unexpected keyword arguments: {kwargs}")

    def _lnc(self, kwargs):
        if "logical_neuron_cores" in kwargs:
            return kwargs["logical_neuron_cores"]
        return kwargs.pop("logical_nc_config", 1)

    def unrelated(self, **options):
        return options.pop("never_a_key", None)


class MoENeuronConfig(NeuronConfig):
    def __init__(self, capacity_factor=None, glu_mlp=True, **kwargs):
        self.normalize_top_k_affinities = not kwargs.pop("disable_normalize_top_k_affinities")
        self.router_config = RouterConfig.from_kwargs(**kwargs)
        super().__init__(**kwargs)


class OnDeviceSamplingConfig:
    def __init__(self, **kwargs):
        self.top_k = kwargs.pop("top_k", 1)


class LoraServingConfig:
    def __init__(self, max_loras: int = 1, lora_ckpt_paths=None):
        self.max_loras = max_loras
'''
SYNTHETIC_NXD = '''
class RouterConfig:
    def __init__(self, act_fn, dtype):
        self.act_fn = act_fn

    @staticmethod
    def from_kwargs(**kwargs):
        return RouterConfig(kwargs.pop("router_act_fn", "softmax"), kwargs.pop("router_dtype"))
'''


def test_reader_finds_every_way_a_key_is_taken_and_nothing_else():
    from vllm_neuronx import nxdi_keys

    keys = nxdi_keys.read_keys([SYNTHETIC_NXDI], [SYNTHETIC_NXD])
    assert keys["NeuronConfig"] == ("batch_size", "logical_nc_config", "logical_neuron_cores",
                                    "seq_len", "torch_dtype")
    assert keys["MoENeuronConfig"] == ("capacity_factor", "disable_normalize_top_k_affinities",
                                       "glu_mlp", "router_act_fn", "router_dtype")
    assert keys["OnDeviceSamplingConfig"] == ("top_k",)
    assert keys["LoraServingConfig"] == ("lora_ckpt_paths", "max_loras")
    assert keys["renamed"] == {
        "normalize_top_k_affinities": "not disable_normalize_top_k_affinities"}
    assert "ChunkedPrefillConfig" not in keys  # a class the source lacks is left out
    # without NxD core's source the router keys cannot be known
    assert "router_act_fn" not in nxdi_keys.read_keys([SYNTHETIC_NXDI])["MoENeuronConfig"]


def test_generated_table_records_its_sources_and_has_the_head_only_keys():
    from vllm_neuronx import nxdi_keys
    from vllm_neuronx import nxdi_keys_table as table

    assert set(table.SUPPORTED) <= set(table.RELEASES)
    for release in table.RELEASES.values():
        for field in ("nxdi_commit", "nxd_commit"):
            assert len(release[field]) == 40 and int(release[field], 16) >= 0
        assert "nxdi:models/config.py" in release["files"]
    main = table.RELEASES["main"]["keys"]
    assert set(HEAD_ONLY_KEYS) <= set(main["NeuronConfig"])
    oldest = table.RELEASES[next(iter(table.RELEASES))]["keys"]["NeuronConfig"]
    assert not set(HEAD_ONLY_KEYS) & set(oldest)
    assert {"router_act_fn", "capacity_factor"} <= set(main["MoENeuronConfig"])
    assert set(nc.ON_DEVICE_SAMPLING_DEFAULTS) <= set(main["OnDeviceSamplingConfig"])
    # no NxDI here: the check takes the supported releases' keys
    assert nxdi_keys.installed() is None
    assert set(HEAD_ONLY_KEYS) <= nc.NEURON_CONFIG_KEYS
    cfg = resolve({key: None for key in HEAD_ONLY_KEYS} | {"padded_hidden_size": 4096})
    assert cfg["padded_hidden_size"] == 4096


def test_committed_table_is_the_generators_output():
    """The table module is exactly what scripts/nxdi_keys.py renders from its data (no
    hand edits); the script's --check re-reads NxDI's git history at the recorded commits."""
    import importlib.util
    import pathlib

    from vllm_neuronx import nxdi_keys_table as table

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "nxdi_keys.py"
    spec = importlib.util.spec_from_file_location("nxdi_keys_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.render(table.RELEASES, table.SUPPORTED) == pathlib.Path(
        table.__file__).read_text(encoding="utf-8")
    assert table.SUPPORTED == script.SUPPORTED
    assert [e["sdk"] for e in table.RELEASES.values()] == [r[0] for r in script.RELEASES]


@pytest.mark.parametrize(
    "overrides,what,typo,nearest",
    [
        ({"qkv_nki_kernel_enable": True}, "override_neuron_config", "qkv_nki_kernel_enable",
         "'qkv_nki_kernel_enabled'"),
        ({"lm_head_pad_alignment": 2}, "override_neuron_config", "lm_head_pad_alignment",
         "'lm_head_pad_alignment_size'"),
        ({"logical_nc_cnfig": 2}, "override_neuron_config", "logical_nc_cnfig",
         "'logical_nc_config'"),
        ({"on_device_sampling_config": {"top_k_kernel_enable": False}},
         "on_device_sampling_config", "top_k_kernel_enable", "'top_k_kernel_enabled'"),
        ({"lora_config": {"max_lora": 2}}, "lora_config", "max_lora", "'max_loras'"),
    ],
)
def test_a_typo_names_the_key_and_the_nearest_valid_ones(overrides, what, typo, nearest):
    with pytest.raises(nc.NeuronConfigError) as e:
        resolve(overrides)
    message = str(e.value)
    assert message.startswith(f"unknown {what} key {typo!r}; did you mean ")
    assert nearest in message and "as committed in nxdi_keys_table.py" in message


def test_device_only_keys_follow_the_rule_and_the_list():
    from vllm_neuronx import nxdi_keys
    from vllm_neuronx import nxdi_keys_table as table

    main = set(table.RELEASES["main"]["keys"]["NeuronConfig"])
    only = set(nxdi_keys.device_only(main))
    assert {"qkv_nki_kernel_enabled", "attn_kernel_enabled", "cc_pipeline_tiling_factor",
            "logical_nc_config", "switch_cc", "cp_degree", "padded_hidden_size"} <= only
    assert not {"tp_degree", "batch_size", "seq_len", "enable_bucketing", "torch_dtype",
                "on_device_sampling_config", "output_logits", "quantized_mlp_kernel_enabled",
                "speculation_length", "qk_layernorm"} & only
    assert set(nxdi_keys.DEVICE_ONLY_KEYS) <= main | set(
        table.RELEASES["main"]["keys"]["MoENeuronConfig"])  # no stale names in the list


def test_a_device_only_key_on_the_cpu_backend_is_accepted_with_one_log_line():
    import logging

    from vllm_neuronx.backends.cpu import backend as cpu

    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger(cpu.logger.name)
    handler, level = Lines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    cpu._note_device_only.cache_clear()
    try:
        cfg = resolve({"qkv_nki_kernel_enabled": True, "logical_nc_config": 2,
                       "cc_pipeline_tiling_factor": 1, "enable_bucketing": False}, tp_degree=1)
        for _ in range(3):  # the platform, the engine and the backend each validate
            cpu.CpuBackend.validate(cfg)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    said = [line for line in lines if "no effect on the CPU" in line]
    assert len(said) == 1
    assert ("cc_pipeline_tiling_factor, logical_nc_config, qkv_nki_kernel_enabled" in said[0]
            and "enable_bucketing" not in said[0])


@pytest.fixture()
def nxdi_sim():
    from tests.engine_checks import use_simulator

    yield from use_simulator("neuronx_distributed_inference", "nxdi")


def test_the_simulator_takes_exactly_the_keys_of_nxdi_main(nxdi_sim):
    """vllm_neuronx's reader finds in the simulator's source the keys it found in NxDI's
    main branch: the simulator refuses what NxDI would drop, and nothing NxDI takes."""
    from vllm_neuronx import nxdi_keys
    from vllm_neuronx import nxdi_keys_table as table

    keys = nxdi_keys.installed()
    assert keys is not None and keys.origin == "the installed NxDI 0.0.0+simulator"
    main = nxdi_keys.key_set("main", table.RELEASES["main"]["keys"])
    assert keys.top == main.top
    for nested in ("on_device_sampling_config", "lora_config"):
        assert keys.nested[nested] == main.nested[nested]
    assert keys.renamed == main.renamed
    # the check now follows the installed NxDI
    with pytest.raises(nc.NeuronConfigError, match="installed NxDI 0.0.0"):
        resolve({"qkv_nki_kernel_enable": True})
    from neuronx_distributed_inference.models.config import NeuronConfig

    with pytest.raises(TypeError, match="qkv_nki_kernel_enable"):
        NeuronConfig(qkv_nki_kernel_enable=True)


def test_a_stored_nxdi_config_keeps_every_key(nxdi_sim, tmp_path):
    """A neuron_config.json NxDI saved (here the simulator, which saves every field as
    NxDI does) reads back with every key, HEAD-only and weight-shape keys included, and
    the values it was compiled with."""
    from neuronx_distributed_inference.models.config import InferenceConfig, MoENeuronConfig

    from vllm_neuronx import artifacts, nxdi_keys
    from vllm_neuronx.backends.nxdi import NxdiBackend

    compiled = MoENeuronConfig(
        batch_size=2, seq_len=64, torch_dtype="float32", is_continuous_batching=True,
        padded_hidden_size=128, padded_intermediate_size=256, lm_head_pad_alignment_size=4,
        qkv_nki_kernel_enabled=True, logical_nc_config=2, capacity_factor=2.0,
        disable_normalize_top_k_affinities=True,
        on_device_sampling_config={"dynamic": True, "global_topk": 64})
    InferenceConfig(compiled, load_config=lambda c: None).save(str(tmp_path))
    saved = json.loads((tmp_path / "neuron_config.json").read_text())["neuron_config"]

    stored = NxdiBackend.stored_config(str(tmp_path))
    keys = nxdi_keys.current()
    # Every key NxDI takes is kept, and one saved under another attribute name
    # (normalize_top_k_affinities) goes back under its key.
    assert set(stored) == set(saved) & keys.top | {"disable_normalize_top_k_affinities"}
    assert stored["disable_normalize_top_k_affinities"] is True
    assert {k: stored[k] for k in ("padded_hidden_size", "padded_intermediate_size",
                                   "lm_head_pad_alignment_size", "qkv_nki_kernel_enabled",
                                   "logical_nc_config", "capacity_factor")} == {
        "padded_hidden_size": 128, "padded_intermediate_size": 256,
        "lm_head_pad_alignment_size": 4, "qkv_nki_kernel_enabled": True,
        "logical_nc_config": 2, "capacity_factor": 2.0}
    assert stored["on_device_sampling_config"]["global_topk"] == 64
    monkey = pytest.MonkeyPatch()
    monkey.setenv("NEURON_COMPILED_ARTIFACTS", str(tmp_path))
    try:
        folder, config = artifacts.precompiled_config("nxdi", NxdiBackend.stored_config)
    finally:
        monkey.undo()
    assert folder == str(tmp_path) and config == stored

    # What NxDI saves under another name than its key goes back under the key; the rest
    # is what NxDI derives again.
    rebuilt, derived = nxdi_keys.stored_keywords(saved, keys)
    assert rebuilt["disable_normalize_top_k_affinities"] is True
    assert set(rebuilt) | set(derived) >= set(saved) - {"normalize_top_k_affinities"}
    assert set(derived) == {"enable_token_tree", "is_chunked_prefill", "kv_cache_tiling"}
    again = MoENeuronConfig(**rebuilt)  # the simulator refuses any key NxDI would drop
    assert vars(again).keys() == vars(compiled).keys()
    assert again.normalize_top_k_affinities is False and again.padded_hidden_size == 128


def test_our_artifacts_keep_every_key(tiny_llama, tmp_path, monkeypatch):
    """Our manifest stores the resolved config whole: device-only and HEAD-only keys too."""
    from vllm_neuronx import artifacts
    from vllm_neuronx.backends.cpu.backend import CpuBackend
    from vllm_neuronx.loader import load_backend
    from vllm_neuronx.platform_config import NeuronSettings

    overrides = {key: None for key in HEAD_ONLY_KEYS} | {
        "padded_hidden_size": 128, "logical_nc_config": 2, "cc_pipeline_tiling_factor": 1}
    overrides.pop("is_eagle3")  # speculation: refused on the CPU backend
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64,
                                   dtype="float32", overrides=overrides)
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(tmp_path / "a"))
    load_backend(tiny_llama, NeuronSettings("cpu", "cpu", "cpu", cfg))
    folder, stored = artifacts.precompiled_config("cpu", CpuBackend.stored_config)
    assert stored == cfg
