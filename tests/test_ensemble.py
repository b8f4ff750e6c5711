"""Ensembles: probability averaging over members and flips, uncertainty, member checks, list files,
probability NIfTIs in the source geometry, and the predict / evaluate command lines."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hepaseg.training
from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.evaluation import evaluate_checkpoint
from hepaseg.evaluation.ensemble import (
    check_members,
    ensemble_probabilities,
    read_ensemble_list,
    resolve_members,
    write_ensemble_list,
)
from hepaseg.inference import predict_case, predict_volume
from hepaseg.inference.ensemble import load_ensemble, predict_ensemble
from hepaseg.io import read_volume, write_probability_nifti
from test_cascade import write_checkpoint

WINDOW = (-200.0, 250.0)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


class Const(nn.Module):
    """A constant logit everywhere (K = 0)."""

    in_channels = 1

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], self.logit)


class Windowed(nn.Module):
    """Probability = the windowed centre slice itself (logit of it): a pointwise, flip-equivariant toy."""

    in_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x[:, :1].clamp(1e-6, 1 - 1e-6))


class Skewed(nn.Module):
    """Not flip-equivariant: an asymmetric 3x3 kernel."""

    in_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = torch.tensor([[4.0, 0, 0], [0, 1.0, 0], [-2.0, 0, 3.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) - 2.0


def _volume(shape=(6, 20, 24), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-300, 300, shape).astype(np.float32)


OPTS = {"window": list(WINDOW), "size": 16, "context_slices": 0}


# --- the arithmetic --------------------------------------------------------------------------------


def test_two_members_average_their_probabilities_by_hand():
    # Constant logits 1 and -0.5: every voxel's mean is (sigmoid(1) + sigmoid(-0.5)) / 2, the sd half the gap.
    pred = predict_ensemble([Const(1.0), Const(-0.5)], _volume(), OPTS, votes=True, uncertainty=True,
                            progress=False)
    p1, p2 = sigmoid(1.0), sigmoid(-0.5)  # 0.7310586, 0.3775407
    np.testing.assert_allclose(pred.probability, (p1 + p2) / 2, atol=1e-6)  # 0.5542996
    np.testing.assert_allclose(pred.uncertainty, abs(p1 - p2) / 2, atol=1e-6)  # 0.1767590
    assert pred.votes.dtype == np.uint8 and np.all(pred.votes == 0b01)  # only member 0 is above 0.5
    assert pred.mask(0.5).all() and pred.n_members == 2
    # Averaging probabilities, not logits: logits 10, -2, -2 average to +2 (tumour), probabilities to 0.413.
    three = ensemble_probabilities([Const(10.0), Const(-2.0), Const(-2.0)], torch.zeros(1, 1, 4, 4))
    assert float(three.mean[0, 0, 0]) == pytest.approx((sigmoid(10) + 2 * sigmoid(-2)) / 3, abs=1e-6)
    assert float(three.mean.max()) < 0.5


def test_ensemble_equals_the_mean_of_each_members_own_prediction_with_tta():
    image = _volume()
    a, b = Skewed(), Windowed()
    pred = predict_ensemble([a, b], image, OPTS, tta=True, progress=False)
    pa = predict_volume(a, image, OPTS, tta=True, threshold=None, progress=False)
    pb = predict_volume(b, image, OPTS, tta=True, threshold=None, progress=False)
    np.testing.assert_allclose(pred.probability, (pa + pb) / 2, atol=2e-6)


def test_one_member_is_predict_volume_bit_for_bit():
    image = _volume()
    for tta in (False, True):
        one = predict_ensemble(Skewed(), image, OPTS, tta=tta, progress=False).probability
        np.testing.assert_array_equal(one, predict_volume(Skewed(), image, OPTS, tta=tta, threshold=None,
                                                           progress=False))


def test_uncertainty_is_zero_for_identical_members_and_measures_flip_spread():
    image = _volume()
    twins = predict_ensemble([Skewed(), Skewed()], image, OPTS, uncertainty=True, votes=True, progress=False)
    assert np.all(twins.uncertainty == 0.0)
    mask = twins.probability > 0.5
    assert np.all(twins.votes[mask] == 0b11) and np.all(twins.votes[~mask] == 0)
    triplets = predict_ensemble([Skewed()] * 3, image, OPTS, uncertainty=True, progress=False)
    assert float(triplets.uncertainty.max()) < 1e-7
    # One member with TTA: the sd over its three flips, against a hand computation (no resize at 20 px).
    image20 = image[:, :, :20]
    spread = predict_ensemble(Skewed(), image20, OPTS | {"size": 20}, tta=True, uncertainty=True, progress=False)
    x = torch.from_numpy(np.clip((image20[:, None] + 200) / 450, 0, 1).astype(np.float16).astype(np.float32))
    with torch.no_grad():
        flips = [torch.sigmoid(Skewed()(x)), torch.sigmoid(Skewed()(x.flip(-1))).flip(-1),
                 torch.sigmoid(Skewed()(x.flip(-2))).flip(-2)]
    expected = torch.stack(flips).std(dim=0, unbiased=False)[:, 0].numpy()
    np.testing.assert_allclose(spread.uncertainty, expected, atol=1e-6)
    assert float(spread.uncertainty.max()) > 0.01


def test_members_must_share_data_options(tmp_path):
    a = write_checkpoint(tmp_path / "a.ckpt", OPTS | {"slices": "all", "target": "tumor"})
    b = write_checkpoint(tmp_path / "b.ckpt", OPTS | {"slices": "tumor", "target": "tumor"})  # slices may differ
    c = write_checkpoint(tmp_path / "c.ckpt", OPTS | {"window": [-100, 200], "target": "tumor"})
    assert len(load_ensemble([a, b])) == 2
    with pytest.raises(HepasegError, match=r"^--checkpoint .*c.ckpt: data option window is \[-100, 200\]: expected "
                                           r"\[-200.0, 250.0\] as in --checkpoint .*a.ckpt: ensemble members must"):
        load_ensemble([a, b, c])
    with pytest.raises(HepasegError, match="data option size is 32: expected 16"):
        check_members([OPTS, OPTS | {"size": 32}], ["x", "y"])


def test_ensemble_list_files_round_trip_with_relative_paths(tmp_path):
    ckpts = [tmp_path / "runs" / f"seed{k}" / "last.ckpt" for k in range(2)]
    path = write_ensemble_list(tmp_path / "out" / "ensembles" / "unet.json", ckpts,
                               liver_checkpoints=[tmp_path / "liver.ckpt"], model="unet", source="test")
    stored = json.loads(path.read_text())
    assert stored["checkpoints"] == ["../../runs/seed0/last.ckpt", "../../runs/seed1/last.ckpt"]
    listed = read_ensemble_list(path)
    assert [p.resolve() for p in listed.checkpoints] == [p.resolve() for p in ckpts]
    assert [p.resolve() for p in listed.liver_checkpoints] == [(tmp_path / "liver.ckpt").resolve()]
    tumor, liver = resolve_members([tmp_path / "extra.ckpt"], path, None)
    assert tumor[0] == tmp_path / "extra.ckpt" and len(tumor) == 3 and len(liver) == 1
    assert resolve_members(None, path, [tmp_path / "mine.ckpt"])[1] == [tmp_path / "mine.ckpt"]
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(HepasegError, match="format: expected 'hepaseg-ensemble/1', got 'other'"):
        read_ensemble_list(tmp_path / "bad.json")
    with pytest.raises(HepasegError, match="file not found"):
        read_ensemble_list(tmp_path / "missing.json")


# --- probabilities in the source geometry -------------------------------------------------------------


def _flipped_source(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A RAS NIfTI (x and y flipped against hepaseg's LPS) with an asymmetric HU ramp, (x, y, z) = (24, 24, 5)."""
    i, j, k = np.meshgrid(np.arange(24), np.arange(24), np.arange(5), indexing="ij")
    hu = (-250 + 9 * i + 5 * j + 13 * k).astype(np.int16)  # (x, y, z); spans the window and beyond
    hu[0, 0, :] = -1000  # air in a corner: it is CT
    affine = np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path, hu, nib.load(path).affine  # as stored (float32 sform)


