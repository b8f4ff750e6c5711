"""evaluate_checkpoint (slice level, Table 1), evaluate_volumes (3D, mm) and `hepaseg evaluate`.

One width-4 U-Net is trained once on a 32 x 32 synthetic dataset (tests/_tiny_data.py) with a
test split; the results are checked against a hand-rolled loop over the same slices.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.data import SliceDataset, write_phantom_dataset
from hepaseg.errors import HepasegError
from hepaseg.evaluation import (
    evaluate_checkpoint,
    global_dice,
    slice_metrics,
    summarize_slices,
    volume_metrics,
)
from hepaseg.io import find_cases, read_volume
from hepaseg.training import TrainConfig, load_checkpoint, train

SPLITS = ["train", "train", "test", "test", "val"]  # case03 (test) is marked unlabelled


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny convolutions gain nothing from threads, and on a busy shared machine OpenMP
    threads waiting for each other make a step ~100x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_split_dataset(root: Path, *, demo: bool = False) -> Path:
    """tiny dataset of 5 x 6 slices (32 px, K = 1): 2 train, 2 test (one unlabelled), 1 val."""
    make_tiny_dataset(root, n_cases=len(SPLITS))
    manifest = json.loads((root / "manifest.json").read_text())
    for case, split in zip(manifest["cases"], SPLITS):
        case["split"] = split
    manifest["cases"][3]["has_label"] = False
    manifest["demo_z_split"] = demo
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("evaluate")
    data = make_split_dataset(base / "data")
    # 3 epochs of 6 steps learn enough for non-trivial masks (CPU training is deterministic).
    result = train(
        TrainConfig(
            data=str(data),
            model="unet",
            out=str(base / "run"),
            width=4,
            batch_size=2,
            max_epochs=3,
            lr=1e-2,
            augment=False,
            precision="32",
            progress_bar=False,
        )
    )
    return data, result.best_checkpoint


def hand_rolled(checkpoint: Path, data: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """One slice at a time, straight from the checkpoint: the reference for evaluate_checkpoint."""
    model = load_checkpoint(checkpoint).model
    ds = SliceDataset(data, "test")
    rows, preds, targets = [], [], []
    for i, (case, z) in enumerate(ds.slice_keys):
        if case == "case03":  # has_label false
            continue
        image, mask = ds[i]
        with torch.no_grad():
            prob = torch.sigmoid(model(image[None]))[0, 0].numpy()
        pred, target = prob > 0.5, mask[0].numpy() > 0.5
        preds.append(pred)
        targets.append(target)
        rows.append({"case": case, "slice": z, **slice_metrics(pred, target)})
    return rows, np.stack(preds), np.stack(targets)


def test_matches_hand_rolled_loop(trained, tmp_path):
    data, ckpt = trained
    result = evaluate_checkpoint(ckpt, data, out=tmp_path / "eval")
    rows, preds, targets = hand_rolled(ckpt, data)
    assert len(result.rows) == len(rows) == 6  # case02 only
    for got, want in zip(result.rows, rows):
        assert got["case"] == want["case"] and got["slice"] == want["slice"]
        for key in ("dice", "jaccard", "precision", "recall", "specificity", "hausdorff", "hd95"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), (key, got, want)
    want_summary = summarize_slices(rows)
    for key, value in want_summary.items():
        assert result.summary[key] == pytest.approx(value, nan_ok=True), key
    # The model learnt something: the test is not comparing all-empty or all-full predictions.
    assert 0.05 < result.summary["dice"] < 1.0 and preds.any() and not preds.all()
    # Paper F1 = harmonic mean of MEAN precision and MEAN recall, not the mean of per-slice F1.
    p, r = result.summary["precision"], result.summary["recall"]
    assert result.summary["f1"] == pytest.approx(2 * p * r / (p + r))
    assert result.summary["f1_mean_per_slice"] == pytest.approx(result.summary["dice"])
    assert result.skipped_cases == ["case03"]
    inter, total = (preds & targets).sum(), preds.sum() + targets.sum()
    assert result.per_case["case02"]["dice"] == pytest.approx(2 * inter / total)
    assert list(result.per_case) == ["case02"] and result.per_case["case02"]["n_slices"] == 6


def test_batch_size_does_not_change_results(trained, tmp_path):
    data, ckpt = trained
    one = evaluate_checkpoint(ckpt, data, batch=1, write=False)
    many = evaluate_checkpoint(ckpt, data, batch=5, write=False)
    assert [r["dice"] for r in one.rows] == pytest.approx([r["dice"] for r in many.rows], abs=1e-12)
    assert one.paths == {} and not (ckpt.parent / "eval-test").exists()


def test_threshold_changes_predictions(trained):
    data, ckpt = trained
    everything = evaluate_checkpoint(ckpt, data, threshold=1e-9, write=False)
    nothing = evaluate_checkpoint(ckpt, data, threshold=1 - 1e-7, write=False)
    # p > 1e-9 holds almost everywhere (recall 1); p > 1 - 1e-7 almost never. (0 and 1 themselves are
    # refused: one rule, 0 < t < 1, for every command.)
    assert everything.summary["recall"] == pytest.approx(1.0)
    assert nothing.summary["recall"] < 0.2 and nothing.summary["dice"] < 0.2


def test_output_files(trained):
    data, ckpt = trained
    result = evaluate_checkpoint(ckpt, data, split="test")  # default out: <checkpoint dir>/eval-test
    out = ckpt.parent / "eval-test"
    assert result.out_dir == out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "unet" and metrics["split"] == "test" and metrics["threshold"] == 0.5
    assert metrics["summary"]["dice"] == pytest.approx(result.summary["dice"])
    assert metrics["summary"]["n_slices"] == 6 and metrics["skipped_cases"] == ["case03"]
    assert "2 * P_mean * R_mean" in metrics["f1_definition"]
    assert metrics["checkpoint"]["path"] == str(ckpt) and metrics["checkpoint"]["base_width"] == 4
    assert metrics["options"]["data_options"]["size"] == 32 and metrics["options"]["precision"] == "fp32"
    t = metrics["timings"]
    assert t["ms_per_slice"] == pytest.approx(1000 * t["forward"] / 6) and t["total"] >= t["forward"] > 0
    assert set(metrics["per_case"]) == {"case02"}

    with open(out / "slices.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert [(r["case"], int(r["slice"])) for r in lines] == [("case02", z) for z in range(6)]
    assert [float(r["dice"]) for r in lines] == [r["dice"] for r in result.rows]

    table = (out / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| unet |"))
    assert row.split("|")[2].strip() == f"{100 * result.summary['dice']:.2f} ± {100 * result.summary['dice_sd']:.2f}"
    assert "case03" in table and "2PR/(P+R)" in table
    assert not list(out.glob(".*tmp*"))  # no temporaries left behind


def _edit_manifest(src: Path, dest: Path, **options) -> Path:
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["options"].update(options)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.parametrize(
    ("option", "value", "fix"),
    [
        ("size", 48, "--size 32"),
        ("window", [-200, 250], "--window -100,200"),
        ("context_slices", 2, "--context-slices 1"),
    ],
)
def test_data_option_mismatch_is_one_line_error(trained, tmp_path, option, value, fix):
    data, ckpt = trained
    other = _edit_manifest(data, tmp_path / "other", **{option: value})
    with pytest.raises(HepasegError) as info:
        evaluate_checkpoint(ckpt, other, write=False)
    msg = str(info.value)
    assert "\n" not in msg and f"{option} differs" in msg and fix in msg and "hepaseg prepare" in msg
    assert str(other / "manifest.json") in msg


def test_bad_inputs(trained, tmp_path):
    data, ckpt = trained
    with pytest.raises(HepasegError, match="data directory not found"):
        evaluate_checkpoint(ckpt, tmp_path / "missing")
    with pytest.raises(HepasegError, match="checkpoint not found"):
        evaluate_checkpoint(tmp_path / "none.ckpt", data)
    with pytest.raises(HepasegError, match="--split"):
        evaluate_checkpoint(ckpt, data, split="testing")
    for threshold in (1.5, 0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(HepasegError, match=r"--threshold: expected a probability with 0 < t < 1"):
            evaluate_checkpoint(ckpt, data, threshold=threshold)
    with pytest.raises(HepasegError, match="--batch"):
        evaluate_checkpoint(ckpt, data, batch=0)
    # A split whose only cases are unlabelled has nothing to score.
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(data, unlabelled)
    manifest = json.loads((unlabelled / "manifest.json").read_text())
    manifest["cases"][2]["has_label"] = False
    (unlabelled / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HepasegError, match="no labelled slices"):
        evaluate_checkpoint(ckpt, unlabelled, write=False)


def test_cli_evaluate_json_and_table(trained, tmp_path):
    data, ckpt = trained
    res = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--json", "--out", str(tmp_path / "cli")]
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    want = evaluate_checkpoint(ckpt, data, write=False)
    assert payload["summary"]["dice"] == pytest.approx(want.summary["dice"])
    assert payload["summary"]["f1"] == pytest.approx(want.summary["f1"])
    assert (tmp_path / "cli" / "metrics.json").is_file()

    res = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "cli2")]
    )
    assert res.exit_code == 0, res.output
    assert "f1_mean_per_slice" in res.stdout and "2PR/(P+R)" in res.stdout


def test_cli_errors_are_one_line(trained, tmp_path):
    data, ckpt = trained
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "x.ckpt"), "--data", str(data)])
    assert res.exit_code == 1 and "checkpoint not found" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(ckpt)])
    assert res.exit_code == 1 and "--data" in res.output


# ----------------------------------------------------------------------------- volumes
def test_evaluate_volumes_matches_predict_and_volume_metrics(trained, tmp_path):
    from hepaseg.inference import predict_volume
    from hepaseg.inference.evaluate_volumes import evaluate_volumes

    _, ckpt = trained
    src = tmp_path / "phantoms"
    write_phantom_dataset(src, n_cases=2, shape=(10, 40, 40), n_tumors=2)
    result = evaluate_volumes(ckpt, [src], out=tmp_path / "vol")

    loaded = load_checkpoint(ckpt)
    want = []
    for path in find_cases([src]):
        vol = read_volume(path)
        pred = predict_volume(loaded.model, vol, loaded.data_options, device="cpu", precision="fp32", progress=False)
        want.append(volume_metrics(pred, vol.label == 2, vol.spacing))
    assert len(result.rows) == 2
    for got, ref in zip(result.rows, want):
        for key in ("dice", "jaccard", "rvd", "assd", "hd95", "hausdorff", "intersection", "pred_voxels"):
            assert got[key] == pytest.approx(ref[key]), key
    assert result.summary["dice_global"] == pytest.approx(global_dice(want))
    assert result.summary["dice_per_case"] == pytest.approx(np.mean([r["dice"] for r in want]))

    saved = json.loads((tmp_path / "vol" / "volumes.json").read_text())
    assert saved["summary"]["dice_global"] == pytest.approx(global_dice(want))
    with open(tmp_path / "vol" / "volumes.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert [float(r["hd95"]) for r in lines] == pytest.approx([r["hd95"] for r in want])
    assert float(lines[0]["spacing_z"]) == pytest.approx(2.5)

    res = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(ckpt), "--volumes", str(src), "--json", "--out", str(tmp_path / "cli")]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["volumes"]["summary"]["dice_global"] == pytest.approx(global_dice(want))
