"""When the Neuron platform activates, and that it stays out of the way elsewhere.

The decision table runs with faked probe results; the CUDA/ROCm/XPU/TPU probes are
the only things faked (this machine has none of them). Fresh interpreters show what
vLLM itself then resolves, and that a host where we stay out gets no patch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from vllm_neuronx import activation
from vllm_neuronx.activation import Probes, decide

PLAIN_CPU = Probes(neuron_device=False, other_platforms=())
GPU = Probes(neuron_device=False, other_platforms=("cuda",))
NEURON = Probes(neuron_device=True, other_platforms=())
ARGV = ["vllm", "serve", "model"]


@pytest.mark.parametrize(
    "probes, env, argv, active, reason",
    [
        # The plain CPU machine: nothing else could serve, our CPU backend does.
        (PLAIN_CPU, {}, ARGV, True, "no Neuron device and no other vLLM platform"),
        (NEURON, {}, ARGV, True, "a Neuron device is present"),
        # A Neuron device wins over a GPU on the same host.
        (Probes(True, ("cuda",)), {}, ARGV, True, "a Neuron device is present"),
        # A GPU host where nothing asks for Neuron: vLLM keeps its platform.
        (GPU, {}, ARGV, False, "vLLM can use CUDA on this host"),
        (Probes(False, ("rocm", "xpu")), {}, ARGV, False, "vLLM can use ROCM, XPU"),
        (Probes(False, ("tpu",)), {}, ARGV, False, "vLLM can use TPU"),
        # Asked for, on a GPU host.
        (GPU, {"VLLM_NEURON_FRAMEWORK": "cpu"}, ARGV, True, "VLLM_NEURON_FRAMEWORK=cpu is set"),
        (GPU, {"VLLM_NEURONX_FORCE_BACKEND": "nxdi"}, ARGV, True,
         "VLLM_NEURONX_FORCE_BACKEND=nxdi is set"),
        (GPU, {}, [*ARGV, "--device", "neuron"], True, "--device neuron"),
        (GPU, {}, [*ARGV, "--device=neuron"], True, "--device neuron"),
        (GPU, {"VLLM_PLUGINS": "neuron"}, ARGV, True, "VLLM_PLUGINS names"),
        (GPU, {"VLLM_PLUGINS": "neuron_patches,neuron"}, ARGV, True, "VLLM_PLUGINS names"),
        # An empty variable asks for nothing; another device on the CLI neither.
        (GPU, {"VLLM_NEURON_FRAMEWORK": ""}, ARGV, False, "vLLM can use CUDA"),
        (GPU, {}, [*ARGV, "--device", "cpu"], False, "vLLM can use CUDA"),
        # VLLM_PLUGINS that leaves us out wins even on a Neuron host (vLLM would not
        # load our platform there; the general plugin must not patch either).
        (NEURON, {"VLLM_PLUGINS": "neuron_patches"}, ARGV, False, "leaves out"),
        (NEURON, {"VLLM_PLUGINS": ""}, ARGV, False, "leaves out"),
        # vLLM does not strip the names, so " neuron" does not name us for it either.
        (PLAIN_CPU, {"VLLM_PLUGINS": "x, neuron"}, ARGV, False, "leaves out"),
    ],
)
def test_decision_table(probes, env, argv, active, reason):
    decision = decide(probes, env, argv)
    assert decision.active is active
    assert reason in decision.reason


def test_staying_out_says_how_to_ask_for_neuron():
    reason = decide(GPU, {}, ARGV).reason
    for way in ("VLLM_NEURON_FRAMEWORK", "VLLM_PLUGINS=neuron", "--device neuron",
                "LLM(device='neuron') comes too late"):
        assert way in reason


@pytest.mark.parametrize(
    "argv, value",
    [
        (["vllm", "serve", "m"], None),
        (["vllm", "serve", "m", "--device", "neuron"], "neuron"),
        (["vllm", "serve", "m", "--device=neuron", "--device", "cpu"], "cpu"),
        (["vllm", "serve", "m", "--device"], None),  # argparse's error, not ours
        (["--device", "neuron"], None),  # argv[0] is the program
        ([], None),
    ],
)
def test_device_flag(argv, value):
    assert activation.device_flag(argv) == value


def test_plugin_name_is_our_entry_point():
    (ours,) = [e for e in entry_points(group="vllm.platform_plugins")
               if e.value == "vllm_neuronx:register"]
    assert ours.name == activation.PLUGIN_NAME


def test_other_platforms_are_what_vllms_own_probes_find(monkeypatch):
    import vllm.platforms as platforms

    def broken():
        raise RuntimeError("driver mismatch")

    probes = dict(platforms.builtin_platform_plugins)
    probes.update(cuda=lambda: "vllm.platforms.cuda.CudaPlatform", rocm=broken,
                  xpu=lambda: None, tpu=lambda: "vllm.platforms.tpu.TpuPlatform",
                  cpu=lambda: "vllm.platforms.cpu.CpuPlatform")
    monkeypatch.setattr(platforms, "builtin_platform_plugins", probes)
    # A probe that raises counts as not usable; vLLM's "cpu" probe never keeps us out.
    assert activation.other_platforms() == ("cuda", "tpu")


def test_this_machine_activates_on_the_cpu_backend():
    """What the README's commands and the whole suite rely on, with the real probes."""
    probes = activation.probe()
    if probes.other_platforms or probes.neuron_device:
        pytest.skip(f"not a plain CPU machine: {probes}")
    assert decide(probes, {}, ARGV).active