def test_probability_nifti_round_trip_in_a_flipped_source_overlays_exactly(tmp_path):
    path, hu, affine = _flipped_source(tmp_path / "ras.nii.gz")
    volume = read_volume(path)
    assert volume.source_geometry.axcodes == "RAS" and not volume.source_geometry.is_identity
    prob = predict_ensemble(Windowed(), volume, OPTS | {"size": 24}, progress=False).probability
    write_probability_nifti(prob, volume, tmp_path / "p.nii.gz")
    img = nib.load(tmp_path / "p.nii.gz")
    np.testing.assert_array_equal(img.affine, affine)
    assert img.get_data_dtype() == np.uint16
    # Voxel (i, j, k) of the file is the windowed HU of the SOURCE voxel (i, j, k) (float16, as prepared).
    expected = (np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)).astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(img.get_fdata(), expected, atol=1 / 131070 + 1e-6)
    assert abs(float(img.dataobj.slope) - 1 / 65535) < 1e-12 and float(img.dataobj.inter) == 0.0
    with pytest.raises(HepasegError, match="values outside \\[0, 1\\]"):
        write_probability_nifti(prob + 1, volume, tmp_path / "bad.nii.gz")


@pytest.fixture()
def toy_members(tmp_path, monkeypatch):
    """Two checkpoint files whose networks load_checkpoint swaps for Windowed and Const(0) (p = 0.5)."""
    opts = OPTS | {"size": 24, "slices": "all", "target": "tumor"}
    a = write_checkpoint(tmp_path / "a.ckpt", opts)
    b = write_checkpoint(tmp_path / "b.ckpt", opts)
    c = write_checkpoint(tmp_path / "c.ckpt", opts | {"context_slices": 1})
    real = hepaseg.training.load_checkpoint
    toys = {a: Windowed(), b: Const(0.0)}

    def load(p, map_location="cpu"):
        loaded = real(p, map_location)
        if Path(p) in toys:
            loaded.model = toys[Path(p)]
        return loaded

    monkeypatch.setattr(hepaseg.training, "load_checkpoint", load)
    return a, b, c


