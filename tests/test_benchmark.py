"""``hepaseg benchmark``: every field present and positive, ratios = quotients, FLOPs and memory by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hepaseg.experiments.benchmark as bench
from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.models import build_model
from hepaseg.training import load_checkpoint

TINY = {"width": 4, "size": 64, "batch": 2, "repeats": 1, "quick": True, "attention": (16, 32, 2),
        "prepare_shape": (8, 64, 64), "predict_shape": (8, 64, 64), "predict_width": 4, "ratio_widths": (2,)}


@pytest.fixture(scope="module")
def result() -> dict:
    return bench.run_benchmark(["unet", "mfcnet"], **TINY)


def unet_flops(c_in: int, w: int, s: int) -> int:
    """Hand count (2 x MACs) of the five-level U-Net: 3 x 3 convs, 2 x 2 transposed convs, 1 x 1 head."""
    widths = [w * 2**i for i in range(5)]
    res = [s // 2**i for i in range(5)]
    total = 0
    c = c_in
    for wl, r in zip(widths, res):  # encoder DoubleConv: c -> wl -> wl
        total += 2 * 9 * r * r * (c * wl + wl * wl)
        c = wl
    for i in range(3, -1, -1):  # decoder level i from level i + 1
        up_out = widths[i + 1] // 2
        total += 2 * widths[i + 1] * up_out * 4 * res[i + 1] ** 2  # each input pixel feeds a 2 x 2 patch
        total += 2 * 9 * res[i] ** 2 * ((up_out + widths[i]) * widths[i] + widths[i] * widths[i])
    return total + 2 * widths[0] * 1 * s * s  # head


def context_block_flops(c: int, n: int, r: int = 8) -> int:
    """Hand count of what one context block's maths needs: Q/K 1 x 1 convs, Q K^T at the query width d,
    M F at the value width C, F F^T and the channel product (no zero-padded head)."""
    d = c // r
    qk = 2 * 2 * c * d * n
    spatial = 2 * n * n * d + 2 * n * n * c
    channel = 2 * c * c * n + 2 * c * c * n
    return qk + spatial + channel


def test_every_field_is_present_and_positive(result):
    assert set(result) == {"machine", "settings", "models", "ratios", "attention", "prepare", "prepare_workers",
                           "predict", "write"}
    m = result["machine"]
    assert m["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert m["torch"] == torch.__version__ and m["cpu_cores"] >= 1 and m["torch_threads"] >= 1 and m["cpu"]
    assert [row["name"] for row in result["models"]] == ["unet", "mfcnet"]
    for row in result["models"]:
        for key in ("params", "gflops", "fp32_ms_per_slice", "fp32_slices_per_s", "peak_memory_mb",
                    "train_fp32_ms_per_slice"):
            assert row[key] > 0, key
        assert row["fp32_ms_per_slice"] * row["fp32_slices_per_s"] == pytest.approx(1000.0)
        if row["bf16_ms_per_slice"] is None:
            assert row["bf16_note"].startswith("skipped")
        else:
            assert row["bf16_ms_per_slice"] > 0 and row["bf16_slices_per_s"] > 0 and row["bf16_speedup"] > 0
            assert row["bf16_speedup"] == pytest.approx(row["fp32_ms_per_slice"] / row["bf16_ms_per_slice"])
            assert row["train_bf16_ms_per_slice"] > 0
    (entry,) = result["ratios"]["by_width"]  # TINY asks for width 2 as well
    assert entry["width"] == 2 and set(entry["mfcnet_over_unet"]) == {f"{k}_time" for k, _, _ in bench.PASSES}
    for key, _, _ in bench.PASSES:
        m, u = entry["mfcnet"][f"{key}_ms_per_slice"], entry["unet"][f"{key}_ms_per_slice"]
        if u is not None:
            assert entry["mfcnet_over_unet"][f"{key}_time"] == pytest.approx(m / u)
    a = result["attention"]
    assert a["input_shape"] == [2, 32, 16, 16] and a["n"] == 256
    assert a["naive_matrix_mb"] == pytest.approx(2 * 256 * 256 * 4 / 2**20)
    for impl in ("chunked", "sdpa", "naive"):
        assert a[impl]["ms"] > 0 and a[impl]["peak_memory_mb"] > 0
        assert a[impl].get("bf16_ms", 1.0) > 0  # absent only where bf16 is unsupported
    # The naive path holds the (B, N, N) matrix (and its softmax and gradient) at its peak.
    assert a["naive"]["peak_memory_mb"] >= a["naive_matrix_mb"]
    p = result["prepare"]
    assert p["slices"] == 8 and p["seconds"] > 0 and p["slices_per_s"] == pytest.approx(8 / p["seconds"])
    m = result["prepare_workers"]
    assert m["cases"] == bench.PREPARE_CASES and m["shape"] == [8, 64, 64] and m["workers"] == 2
    assert m["slices"] == bench.PREPARE_CASES * 8 and m["identical_output"] is True
    assert m["speedup"] == pytest.approx(m["one"]["seconds"] / m["many"]["seconds"])
    for run in (m["one"], m["many"]):
        assert run["slices_per_s"] == pytest.approx(m["slices"] / run["seconds"])
        assert all(mb > 0 for mb in run["peak_rss_mb_per_worker"])
    assert 1 <= len(m["many"]["peak_rss_mb_per_worker"]) <= 2
    q = result["predict"]
    assert q["kind"] == "phantom" and q["shape"] == [8, 64, 64] and q["width"] == 4 and q["lesions"] == 0
    assert q["seconds"] > 0 and all(v >= 0 for v in q["timings"].values())
    w = result["write"]
    assert w["shape"] == [8, 64, 64] and w["mask"] == "i.i.d. speckle"
    # The speckle density of 8 M voxels in 3D-IRCADb 1.1 (33.8 M): about a quarter of the voxels.
    assert w["tumor_voxels"] == pytest.approx(8 * 64 * 64 * 8e6 / (129 * 512 * 512), rel=0.1)
    assert w["lesions"] > 0 and w["seconds"] >= sum(w["parts"].values()) > 0
    json.dumps(result)  # JSON-ready


def test_ratios_are_quotients_of_the_absolute_numbers(result):
    m, u = result["models"][1], result["models"][0]
    r = result["ratios"]["mfcnet_over_unet"]
    assert r["params"] == pytest.approx(m["params"] / u["params"])
    assert r["gflops"] == pytest.approx(m["gflops"] / u["gflops"])
    for key, _, _ in bench.PASSES:
        if u[f"{key}_ms_per_slice"] is not None:
            assert r[f"{key}_time"] == pytest.approx(m[f"{key}_ms_per_slice"] / u[f"{key}_ms_per_slice"])
    assert r["peak_memory"] == pytest.approx(m["peak_memory_mb"] / u["peak_memory_mb"])
    a = result["attention"]
    assert a["naive_over_sdpa"]["time"] == pytest.approx(a["naive"]["ms"] / a["sdpa"]["ms"])
    for impl in ("naive", "chunked"):
        ratio = a[f"{impl}_over_sdpa"]
        assert ratio["time"] == pytest.approx(a[impl]["ms"] / a["sdpa"]["ms"])
        assert ratio["memory"] == pytest.approx(a[impl]["peak_memory_mb"] / a["sdpa"]["peak_memory_mb"])


def test_flops_match_hand_counts(result):
    unet, mfcnet = result["models"]
    assert unet["gflops"] * 1e9 == pytest.approx(unet_flops(1, 4, 64), rel=1e-12)
    # MFCNet = U-Net + blocks at 1/4, 1/8, 1/16 (C = 16, 32, 64; N = 16^2, 8^2, 4^2).
    extra = sum(context_block_flops(c, n) for c, n in ((16, 256), (32, 64), (64, 16)))
    assert mfcnet["gflops"] * 1e9 == pytest.approx(unet_flops(1, 4, 64) + extra, rel=1e-12)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    assert bench.count_flops(conv, torch.zeros(1, 3, 10, 12)) == 2 * 3 * 5 * 9 * 10 * 12


def test_params_match_the_registry(result):
    for row in result["models"]:
        net = build_model(row["name"], base_width=4)
        assert row["params"] == sum(p.numel() for p in net.parameters())


def test_peak_memory_is_the_running_maximum():
    cpu = torch.device("cpu")

    def both_alive():
        a = torch.ones(250_000)  # 1 MB
        b = torch.ones(500_000)  # 2 MB
        del a, b

    def one_after_the_other():
        a = torch.ones(250_000)
        del a
        b = torch.ones(500_000)
        del b

    assert 3_000_000 <= bench.peak_memory_bytes(both_alive, cpu) < 3_100_000
    assert 2_000_000 <= bench.peak_memory_bytes(one_after_the_other, cpu) < 2_100_000


def test_median_seconds_runs_warmup_then_repeats():
    calls = []
    seconds = bench.median_seconds(lambda: calls.append(1), repeats=3, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 5 and seconds >= 0


def test_untrained_checkpoint_loads_with_its_data_options(tmp_path):
    path = bench.write_untrained_checkpoint(tmp_path / "c.ckpt", model="mfcnet", width=4, data_options={"size": 48})
    loaded = load_checkpoint(path)
    assert loaded.model_name == "mfcnet" and loaded.base_width == 4 and loaded.in_channels == 3
    assert loaded.data_options["size"] == 48 and loaded.data_options["window"] == [-200.0, 250.0]
    quiet = load_checkpoint(bench.write_untrained_checkpoint(tmp_path / "q.ckpt", width=4, head_bias=-4.0))
    with torch.no_grad():
        logits = quiet.model(torch.rand(2, 3, 32, 32))
    assert torch.equal(logits, torch.full_like(logits, -4.0))


def test_find_ircadb_prefers_the_environment(tmp_path, monkeypatch):
    (tmp_path / "3Dircadb1.1").mkdir()
    monkeypatch.setenv("HEPASEG_SHARED_DATA", str(tmp_path))
    assert bench.find_ircadb() == tmp_path / "3Dircadb1.1"


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(HepasegError, match="unknown model 'nosuch': expected one of mfcnet, unet"):
        bench.run_benchmark(["nosuch"], **TINY)
    with pytest.raises(HepasegError, match="--width: expected a positive integer, got 0"):
        bench.run_benchmark(["unet"], **{**TINY, "width": 0})
    with pytest.raises(HepasegError, match="--clock: expected wall or cpu, got 'gpu'"):
        bench.run_benchmark(["unet"], **{**TINY, "clock": "gpu"})
    with pytest.raises(HepasegError, match="--threads: expected a positive integer, got 0"):
        bench.run_benchmark(["unet"], **{**TINY, "threads": 0})


def test_interleaved_medians_time_each_entry_in_turn():
    calls = []
    medians = bench.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                        repeats=3, warmup=1, device=torch.device("cpu"), clock="cpu")
    assert calls == ["a", "b"] + ["a", "b"] * 3 and set(medians) == {"a", "b"}


def test_cli_json_and_out(result, tmp_path, monkeypatch):
    seen = {}

    def fake_run(models, **kwargs):  # the real run is covered above; here only the wiring
        seen.update(models=models, **kwargs)
        return result

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["benchmark", "--json", "--models", "unet,mfcnet", "--width", "4", "--quick",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == json.loads(json.dumps(result))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert seen["models"] == ["unet", "mfcnet"] and seen["width"] == 4 and seen["quick"] is True
    res = CliRunner().invoke(app, ["benchmark", "--models", "all"])
    assert res.exit_code == 0 and seen["models"] is None
    assert "mfcnet / unet" in res.stdout and "naive / sdpa" in res.stdout and "chunked / sdpa" in res.stdout
    assert "by width" in res.stdout and "train fp32" in res.stdout
    res = CliRunner().invoke(app, ["benchmark", "--models", "unet,mfcnet", "--ratio-widths", "32,64", "--clock",
                                   "cpu", "--threads", "1"])
    assert res.exit_code == 0 and seen["ratio_widths"] == [32, 64] and seen["clock"] == "cpu" and seen["threads"] == 1
    res = CliRunner().invoke(app, ["benchmark", "--ratio-widths", "32,x"])
    assert res.exit_code == 1 and "error: --ratio-widths: expected comma-separated positive integers" in res.output
