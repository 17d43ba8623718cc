"""The benchmarks run in their smallest mode and print one JSON line last with sane values.

Nothing here is timed: speeds are only checked to be positive. The real-size figures are in
docs/benchmarks.md.
"""

import json

import pytest
import torch


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert out, "the benchmark printed nothing"
    return json.loads(out[-1])


def test_decode_tiny_cached_equals_naive(capsys):
    from bench import decode

    decode.main(["--tiny", "--new-tokens", "8"])
    result = _last_json(capsys)
    assert result["bench"] == "decode" and result["machine"]["cores"] >= 1
    for name in ("cached", "naive", "generate"):
        assert result[name]["tokens"] == 8
        assert result[name]["tokens_per_s"] > 0 and result[name]["ttft_s"] > 0
        assert len(result[name]["load_before"]) == 3
    # Greedy decoding: the KV cache, the uncached loop and plain generate agree token for token.
    assert result["cached_matches_naive"] is True and result["first_mismatch_naive"] is None
    assert result["cached_matches_generate"] is True
    assert result["image_tokens"] == 49 and result["prompt_tokens"] > 49  # 7x7 patches, no CLS (LLaVA's default)
    t = result["prompt_tokens"]
    assert result["three_pass"]["sequence_lengths"] == [t, 2 * t, 3 * t]
    assert result["speedup_cached_vs_naive"] > 0


def test_precision_tiny_all_four(capsys):
    from bench import precision

    precision.main(["--tiny", "--new-tokens", "4"])
    result = _last_json(capsys)
    assert result["bandwidth"]["read_gb_s"] > 0
    rows = {r["precision"]: r for r in result["precisions"]}
    assert set(rows) == {"fp32", "bf16", "int8", "nf4"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["decode_tokens_per_s"] > 0 and row["new_tokens"] == 4
        assert row["finite_logits"] is True
        assert 0 < row["fraction_of_limit"]
    # Bytes read per token follow the storage width.
    assert rows["fp32"]["bytes_per_token"] > rows["bf16"]["bytes_per_token"] > rows["int8"]["bytes_per_token"]


def test_memory_tiny_runs_every_variant(capsys):
    from bench import memory

    memory.main(["--tiny", "--new-tokens", "4"])
    result = _last_json(capsys)
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"single", "one_copy", "two_copies"}
    for row in runs.values():
        assert "error" not in row, row
        assert row["peak_rss_gb"] > 0 and row["draft_chars"] >= 0 and row["final_chars"] >= 0


def test_gpu_check_tiny_on_cpu(capsys):
    from bench import gpu_check

    gpu_check.main(["--tiny", "--steps", "1", "--batch", "2", "--gen-tokens", "4"])
    result = _last_json(capsys)
    assert result["quantized_linears"] > 0  # the 4-bit path really ran
    assert result["trainable_params"] > 0
    assert result["train"]["steps"] == 1 and result["train"]["finite_loss"] is True
    assert result["train"]["samples_per_s"] > 0 and result["train"]["model_flops_per_step"] > 0
    assert result["generate"]["tokens"] == 4
    if not torch.cuda.is_available():
        assert result["train"]["mfu"] is None  # no bf16 peak for a CPU


def test_card_peaks_by_name():
    from bench.gpu_check import card_peak_tflops

    assert card_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert card_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert card_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert card_peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert card_peak_tflops("Some Future Card") is None


def test_memory_fit_extrapolates_linearly():
    from bench.memory import fit

    rows = [dict(variant="single", layers=4, peak_rss_gb=3.0), dict(variant="single", layers=8, peak_rss_gb=5.0)]
    line = fit(rows, "single", 32)
    assert line["gb_per_layer"] == pytest.approx(0.5) and line["peak_rss_gb"] == pytest.approx(17.0)
    assert fit(rows[:1], "single", 32) is None


def test_need_memory_refuses_clearly():
    from bench.common import need_memory

    with pytest.raises(SystemExit, match="not enough free memory for a test: needs about"):
        need_memory(10**6, "a test")


def test_real_size_builder_shapes_and_bytes():
    """The real-size builder at toy shapes: LoRA before int8, finite logits, bytes per token counted."""
    from bench import common
    from mmft.config import MMFTConfig
    from mmft.loading import lora_config

    config = common.small_phi3_config()
    lm = common.build_real_lm(precision="int8", config=config, lora=lora_config(MMFTConfig(lora_r=4)))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits
        with lm.disable_adapter():
            base = lm(input_ids=ids).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, base)  # the adapter does something
    per_layer = common.lm_param_count(config)
    weights = per_layer["layer_linear"] + per_layer["lm_head"]
    assert common.bytes_per_token(lm, config, kv_tokens=0) >= weights  # int8: about a byte a weight


def test_precision_paired_tiny(capsys):
    from bench import precision

    precision.main(["--tiny", "--paired", "--precisions", "fp32,int8", "--rounds", "1", "--new-tokens", "2"])
    paired = _last_json(capsys)["paired"]
    assert set(paired["decode_tokens_per_s"]) == {"fp32", "int8"}
    assert all(v > 0 for runs in paired["decode_tokens_per_s"].values() for v in runs)
    assert len(paired["ratio_vs_first"]["int8"]) == 1


