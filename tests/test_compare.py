"""compare(): one protocol for several models, Table 1 over seeds, Wilcoxon tests, resuming, the CLI.

One comparison (unet and mfcnet at width 4, 2 seeds, 2 epochs on a 32 x 32 synthetic dataset)
is run once per module; tests that change its directory work on a copy.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon
from typer.testing import CliRunner

import hepaseg.experiments
import hepaseg.training
from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.experiments import compare, parse_models, wilcoxon_vs
from hepaseg.models import build_model, count_parameters, list_models

MODELS = ["unet", "mfcnet"]
OVERRIDES = {"batch_size": 2, "lr": 1e-2, "augment": False, "precision": "32"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny convolutions gain nothing from threads, and on a busy shared machine OpenMP
    threads waiting for each other make a step ~100x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_split_dataset(root: Path) -> Path:
    """5 cases x 6 slices (32 px, K = 1): 2 train, 1 test, 1 val, 1 unlabelled test; flagged demo_z_split."""
    make_tiny_dataset(root, n_cases=5)
    manifest = json.loads((root / "manifest.json").read_text())
    for case, split in zip(manifest["cases"], ["train", "train", "test", "test", "val"]):
        case["split"] = split
    manifest["cases"][3]["has_label"] = False
    manifest["demo_z_split"] = True
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def run_compare(data: Path, out: Path, monkeypatch: pytest.MonkeyPatch, **kwargs):
    """compare() with hepaseg.training.train wrapped to record every TrainConfig it gets."""
    calls = []
    real = hepaseg.training.train

    def counting(config):
        calls.append(config)
        return real(config)

    monkeypatch.setattr(hepaseg.training, "train", counting)
    options = {"models": ",".join(MODELS), "seeds": 2, "width": 4, "max_epochs": 2, "train_overrides": OVERRIDES,
                   "timing_repeats": 2}
    options.update(kwargs)
    result = compare(data, out, **options)
    monkeypatch.setattr(hepaseg.training, "train", real)
    return result, calls


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    data = make_split_dataset(base / "data")
    with pytest.MonkeyPatch.context() as mp:
        result, calls = run_compare(data, base / "cmp", mp)
    return data, base / "cmp", result, calls


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _slice_dice(out: Path, model: str) -> dict[tuple, float]:
    pairs = {}
    for seed in (0, 1):
        for row in _csv(out / "runs" / model / f"seed{seed}" / "eval-test" / "slices.csv"):
            pairs[(seed, row["case"], int(row["slice"]))] = float(row["dice"])
    return pairs


def test_trains_every_model_and_seed_once(compared):
    _, out, result, calls = compared
    assert sorted((c.model, c.seed) for c in calls) == sorted((m, s) for m in MODELS for s in (0, 1))
    # One protocol: everything but model and seed is identical across runs.
    shared = [{k: v for k, v in c.to_dict().items() if k not in ("model", "seed", "out")} for c in calls]
    assert all(s == shared[0] for s in shared)
    assert shared[0]["width"] == 4 and shared[0]["lr"] == 1e-2 and shared[0]["precision"] == "32-true"
    assert not any(c.resume for c in calls)
    assert next(c.out for c in calls) == str(out / "runs" / "unet" / "seed0")
    assert result.trained == [(m, s) for m in MODELS for s in (0, 1)]


def test_results_csv_and_table(compared):
    _, out, result, _ = compared
    rows = _csv(out / "results.csv")
    assert [(r["model"], int(r["seed"])) for r in rows] == [(m, s) for m in MODELS for s in (0, 1)]
    for r in rows:
        metrics = json.loads((out / "runs" / r["model"] / f"seed{r['seed']}" / "eval-test" / "metrics.json")
                             .read_text())
        for key in ("dice", "hausdorff", "jaccard", "precision", "recall", "specificity", "f1", "hd95"):
            assert float(r[key]) == pytest.approx(metrics["summary"][key]), key
        assert int(r["n_slices"]) == 6 and int(r["epochs"]) == 2
    table = (out / "table.md").read_text()
    assert "Params (M)" in table and "CPU ms/slice" in table
    for model in MODELS:
        dice = [float(r["dice"]) for r in rows if r["model"] == model]
        f1 = [float(r["f1"]) for r in rows if r["model"] == model]
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {model} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == f"{100 * np.mean(dice):.2f} ± {100 * np.std(dice, ddof=1):.2f}"
        assert cells[7] == f"{100 * np.mean(f1):.2f}"  # F1 of means, averaged over seeds, no sd
        params = count_parameters(build_model(model, in_channels=3, num_classes=1, base_width=4))
        assert result.params[model] == params and cells[8] == f"{params / 1e6:.3f}"
        assert float(cells[9]) == pytest.approx(result.cpu_ms_per_slice[model], abs=0.006) and float(cells[9]) > 0
    assert "reports no significance tests" in table and "Wilcoxon" in table
    assert "smoke comparison on one patient's z-blocks, not a patient-level split" in table
    assert "width 4" in table and "precision 32-true" in table and "test split" in table
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "protocol.json").read_text())["width"] == 4
    assert not list(out.glob(".*tmp*"))


def test_wilcoxon_equals_scipy_on_the_same_pairs(compared):
    _, out, result, _ = compared
    ref, base = _slice_dice(out, "mfcnet"), _slice_dice(out, "unet")
    keys = sorted(ref)
    assert keys == sorted(base) and len(keys) == 12  # 2 seeds x 6 labelled test slices
    a, b = np.array([ref[k] for k in keys]), np.array([base[k] for k in keys])
    assert np.count_nonzero(a - b) > 0, "the two models should disagree somewhere"
    want = wilcoxon(a, b, alternative="two-sided")
    (row,) = _csv(out / "wilcoxon.csv")
    assert (row["reference"], row["baseline"], int(row["n"])) == ("mfcnet", "unet", 12)
    assert float(row["p_value"]) == pytest.approx(want.pvalue, rel=1e-12)
    assert float(row["statistic"]) == pytest.approx(want.statistic)
    assert float(row["median_diff"]) == pytest.approx(np.median(a - b))
    assert result.wilcoxon[0]["p_value"] == pytest.approx(want.pvalue, rel=1e-12)


def test_wilcoxon_vs_handles_ties_zeros_and_missing_pairs():
    rng = np.random.default_rng(1)
    a = {("s", i): float(v) for i, v in enumerate(rng.random(40).round(1))}
    b = {k: (v if i % 5 == 0 else round(float(rng.random()), 1)) for i, (k, v) in enumerate(a.items())}
    b[("only-b", 0)] = 0.5  # unpaired: ignored
    got = wilcoxon_vs(a, b)
    keys = sorted(a)
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    want = wilcoxon(x, y, alternative="two-sided")
    assert got["n"] == 40 and got["n_nonzero"] == np.count_nonzero(x - y) < 40
    assert got["p_value"] == pytest.approx(want.pvalue) and got["statistic"] == pytest.approx(want.statistic)
    assert got["median_diff"] == pytest.approx(np.median(x - y))
    same = wilcoxon_vs(a, dict(a))
    assert same["p_value"] == 1.0 and np.isnan(same["statistic"]) and "all differences are zero" in same["note"]


def test_second_run_trains_nothing_and_a_deleted_marker_resumes_only_that_run(compared, tmp_path, monkeypatch):
    data, out, first, _ = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    again, calls = run_compare(data, copy, monkeypatch)
    assert calls == [] and again.trained == []
    assert [r["dice"] for r in again.runs] == [r["dice"] for r in first.runs]

    (copy / "runs" / "mfcnet" / "seed1" / "compare.json").unlink()
    resumed, calls = run_compare(data, copy, monkeypatch)
    assert [(c.model, c.seed, c.resume) for c in calls] == [("mfcnet", 1, True)]
    assert resumed.trained == [("mfcnet", 1)]
    assert (copy / "runs" / "mfcnet" / "seed1" / "compare.json").is_file()
    # Resuming a run that had reached max_epochs trains no further epoch: same checkpoint, same scores.
    assert [r["dice"] for r in resumed.runs] == pytest.approx([r["dice"] for r in first.runs])


def test_without_mfcnet_the_wilcoxon_test_is_skipped_with_a_note(compared, tmp_path, monkeypatch):
    data, out, _, _ = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    result, calls = run_compare(data, copy, monkeypatch, models="unet")
    assert calls == [] and result.wilcoxon == []
    assert "Skipped: mfcnet is not among the compared models." in (copy / "table.md").read_text()
    assert _csv(copy / "wilcoxon.csv") == [] and (copy / "wilcoxon.csv").read_text().startswith("reference,")


def test_a_different_protocol_is_refused(compared):
    data, out, _, _ = compared
    with pytest.raises(HepasegError, match=r"protocol.json: width differs.*expected 4.*got 8"):
        compare(data, out, models="unet", seeds=1, width=8, max_epochs=2, train_overrides=OVERRIDES)


def test_bad_inputs_are_one_line_errors(compared, tmp_path):
    data = compared[0]
    out = tmp_path / "never"
    cases = [
        ({"models": "unet,nosuchnet"}, "unknown model 'nosuchnet'"),
        ({"models": ""}, "--models: empty"),
        ({"seeds": 0}, "--seeds: invalid value"),
        ({"train_overrides": {"model": "unet"}}, "'model' cannot be overridden"),
        ({"train_overrides": {"learning_rate": 0.1}}, "'learning_rate' cannot be overridden"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HepasegError) as info:
            compare(data, out, **{"models": "unet", "seeds": 1, **kwargs})
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(HepasegError, match="data directory not found"):
        compare(tmp_path / "missing", out, models="unet")
    assert not out.exists()  # nothing is written before the inputs are checked
    assert parse_models("all") == list_models() and parse_models(["unet", "unet", "mfcnet"]) == ["unet", "mfcnet"]


def test_cli_compare_wires_the_options(compared, tmp_path, monkeypatch):
    data, _, result, _ = compared
    seen = {}

    def fake(data_arg, out_arg, **kwargs):
        seen.update(kwargs, data=data_arg, out=out_arg)
        return result

    monkeypatch.setattr(hepaseg.experiments, "compare", fake)
    res = CliRunner().invoke(app, ["compare", "--data", str(data), "--models", "unet,mfcnet", "--seeds", "2",
                                   "--width", "4", "--max-minutes-per-run", "1.5", "--max-epochs", "3",
                                   "--batch-size", "2", "--precision", "32", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert seen["models"] == "unet,mfcnet" and seen["seeds"] == 2 and seen["width"] == 4
    assert seen["max_minutes_per_run"] == 1.5 and seen["max_epochs"] == 3
    assert seen["train_overrides"] == {"batch_size": 2, "precision": "32"} and seen["model_options"] == {}
    assert "mfcnet" in res.stdout and "table.md" in res.stdout
    res = CliRunner().invoke(app, ["compare", "--data", str(data), "--models", "mfcnet", "--out", str(tmp_path / "o"),
                                   "--model-option", "channel_form=slides", "--model-option", "context_stages=[4,5]"])
    assert res.exit_code == 0, res.output
    assert seen["model_options"] == {"channel_form": "slides", "context_stages": [4, 5]}


def test_cli_compare_errors_and_size_check(compared, tmp_path):
    data = compared[0]
    runner = CliRunner()
    res = runner.invoke(app, ["compare", "--data", str(data), "--models", "unet,foo", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "unknown model 'foo'" in res.output
    res = runner.invoke(app, ["compare", "--data", str(data), "--seeds", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--seeds" in res.output
    res = runner.invoke(app, ["compare", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "data directory not found" in res.output
    res = runner.invoke(app, ["compare", "--data", str(data), "--models", "unet,mfcnet", "--width", "4",
                              "--size-check", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "unet" in res.stdout and "mfcnet" in res.stdout and "32 px" in res.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_each_models_seeds_are_written_as_an_ensemble_list_that_evaluate_accepts(compared, tmp_path):
    from hepaseg.evaluation.ensemble import read_ensemble_list

    data, out, result, _ = compared
    for name in MODELS:
        listed = read_ensemble_list(out / "ensembles" / f"{name}.json")
        evaluated = [r["checkpoint"] for r in result.runs if r["model"] == name]
        assert [str(p.resolve()) for p in listed.checkpoints] == [str(Path(c).resolve()) for c in evaluated]
        assert len(listed.checkpoints) == 2 and listed.model == name and listed.source == "compare"
    res = CliRunner().invoke(app, ["evaluate", "--checkpoints-from", str(out / "ensembles" / f"{MODELS[0]}.json"),
                                   "--data", str(data), "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["members"]) == 2
