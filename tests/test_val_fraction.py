"""Train on every patient: `prepare --val-fraction` (crossval's z-block rule) and training without validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.data import prepare, read_manifest
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.data.zval import z_val_rows
from hepaseg.errors import HepasegError
from hepaseg.experiments.crossval import make_fold_data
from hepaseg.training import TrainConfig, train

QUIET = {"progress": False, "console": Console(quiet=True)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def three_patients(tmp_path_factory) -> list[Path]:
    # 20 slices each so every patient has a training and a validation block; --slices liver keeps many.
    root = tmp_path_factory.mktemp("three")
    return write_phantom_dataset(root, "lits", n_cases=3, shape=(20, 40, 40), spacing=(2.5, 1.5, 1.5), seed=4)


def test_z_val_rows_by_hand():
    # 20 kept slices 0..19, 15 %: n_val = floor(3.5) = 3 -> rows 17..19; gap 4: train z < 17 - 4 = 13.
    train, val = z_val_rows(np.arange(20), 0.15, 4)
    assert val.tolist() == [17, 18, 19] and train.tolist() == list(range(13))
    # Gaps in the kept slices: z = [2, 3, 9, 10, 11, 30], 0.5 -> 3 val rows (z 10, 11, 30), train z < 10 - 2.
    train, val = z_val_rows(np.array([2, 3, 9, 10, 11, 30]), 0.5, 2)
    assert val.tolist() == [3, 4, 5] and train.tolist() == [0, 1]
    # Too small for a training block: everything trains, nothing validates.
    train, val = z_val_rows(np.array([5, 6]), 0.5, 2)
    assert train.tolist() == [0, 1] and val.size == 0


def test_val_fraction_is_crossvals_rule_exactly(three_patients, tmp_path):
    """A fold of crossval holding out patient 2 == `prepare --val-fraction` of patients 0 and 1."""
    opts = {"size": 32, "slices": "liver", "context_slices": 1}
    pool = tmp_path / "pool"
    prepare(three_patients, pool, split=(1.0, 0.0, 0.0), **opts, **QUIET)
    fold = make_fold_data(pool, tmp_path / "fold", "lits-2", val_fraction=0.2)
    mine = prepare(three_patients[:2], tmp_path / "mine", split=(1.0, 0.0, 0.0), val_fraction=0.2, **opts, **QUIET)

    keys = ("id", "patient", "split", "kept_slices", "n_slices", "tumor_pixels", "liver_pixels")
    assert [{k: c[k] for k in keys} for c in mine["cases"]] == [{k: c[k] for k in keys} for c in fold["cases"]]
    assert {c["split"] for c in mine["cases"]} == {"train", "val"}
    for a, b in zip(mine["cases"], fold["cases"]):
        with np.load(tmp_path / "mine" / a["shard"]) as x, np.load(tmp_path / "fold" / b["shard"]) as y:
            assert sorted(x.files) == sorted(y.files)
            for key in x.files:
                np.testing.assert_array_equal(x[key], y[key])
    # Hand check of one patient: the last 20 % of its kept slices validate, 2K + 2 = 4 positions apart.
    whole = {c["id"]: c for c in read_manifest(pool)["cases"]}["lits-0"]["kept_slices"]
    blocks = {c["id"]: c["kept_slices"] for c in mine["cases"]}
    n_val = int(np.floor(0.2 * len(whole) + 0.5))
    assert blocks["lits-0-z:val"] == whole[-n_val:]
    assert blocks["lits-0-z:train"] == [z for z in whole if z < whole[-n_val] - 4]
    assert mine["options"]["val_fraction"] == 0.2 and mine["options"]["val_gap"] == 4
    # Only the two blocks' shards are left (the whole-case shard was replaced).
    assert sorted(p.name for p in (tmp_path / "mine" / "cases").iterdir()) == sorted(
        Path(c["shard"]).name for c in mine["cases"])


def test_val_fraction_keeps_test_patients_whole_and_is_refused_with_a_val_split(three_patients, tmp_path):
    manifest = prepare(three_patients, tmp_path / "a", size=32, split=(0.67, 0.0, 0.33), val_fraction=0.15,
                       **QUIET)
    test = [c for c in manifest["cases"] if c["split"] == "test"]
    assert len(test) == 1 and "-z:" not in test[0]["id"] and "patient" not in test[0]
    assert sorted(c["split"] for c in manifest["cases"] if "-z:" in c["id"]) == ["train", "train", "val", "val"]
    with pytest.raises(HepasegError, match=r"--val-fraction 0.15 with --split VAL 0.1: expected VAL = 0"):
        prepare(three_patients, tmp_path / "b", size=32, val_fraction=0.15, **QUIET)
    with pytest.raises(HepasegError, match=r"--val-fraction: expected a fraction in \(0, 0.5\], got 0.7"):
        prepare(three_patients, tmp_path / "c", size=32, split=(1, 0, 0), val_fraction=0.7, **QUIET)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_cli_prepare_val_fraction_says_so_in_its_table(three_patients, tmp_path):
    result = CliRunner().invoke(app, ["prepare", *map(str, three_patients), "--out", str(tmp_path / "p"),
                                      "--size", "32", "--split", "1,0,0", "--val-fraction", "0.2",
                                      "--no-progress"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the caption wraps
    assert "slices of TRAINING patients" in text and "lits-1-z:val" in text


def _no_val_dataset(root: Path) -> Path:
    """The tiny dataset with its val case moved to train: `prepare --split 1,0,0`."""
    make_tiny_dataset(root)
    manifest = json.loads((root / "manifest.json").read_text())
    for case in manifest["cases"]:
        case["split"] = "train"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_training_without_validation_writes_last_ckpt_only_and_warns(tmp_path):
    data = _no_val_dataset(tmp_path / "data")
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="unet", width=4, batch_size=6,
                         max_epochs=2, precision="32", progress_bar=False)
    with pytest.warns(UserWarning, match="no validation slices"):
        result = train(config)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == [".hepaseg-output.json", "config.json", "last.ckpt", "logs", "result.json"]  # marker: a run folder
    assert result.best_checkpoint is None and result.best_val_dice is None
    assert result.last_checkpoint == tmp_path / "run" / "last.ckpt"
    assert (result.epochs, result.steps) == (2, 2 * 3)  # 18 slices / batch 6, every case trains
    assert len(result.epoch_seconds) == 2
    assert "last.ckpt only" in result.warnings[0]
    metrics = (tmp_path / "run" / "logs" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val_dice" not in metrics and "train_loss_epoch" in metrics


def test_early_stopping_without_validation_is_refused_before_anything_is_written(tmp_path):
    data = _no_val_dataset(tmp_path / "data")
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="unet", width=4, max_epochs=2,
                         early_stopping_patience=3, progress_bar=False)
    with pytest.raises(HepasegError, match=r"--early-stopping-patience: .* has no validation slices: expected a val "
                                           r"split to watch .* prepare with --val-fraction"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_cli_train_without_validation_prints_the_warning(tmp_path):
    data = _no_val_dataset(tmp_path / "data")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--model", "unet", "--out", str(tmp_path / "r"),
                                      "--width", "4", "--max-epochs", "1", "--batch-size", "6", "--precision", "32",
                                      "--no-progress"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "last.ckpt only" in result.output
    assert (tmp_path / "r" / "last.ckpt").is_file() and not (tmp_path / "r" / "best.ckpt").exists()