def test_side_by_side_tiny(capsys):
    """mmft rows (the app's default, its unquantized reference) always; llama.cpp only where built."""
    import os

    from bench import side_by_side

    side_by_side.main(["--tiny", "--threads", "1", "--new-tokens", "2", "--mmft", "float32:int8,float32:none"])
    result = _last_json(capsys)
    rows = {r["precision"]: r for r in result["rows"] if r["engine"] == "mmft"}
    assert set(rows) >= {"int8 (float32)", "float32"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["decode_tokens_per_s"] > 0 and row["prefill_s"] > 0 and row["new_tokens"] == 2
        assert row["rss_three_rounds_gb"] > 0 and row["peak_rss_gb"] > 0
    assert rows["int8 (float32)"]["int8_linears"] == 2 * 4 + 1 and rows["float32"]["int8_linears"] == 0
    acc = {a["row"]: a for a in result["accuracy"]}
    assert acc["int8 (float32)"]["reference"] == "float32" and acc["int8 (float32)"]["max_abs_logit_diff"] > 0
    assert 0 <= acc["int8 (float32)"]["top1_agree"] <= 1
    goals = result["goal_check"]
    assert goals["default"] == side_by_side.default_spec()
    if goals["default"] in ("float32:int8",):  # the default row ran here: the pipeline was timed
        assert goals["image_question_s"]["value"] > 0
        pipe = rows["int8 (float32)"]["pipeline"]  # timed warm: after a first, shorter question
        assert pipe["warm_up_1_plus_1_tokens_s"] > 0 and pipe["total_s"] == goals["image_question_s"]["value"]
    if not os.environ.get("MMFT_LLAMA_CPP"):
        assert "llama.cpp half skipped" in result["llama_cpp"]
        assert not [r for r in result["rows"] if r["engine"] == "llama.cpp"]
    else:
        assert {r["precision"] for r in result["rows"] if r["engine"] == "llama.cpp"} == {"Q4_K_M", "Q8_0"}


def test_load_memory_tiny_both_loaders(capsys):
    """The streamed int8 load and transformers' load + quantize, each in its own process, three rounds."""
    from bench import load_memory

    load_memory.main(["--tiny", "--threads", "1"])
    result = _last_json(capsys)
    rows = {r["loader"]: r for r in result["rows"]}
    assert set(rows) == {"streamed", "transformers"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["answered"] is True and row["int8_linears"] == 2 * 4 + 1
        assert 0 < row["rss_1_gb"] <= row["peak_three_rounds_gb"] <= row["peak_after_answer_gb"]


def test_kernels_tiny_rows_and_errors(capsys):
    """Every kernel row runs at toy shapes; errors are each kernel's own rounding, bytes as packed."""
    from bench import kernels

    kernels.main(["--tiny", "--repeats", "1", "--copies", "2"])
    rows = {r["kernel"].split(" ")[0] + " " + r["kernel"].split(" ")[1]: r for r in _last_json(capsys)["rows"]}
    assert all(r["decode_ms"] > 0 and r["prefill_ms"] > 0 for r in rows.values())
    assert rows["fp32 F.linear"]["error"] == 0
    # bf16 keeps 8 mantissa bits (2^-8 = 0.004 relative per product, averaging down over K);
    # int8 per-channel with 7-bit activations ~0.02 (8-bit about half); int4 g128 ~0.1 (measured 0.12 here).
    assert rows["bf16 F.linear"]["error"] < 0.01
    assert all(rows[k]["error"] < 0.05 for k in ("int8 fbgemm", "int8 fbgemm,", "int8 oneDNN,", "int8 weight-only"))
    assert rows["int8 fbgemm"]["weight_mb"] == rows["int8 oneDNN,"]["weight_mb"] == rows["int8 fbgemm,"]["weight_mb"]
    assert 0.02 < rows["int4 g128"]["error"] < 0.25
    mb = [rows[k]["weight_mb"] for k in ("fp32 F.linear", "bf16 F.linear", "int8 fbgemm", "int4 g128")]
    assert mb == sorted(mb, reverse=True) and mb[0] > 6 * mb[3]  # 4, 2, 1 and ~0.53 bytes a weight


def test_int4_pack_matches_its_dequantization():
    """The int4 layout is understood: the kernel equals F.linear on the dequantized weight, up to
    bf16 activations (relative 2^-8 per element; 0.02 leaves 5x margin over the measured ~0.004)."""
    from bench.kernels import GROUP, int4_pack

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 512, generator=g) * 0.02, torch.randn(3, 512, generator=g)
    packed, sz = int4_pack(w)
    y = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, GROUP, sz).float()
    groups = w.reshape(256, -1, GROUP)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    deq = (((groups - lo) / scale).round().clamp(0, 15) * scale + lo).reshape(256, 512)
    ref = torch.nn.functional.linear(x, deq)
    assert float((y - ref).abs().max() / ref.abs().max()) < 0.02