@pytest.fixture()
def records():
    """Records of our logger. vLLM configures logging at its import, which drops the
    handlers of loggers under "vllm": import it first."""
    import vllm.logger  # noqa: F401

    caught: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = caught.append
    logger = logging.getLogger(activation.logger.name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    activation.here.cache_clear()
    yield caught
    activation.here.cache_clear()
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_staying_out_logs_one_line_per_process(records, monkeypatch):
    monkeypatch.setattr(activation, "other_platforms", lambda: ("cuda",))
    monkeypatch.setattr(activation, "neuron_device_present", lambda: False)
    for var in ("VLLM_PLUGINS", "VLLM_NEURON_FRAMEWORK", "VLLM_NEURONX_FORCE_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", ARGV)
    import vllm_neuronx

    assert vllm_neuronx.register() is None
    assert vllm_neuronx.register() is None
    vllm_neuronx.register_patches()
    lines = [r for r in records if r.levelno >= logging.INFO]
    assert len(lines) == 1
    assert "stays out of the way: vLLM can use CUDA" in lines[0].getMessage()


# -- fresh interpreters: what vLLM resolves, and what it leaves unpatched ------------------------

PROBE = r"""
import json, sys
from vllm_neuronx import activation
if {fake_gpu}:
    activation.other_platforms = lambda: ("cuda",)  # the probe this machine cannot run
sys.argv = {argv}
import vllm.platforms
before = vllm.platforms._current_platform
from vllm import LLM  # noqa: F401  (imports vllm.engine.arg_utils)
resolved_at_import = before is None and vllm.platforms._current_platform is not None
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
try:  # upstream's own answer where we stay out
    EngineArgs(device="neuron")
    device_error = None
except TypeError as e:
    device_error = str(e)
except Exception:  # past the keyword (ours), then stopped by the absent default model
    device_error = None
print("RESULT", json.dumps({{
    "device_error": device_error,
    "platform": type(vllm.platforms.current_platform).__name__,
    "resolved_at_import": resolved_at_import,
    "engine_args_patched": bool(getattr(EngineArgs.__init__, "__neuronx_patched__", None)),
    "neuron_quant": "neuron_quant" in QUANTIZATION_METHODS,
}}))
"""


def resolve_in_fresh_process(*, fake_gpu: bool, argv=ARGV, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("VLLM_PLUGINS", "VLLM_NEURON_FRAMEWORK", "VLLM_NEURONX_FORCE_BACKEND")}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(fake_gpu=fake_gpu, argv=list(argv))],
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    result["log"] = out.stdout  # vLLM's handler writes to stdout
    return result


@pytest.mark.slow
def test_a_gpu_host_keeps_upstream_vllm_untouched():
    r = resolve_in_fresh_process(fake_gpu=True)
    # No real CUDA here, so vLLM falls back to its UnspecifiedPlatform: not ours.
    assert r["platform"] != "NeuronPlatform"
    assert not r["engine_args_patched"] and not r["neuron_quant"]  # neither entry point patched
    # So LLM(device="neuron") there is upstream's TypeError; the log line said how to ask.
    assert "unexpected keyword argument 'device'" in r["device_error"]
    assert r["log"].count("vllm-neuronx stays out of the way") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, env",
    [
        ([*ARGV, "--device", "neuron"], {}),
        (ARGV, {"VLLM_NEURON_FRAMEWORK": "neuronx-distributed-inference"}),
        (ARGV, {"VLLM_PLUGINS": "neuron,neuron_patches"}),
    ],
)
def test_a_gpu_host_serves_neuron_when_asked(argv, env):
    r = resolve_in_fresh_process(fake_gpu=True, argv=argv, **env)
    assert r["platform"] == "NeuronPlatform"
    assert r["engine_args_patched"] and r["neuron_quant"] and r["device_error"] is None
    assert "stays out of the way" not in r["log"]


@pytest.mark.slow
def test_llm_device_is_too_late_to_choose_the_platform():
    """``from vllm import LLM`` resolves the platform (vllm.engine.arg_utils reads
    current_platform at import), before any LLM(device=...) exists."""
    r = resolve_in_fresh_process(fake_gpu=False)
    assert r["resolved_at_import"]
    assert r["platform"] == "NeuronPlatform"  # this plain CPU machine: our CPU backend
