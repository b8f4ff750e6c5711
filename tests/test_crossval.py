"""crossval(): leave-one-patient-out folds, no leak, outputs, resuming, the cascade, the CLI.

One crossval (unet, width 4, 32 px, 1 epoch, 1 seed) over two phantom patients is run once per
module; tests that change its directory work on a copy.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hepaseg.training
from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.data import read_manifest
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.errors import HepasegError
from hepaseg.evaluation import slice_metrics
from hepaseg.experiments.crossval import case_metrics, crossval, make_fold_data
from hepaseg.inference.predictor import predict_volume
from hepaseg.io import read_volume

OPTIONS = {"models": "unet", "seeds": 1, "size": 32, "width": 4, "max_epochs": 1,
           "train_options": {"batch_size": 2, "precision": "32"}}
PATIENTS = ["lits-0", "lits-1"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny convolutions gain nothing from threads (and a busy machine makes them slow); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _phantoms(root: Path) -> Path:
    # Two patients, 16 slices of 48 x 48 px at 1.5 mm: tumours of a few mm to ~20 mm.
    write_phantom_dataset(root, "lits", n_cases=2, shape=(16, 48, 48), spacing=(2.5, 1.5, 1.5))
    return root


def _run(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, **kwargs):
    """crossval() with hepaseg.training.train wrapped to record every TrainConfig it gets."""
    calls = []
    real = hepaseg.training.train

    def counting(config):
        calls.append(config)
        return real(config)

    monkeypatch.setattr(hepaseg.training, "train", counting)
    result = crossval([src], out, **{**OPTIONS, **kwargs})
    monkeypatch.setattr(hepaseg.training, "train", real)
    return result, calls


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    base = tmp_path_factory.mktemp("crossval")
    src = _phantoms(base / "src")
    with pytest.MonkeyPatch.context() as mp:
        result, calls = _run(src, base / "cv", mp)
    return src, base / "cv", result, calls


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_each_patient_is_held_out_once_and_never_trained_on(done):
    _, out, result, calls = done
    assert result.folds == PATIENTS
    assert sorted((Path(c.data).parent.name, c.model, c.seed) for c in calls) == [(p, "unet", 0) for p in PATIENTS]
    pool = read_manifest(out / "prepared" / "tumor")
    pool_cases = {c["id"]: c for c in pool["cases"]}
    for held_out in PATIENTS:
        (other,) = [p for p in PATIENTS if p != held_out]
        data = out / "folds" / held_out / "data-tumor"
        manifest = read_manifest(data)
        assert manifest["crossval"]["held_out"] == held_out
        assert {c["patient"] for c in manifest["cases"]} == {other}
        assert all(held_out not in c["id"] and c["source"] == pool_cases[other]["source"] for c in manifest["cases"])
        assert sorted(p.name for p in (data / "cases").iterdir()) == sorted(
            Path(c["shard"]).name for c in manifest["cases"])
        # The fold's slices are exactly the other patient's, image for image.
        with np.load(out / "prepared" / "tumor" / pool_cases[other]["shard"]) as npz:
            pool_image, pool_z = npz["image"], npz["slice_index"]
        for case in manifest["cases"]:
            with np.load(data / case["shard"]) as npz:
                rows = np.searchsorted(pool_z, npz["slice_index"])
                assert np.array_equal(pool_z[rows], case["kept_slices"])
                assert np.array_equal(npz["image"], pool_image[rows])
        # Validation = the last 15 % (>= 1) of the kept slices, > 2K + 2 z positions after training.
        z = pool_cases[other]["kept_slices"]
        split = {c["split"]: c["kept_slices"] for c in manifest["cases"]}
        n_val = max(1, math.floor(0.15 * len(z) + 0.5))
        assert split["val"] == z[-n_val:]
        assert split["train"] == [v for v in z if v < z[-n_val] - 2]
        # Its training run used this fold's data only.
        (config,) = [c for c in calls if Path(c.data) == data]
        assert config.out == str(out / "folds" / held_out / "unet" / "seed0")


def test_rows_score_the_held_out_volume_with_last_ckpt(done):
    src, out, result, _ = done
    rows = _csv(out / "crossval.csv")
    assert [(r["model"], r["fold"], r["seed"]) for r in rows] == [("unet", p, "0") for p in PATIENTS]
    for row in rows:
        assert row["checkpoint"] == str(out / "folds" / row["fold"] / "unet" / "seed0" / "last.ckpt")
        # Independent recomputation: predict the held-out volume, Dice by hand.
        volume = read_volume(src / f"volume-{row['fold'][-1]}.nii.gz")
        loaded = hepaseg.training.load_checkpoint(row["checkpoint"])
        pred = predict_volume(loaded.model, volume, loaded.data_options, device="cpu", precision="fp32",
                              progress=False) > 0
        target = volume.label == 2
        assert int(row["target_voxels"]) == int(target.sum()) and int(row["pred_voxels"]) == int(pred.sum())
        assert float(row["dice"]) == pytest.approx(2 * (pred & target).sum() / (pred.sum() + target.sum()))
        assert row["liver_dice"] == ""  # no cascade
        assert int(row["n_target_lesions"]) >= 1
        assert int(row["train_slices"]) >= 1 and int(row["val_slices"]) >= 1
    lesions = _csv(out / "lesions.csv")
    assert len(lesions) == sum(int(r["n_target_lesions"]) for r in rows)


def test_table_means_equal_the_csv_means(done):
    _, out, result, _ = done
    rows = _csv(out / "crossval.csv")
    table = (out / "table.md").read_text()
    (line,) = [t for t in table.splitlines() if t.startswith("| unet | ") and "±" in t]
    cells = [c.strip() for c in line.strip("|").split("|")]
    for key, column in (("dice", 2), ("slice_dice", 3), ("fp_slice_rate", 7)):
        values = np.array([float(r[key]) for r in rows])
        assert cells[column] == f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}", key
    fp = np.array([float(r["fp_lesions"]) for r in rows])
    assert cells[6] == f"{fp.mean():.2f} ± {fp.std(ddof=1):.2f}"
    inter = sum(int(r["intersection"]) for r in rows)
    denom = sum(int(r["pred_voxels"]) + int(r["target_voxels"]) for r in rows)
    assert cells[1] == f"{100 * 2 * inter / denom:.2f}"  # Dice global: pooled over the two patients, 1 seed
    assert result.dice_global["unet"] == [pytest.approx(2 * inter / denom)]
    # Lesion counts per diameter bin add up to the CSV's.
    for key, label in (("lt10", "< 10 mm"), ("10to20", "10-20 mm"), ("gt20", "> 20 mm")):
        (bin_line,) = [t for t in table.splitlines() if t.startswith(f"| unet | {label} |")]
        assert int(bin_line.split("|")[3]) == sum(int(r[f"n_lesions_{key}"]) for r in rows)
    assert "How noisy this is" in table and f"`{result.command}`" in table
    assert (out / "protocol.json").is_file()


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(done, tmp_path, monkeypatch):
    src, out, result, _ = done
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)

    def no_training(config):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(hepaseg.training, "train", no_training)
    again = crossval([src], copy, **OPTIONS)
    assert again.trained == []
    assert [r["dice"] for r in again.rows] == pytest.approx([r["dice"] for r in result.rows])
    monkeypatch.undo()

    (copy / "folds" / "lits-1" / "unet" / "seed0" / "crossval.json").unlink()  # killed before scoring
    resumed, calls = _run(src, copy, monkeypatch)
    assert [(Path(c.out).parts[-3], c.resume) for c in calls] == [("lits-1", True)]
    assert resumed.trained == [("unet", "lits-1", 0)]
    assert len(_csv(copy / "crossval.csv")) == 2


def test_a_changed_protocol_is_refused(done, tmp_path):
    src, out, _, _ = done
    copy = tmp_path / "cv"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("folds", "prepared"))
    with pytest.raises(HepasegError, match="width differs"):
        crossval([src], copy, **{**OPTIONS, "width": 8})


def test_a_folder_from_before_a_new_training_field_resumes_while_that_field_is_at_its_default(
        done, tmp_path, monkeypatch):
    # A crossval folder written by a hepaseg that did not know liver_enhancement / synthetic_families
    # (fields added later, whose defaults train as before) must resume after an upgrade, not fail.
    src, out, result, _ = done
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    protocol = json.loads((copy / "protocol.json").read_text())
    for name in ("liver_enhancement", "liver_enhancement_hu", "synthetic_families"):
        del protocol["train"][name]
    (copy / "protocol.json").write_text(json.dumps(protocol))
    resumed, calls = _run(src, copy, monkeypatch)
    assert calls == [] and [r["dice"] for r in resumed.rows] == pytest.approx([r["dice"] for r in result.rows])
    # The same field set to anything but its default is a different protocol.
    with pytest.raises(HepasegError, match="train differs"):
        crossval([src], copy, **{**OPTIONS, "train_options": {**OPTIONS["train_options"], "liver_enhancement": 0.5}})


def test_cascade_with_synthetic_tumours_and_nnunet_augmentation(done, tmp_path, monkeypatch):
    src = done[0]
    out = tmp_path / "cv"
    result, calls = _run(src, out, monkeypatch, cascade=True, liver_size=32,
                         train_options={**OPTIONS["train_options"], "synthetic_tumors": 0.5, "augment": "nnunet"})
    liver = [c for c in calls if c.target == "liver"]
    tumor = [c for c in calls if c.target == "tumor"]
    assert sorted(Path(c.out).parts[-3] for c in liver) == PATIENTS
    assert sorted(Path(c.out).parts[-3] for c in tumor) == PATIENTS
    # The recipe reaches the tumour stage only; the liver stage keeps the defaults (but shares throughput).
    assert all(c.synthetic_tumors == 0.5 and c.augment == "nnunet" for c in tumor)
    assert all(c.synthetic_tumors == 0.0 and c.augment is True and c.batch_size == 2 for c in liver)
    assert read_manifest(out / "prepared" / "tumor")["options"]["roi"] == "liver"
    liver_pool = read_manifest(out / "prepared" / "liver")
    assert liver_pool["options"]["target"] == "liver" and liver_pool["options"]["size"] == 32
    for held_out in PATIENTS:
        for stage in ("data-liver", "data-tumor"):
            cases = read_manifest(out / "folds" / held_out / stage)["cases"]
            assert held_out not in {c["patient"] for c in cases}
    for row in result.rows:
        assert 0.0 <= row["liver_dice"] <= 1.0
    table = (out / "table.md").read_text()
    assert "cascade" in table and "liver Dice (%)" in table
    assert "--cascade" in result.command and "--synthetic-tumors 0.5" in result.command
    assert "--augment nnunet" in result.command


def test_make_fold_data_cuts_each_training_patient_along_z(tmp_path):
    pool = make_tiny_dataset(tmp_path / "pool", n_cases=3, n_slices=12, context_slices=1)  # gap 2K + 2 = 4
    fold = make_fold_data(pool, tmp_path / "fold", "case01", val_fraction=0.25)
    by_id = {c["id"]: c for c in fold["cases"]}
    assert sorted(by_id) == ["case00-z:train", "case00-z:val", "case02-z:train", "case02-z:val"]
    # 12 slices: val = the last 3 (z 9-11); train = z < 9 - 4, i.e. 0-4.
    assert by_id["case00-z:val"]["kept_slices"] == [9, 10, 11]
    assert by_id["case00-z:train"]["kept_slices"] == [0, 1, 2, 3, 4]
    with np.load(pool / "cases" / "case02.npz") as npz:
        label = npz["label"]
    with np.load(tmp_path / "fold" / by_id["case02-z:train"]["shard"]) as npz:
        assert np.array_equal(npz["label"], label[:5]) and npz["slice_index"].tolist() == [0, 1, 2, 3, 4]
    assert by_id["case02-z:train"]["tumor_pixels"] == int((label[:5] == 2).sum())
    assert fold["n_slices"] == 2 * (5 + 3)
    with pytest.raises(HepasegError, match="held-out case 'nobody' is not prepared"):
        make_fold_data(pool, tmp_path / "fold2", "nobody")
    small = make_tiny_dataset(tmp_path / "small", n_cases=2, n_slices=3, context_slices=1)
    with pytest.raises(HepasegError, match="0 validation slices"):
        make_fold_data(small, tmp_path / "fold3", "case00")
    assert not (tmp_path / "fold3").exists()  # nothing left behind


def test_case_metrics_against_slice_metrics_and_hand_counts():
    label = np.zeros((6, 20, 20), np.uint8)
    label[0:5, 4:16, 4:16] = 1
    label[1:3, 6:10, 6:10] = 2  # tumour slices 1, 2
    pred = np.zeros(label.shape, np.uint8)
    pred[1, 6:10, 6:8] = 1  # half the tumour on slice 1, none on slice 2
    pred[4, 12, 12] = 1  # a false-positive lesion on a tumour-free liver slice
    liver = (label > 0).astype(np.uint8)
    row, lesions = case_metrics(pred, label, (2.0, 1.0, 1.0), liver_pred=liver)
    expected = np.mean([slice_metrics(pred[z], label[z] == 2)["dice"] for z in (1, 2)])
    assert row["slice_dice"] == pytest.approx(expected) and row["n_tumor_slices"] == 2
    assert (row["n_target_lesions"], row["found_iou"], row["found_any"], row["fp_lesions"]) == (1, 0, 1, 1)
    assert row["recall_any_lt10"] == 1.0 and math.isnan(row["recall_any_gt20"])
    assert (row["n_free_liver_slices"], row["fp_slices"], row["fp_slice_rate"]) == (3, 1, pytest.approx(1 / 3))
    assert row["liver_dice"] == 1.0
    assert row["dice"] == pytest.approx(2 * 8 / (9 + 32))
    assert lesions[0]["best_iou"] == pytest.approx(8 / 32)


def test_bad_input_is_refused(done, tmp_path):
    src = done[0]
    with pytest.raises(HepasegError, match="train_options .*'nonsense' cannot be set"):
        crossval([src], tmp_path / "a", **{**OPTIONS, "train_options": {"nonsense": 1}})
    with pytest.raises(HepasegError, match="prepare_options .*'split' cannot be set"):
        crossval([src], tmp_path / "b", **{**OPTIONS, "prepare_options": {"split": [1, 0, 0]}})
    with pytest.raises(HepasegError, match="unknown model 'nonet'"):
        crossval([src], tmp_path / "c", **{**OPTIONS, "models": "nonet"})
    with pytest.raises(HepasegError, match="--seeds"):
        crossval([src], tmp_path / "d", **{**OPTIONS, "seeds": 0})
    one = tmp_path / "one"
    write_phantom_dataset(one, "lits", n_cases=1, shape=(12, 32, 32))
    with pytest.raises(HepasegError, match="expected at least two labelled patients"):
        crossval([one], tmp_path / "e", **OPTIONS)


def test_cli_reruns_the_tables_command_without_training(done, tmp_path, monkeypatch):
    src, out, result, _ = done
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    monkeypatch.setattr(hepaseg.training, "train", lambda config: pytest.fail("trained again"))
    args = shlex.split(result.command)[2:]  # drop "hepaseg crossval"
    args[args.index("--out") + 1] = str(copy)
    res = CliRunner().invoke(app, ["crossval", *args])
    assert res.exit_code == 0, res.output
    assert "crossval: 2 folds x 1 seeds" in res.output and "unet" in res.output
    assert json.loads((copy / "protocol.json").read_text()) == json.loads((out / "protocol.json").read_text())
    bad = CliRunner().invoke(app, ["crossval", str(src), "--out", str(tmp_path / "x"), "--train-option", "lr"])
    assert bad.exit_code == 1 and "--train-option: cannot parse 'lr'" in bad.output


# --- ensembles of the folds and post-processing measured on the held-out patients --------------------


def test_crossval_writes_its_folds_as_an_ensemble_list(done, tmp_path):
    src, out, result, _ = done
    from hepaseg.evaluation.ensemble import read_ensemble_list

    listed = read_ensemble_list(out / "ensembles" / "unet.json")
    assert result.paths["ensemble_unet"] == out / "ensembles" / "unet.json"
    assert [p.resolve() for p in listed.checkpoints] == [
        (out / "folds" / p / "unet" / "seed0" / "last.ckpt").resolve() for p in PATIENTS]
    assert listed.liver_checkpoints == [] and listed.source == "crossval"
    res = CliRunner().invoke(app, ["predict", str(src / "volume-0.nii.gz"), "--out", str(tmp_path / "p"),
                                   "--checkpoints-from", str(out / "ensembles" / "unet.json"), "--no-progress"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "lesions.json").read_text())["settings"]["n_members"] == 2


def test_scoring_reproduces_crossval_and_post_processes_cached_predictions(done, tmp_path, monkeypatch):
    from hepaseg.experiments.crossval_scoring import score_crossval

    src, out, result, _ = done
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    for fold in PATIENTS:  # a second "seed" identical to the first: its ensemble must equal it
        shutil.copytree(copy / "folds" / fold / "unet" / "seed0", copy / "folds" / fold / "unet" / "seed1")
    monkeypatch.setattr(hepaseg.training, "train", lambda config: pytest.fail("scoring must not train"))
    scored = score_crossval(copy, ["min_lesion_mm3=1e9", "fill_holes"], device="cpu")
    assert len(scored.rows) == 2 * 3 * 3 and sorted(scored.predicted) == sorted(
        (f, "unet", v) for f in PATIENTS for v in ("seed0", "seed1", "ensemble"))
    crossval_dice = {r["fold"]: r["dice"] for r in result.rows}
    for fold in PATIENTS:
        mine = {(r["variant"], r["postprocess"]): r for r in scored.rows if r["fold"] == fold}
        assert mine[("seed0", "none")]["dice"] == pytest.approx(crossval_dice[fold], rel=1e-12)
        assert mine[("ensemble", "none")]["dice"] == mine[("seed0", "none")]["dice"]
        assert mine[("ensemble", "none")]["members"] == 2
        dropped = mine[("seed0", ">= 1e+09 mm3")]
        assert dropped["n_pred_lesions"] == 0 and dropped["fp_lesions"] == 0 and dropped["dice"] == 0.0
        assert dropped["removed_small"] == mine[("seed0", "none")]["n_pred_lesions"]
    table = (copy / "postprocess.md").read_text()
    assert "| unet | single | none |" in table and "| unet | ensemble of 2 | fill holes |" in table
    assert len(_csv(copy / "postprocess.csv")) == 18
    again = score_crossval(copy, ["fill_holes"], device="cpu")  # cached: nothing predicted
    assert again.predicted == [] and len(again.rows) == 2 * 3 * 2
    with pytest.raises(HepasegError, match="min_liver_fraction needs the predicted liver"):
        score_crossval(copy, ["min_liver_fraction=0.5"])
    args = shlex.split(result.command)[2:]
    args[args.index("--out") + 1] = str(copy)
    res = CliRunner().invoke(app, ["crossval", *args, "--postprocess", "min-lesion-mm3=20", "--ensemble-seeds"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "postprocess.md" in res.output and ">= 20 mm3" in (copy / "postprocess.md").read_text()


def test_cli_model_options_join_the_tumour_models_train_options(tmp_path, monkeypatch):
    import hepaseg.experiments.crossval as crossval_module

    seen = {}

    def fake(sources, out, **kwargs):  # the wiring only: crossval itself is tested above
        seen.update(kwargs)
        raise HepasegError("stop here")

    monkeypatch.setattr(crossval_module, "crossval", fake)
    res = CliRunner().invoke(app, ["crossval", str(tmp_path), "--out", str(tmp_path / "cv"), "--models", "mfcnet",
                                   "--train-option", 'model_options={"placement": "inline"}',
                                   "--model-option", "channel_form=slides", "--model-option", "qk_activation=relu"])
    assert res.exit_code == 1 and "stop here" in res.output
    assert seen["train_options"] == {"model_options": {"placement": "inline", "channel_form": "slides",
                                                       "qk_activation": "relu"}}