def test_machine_survives_a_torch_without_the_private_cpu_probes(monkeypatch):
    """bench.common.machine() reads torch's private torch.cpu._is_* probes: a torch without them (or
    one that raises) gives None for that field, not an AttributeError that stops every bench."""
    from bench import common

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert common.machine()["cpu_avx512_bf16"] is None

    def broken():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert common.machine()["cpu_avx512_bf16"] is None


def test_machine_records_the_int8_activation_bits():
    """int8's figures (speed, error) depend on the activation bits this CPU's kernel takes: every bench says."""
    from bench import common
    from mmft.quantize import activation_bits

    assert common.machine()["int8_activation_bits"] == activation_bits() in (7, 8)


def test_goal_check_takes_the_same_statistic_for_both_engines():
    """With --rounds 2 the check took mmft's first row and llama.cpp's best: a fail where mmft led in
    every round (4.0 vs 3.8, then 4.6 vs 4.2). Now the best of each."""
    from bench.side_by_side import goal_check

    def mmft(decode):
        return dict(engine="mmft", spec="float32:int8", precision="int8 (float32)", decode_tokens_per_s=decode,
                    prefill_s=1.0, peak_rss_gb=5.0, rss_one_round_gb=4.9, rss_three_rounds_gb=5.0)

    def q4(decode):
        return dict(engine="llama.cpp", precision="Q4_K_M", decode_tokens_per_s=decode)

    check = goal_check([mmft(4.0), q4(3.8), mmft(4.6), q4(4.2)], "float32:int8")
    assert check["decode_tokens_per_s"] == dict(value=4.6, llama_cpp_q4_k_m=4.2, met=True)
    assert goal_check([mmft(4.0), q4(4.3), mmft(4.1), q4(3.9)], "float32:int8")["decode_tokens_per_s"]["met"] is False


def test_a_kept_folder_of_another_shape_is_refused(tmp_path):
    """--keep reused whatever weights the folder held: a 2-layer toy was timed and labelled as Phi-3.5."""
    from bench import common
    from bench.side_by_side import kept_shape_error, tiny_config

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    assert kept_shape_error(tmp_path, tiny_config()) is None
    message = kept_shape_error(tmp_path, common.phi35_config(1))
    assert message.startswith(f"--keep {tmp_path} holds another model (saved, asked): ")
    assert "'num_hidden_layers': (2, 1)" in message and "'hidden_size': (256, 3072)" in message


def test_a_workers_peak_rss_is_its_own_not_its_parents():
    """ru_maxrss carries the parent's peak across fork + exec: every bench.precision worker started after
    the parent's 1 GiB bandwidth probe reported at least that. VmHWM is the process's own."""
    import os
    import subprocess
    import sys

    import numpy as np

    from bench import common

    ballast = np.ones(1_500_000_000, dtype=np.uint8)  # 1.5 GB touched: the parent's peak is at least that
    parent = common.peak_rss_gb()
    child = subprocess.run([sys.executable, "-c", "from bench.common import peak_rss_gb; print(peak_rss_gb())"],
                           capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    del ballast
    assert parent > 1.5 and float(child.stdout) < parent - 1.0, (parent, child.stdout)


def test_decode_and_memory_default_to_the_apps_cpu_path():
    from bench.decode import default_precision

    assert default_precision() == "int8"  # tests pin the CPU without AMX: int8 linears, fp32 around them


@pytest.mark.parametrize("script, argv, message", [
    ("decode", ["--tiny", "--new-tokens", "0"], "argument --new-tokens: '0' is not a positive whole number"),
    ("decode", ["--tiny", "--threads", "-1"], "argument --threads: '-1' is not a positive whole number"),
    ("side_by_side", ["--tiny", "--new-tokens", "0"], "argument --new-tokens: '0' is not a positive whole number"),
    ("kernels", ["--tiny", "--repeats", "0"], "argument --repeats: '0' is not a positive whole number"),
    ("kernels", ["--tiny", "--prefill", "-5"], "argument --prefill: '-5' is not a positive whole number"),
    ("memory", ["--tiny", "--layers", "4,abc"], "argument --layers: 'abc' is not a positive whole number"),
    ("memory", ["--tiny", "--variants", "bogus"], "unknown variants ['bogus']; choose from"),
    ("train_speed", ["--steps", "0"], "argument --steps: '0' is not a positive whole number"),
    ("llama_cpp_export", ["--llama-cpp", "/nonexistent"],
     "--llama-cpp /nonexistent: no /nonexistent/convert_hf_to_gguf.py"),
])
def test_a_bad_flag_value_is_one_usage_line_before_any_work(script, argv, message, capsys):
    """Each was a traceback after minutes of building (or, for memory's variants, a row of errors, exit 0)."""
    import importlib

    module = importlib.import_module(f"bench.{script}")
    with pytest.raises(SystemExit) as done:
        module.main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err and message in err, err  # the program name is pytest's here