def test_predict_two_members_with_tta_writes_probabilities_uncertainty_and_lesion_columns(tmp_path, toy_members):
    a, b, _ = toy_members
    path, hu, affine = _flipped_source(tmp_path / "ras.nii.gz")
    out = tmp_path / "pred"
    result = predict_case(path, out, checkpoint=[a, b], tta=True, save_probabilities=True, progress=False)
    w = np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1).astype(np.float16).astype(np.float64)
    prob, spread = nib.load(out / "tumor_probability.nii.gz"), nib.load(out / "tumor_uncertainty.nii.gz")
    np.testing.assert_array_equal(prob.affine, affine)
    np.testing.assert_allclose(prob.get_fdata(), (w + 0.5) / 2, atol=2e-5)  # mean of w and 0.5
    np.testing.assert_allclose(spread.get_fdata(), np.abs(w - 0.5) / 2, atol=2e-5)  # sd of {w, w, w, .5, .5, .5}
    mask = np.asarray(nib.load(out / "tumor_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, (w + 0.5) / 2 > 0.5)  # source voxel order, exactly
    assert result.settings["n_members"] == 2 and result.settings["checkpoints"] == [str(a), str(b)]
    assert result.model_name == "unet x2"
    # Member 1 (p = 0.5) never exceeds the threshold: every lesion has half of the members.
    assert result.lesions and all(r["member_agreement"] == 0.5 for r in result.lesions)
    (lesion,) = result.lesions  # the ramp's bright corner is one connected region
    inside = w[mask > 0]
    assert lesion["mean_probability"] == pytest.approx(float(np.mean((inside + 0.5) / 2)), abs=2e-5)
    assert lesion["max_probability"] == pytest.approx(float(np.max((inside + 0.5) / 2)), abs=2e-5)
    assert lesion["mean_uncertainty"] == pytest.approx(float(np.mean(np.abs(inside - 0.5) / 2)), abs=2e-5)
    assert math.isnan(lesion["liver_surface_distance_mm"])  # no liver: no distance
    rows = list(csv.DictReader(io.StringIO((out / "lesions.csv").read_text())))
    assert rows[0]["member_agreement"] == "0.5000" and rows[0]["liver_surface_distance_mm"] == ""
    report = json.loads((out / "lesions.json").read_text())
    assert report["summary"]["n_lesions"] == 1 and "liver_volume_ml" not in report["summary"]
    assert "standard deviation" in report["settings"]["uncertainty"]


def test_cli_predict_ensemble_and_the_one_line_member_error(tmp_path, toy_members):
    a, b, c = toy_members
    path, _, _ = _flipped_source(tmp_path / "ras.nii.gz")
    ens = write_ensemble_list(tmp_path / "ens.json", [b], model="unet")
    res = CliRunner().invoke(app, ["predict", str(path), "--out", str(tmp_path / "p"), "--checkpoint", str(a),
                                   "--checkpoints-from", str(ens), "--save-probabilities", "--no-progress"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "2 members" in res.output and "0.50" in res.output
    assert {"tumor_probability.nii.gz", "tumor_uncertainty.nii.gz"} <= {p.name for p in (tmp_path / "p").iterdir()}
    bad = CliRunner().invoke(app, ["predict", str(path), "--out", str(tmp_path / "q"), "--checkpoint", str(a),
                                   "--checkpoint", str(c), "--no-progress"], terminal_width=300)
    assert bad.exit_code == 1 and "data option context_slices is 1: expected 0" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_one_member_without_tta_has_zero_uncertainty_and_full_agreement(tmp_path, toy_members):
    a, _, _ = toy_members
    path, _, _ = _flipped_source(tmp_path / "ras.nii.gz")
    result = predict_case(path, tmp_path / "p", checkpoint=a, save_probabilities=True, progress=False)
    assert not np.asarray(nib.load(tmp_path / "p" / "tumor_uncertainty.nii.gz").dataobj).any()
    assert all(r["mean_uncertainty"] == 0.0 and r["member_agreement"] == 1.0 for r in result.lesions)
    assert any("uncertainty.nii.gz is 0 everywhere" in w for w in result.warnings)


# --- evaluate with several checkpoints -----------------------------------------------------------------


def test_evaluate_averages_probabilities_of_its_members(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_cases=2)
    opts = {"window": [-100, 200], "size": 32, "context_slices": 1, "slices": "all", "target": "tumor"}
    plus = write_checkpoint(tmp_path / "p10.ckpt", opts, head_bias=10.0)
    minus = [write_checkpoint(tmp_path / f"m{i}.ckpt", opts, head_bias=-2.0) for i in range(2)]
    alone = evaluate_checkpoint(plus, data, split="val", device="cpu", write=False)
    assert alone.per_case["case01"]["pred_pixels"] == 6 * 32 * 32  # the +10 member alone: tumour everywhere
    # Probabilities (0.99995 + 2 x 0.119) / 3 = 0.413 < 0.5: nothing (the mean logit, +2, would say tumour).
    ens = evaluate_checkpoint([plus, *minus], data, split="val", device="cpu", out=tmp_path / "ev", tta=True)
    assert ens.per_case["case01"]["pred_pixels"] == 0 and ens.model_name == "unet x3"
    stored = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert stored["members"] == [str(plus), *map(str, minus)] and stored["options"]["tta"] is True
    assert "Ensemble of 3 checkpoint(s)" in (tmp_path / "ev" / "table.md").read_text()
