"""Whole-volume prediction, preprocessing parity with prepare, predict_case end to end, bad input."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.data.phantom import make_phantom, write_phantom_dataset
from hepaseg.errors import HepasegError
from hepaseg.inference import draw_overlay, predict_case, predict_volume, preprocess_slices
from hepaseg.io import Volume, read_volume, write_image_nifti
from hepaseg.models import build_model

WINDOW = (-200.0, 250.0)
SHAPE = (12, 64, 64)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_checkpoint(
    path: Path, *, model: str = "mfcnet", width: int = 4, k: int = 1, size: int = 32,
    in_channels: int | None = None, head_bias: float | None = None,
) -> Path:
    """A checkpoint in the format of hepaseg.training.checkpoint, without training.

    ``head_bias`` zeroes the 1x1 head and sets its bias: a constant logit everywhere, so the
    predicted mask is known exactly (all tumour for +10, none for -10).
    """
    torch.manual_seed(0)
    channels = in_channels if in_channels is not None else 2 * k + 1
    net = build_model(model, in_channels=channels, num_classes=1, base_width=width)
    if head_bias is not None:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.fill_(head_bias)
    checkpoint = {
        "state_dict": {f"net.{key}": value for key, value in net.state_dict().items()},
        "hepaseg": {
            "version": "0.1.0", "model": model, "model_options": {}, "in_channels": channels,
            "num_classes": 1, "base_width": width,
            "data_options": {"window": list(WINDOW), "size": size, "context_slices": k, "slices": "all",
                             "target": "tumor"},
            "metrics": {}, "config": {},
        },
    }
    torch.save(checkpoint, path)
    return path


class CentreThreshold(nn.Module):
    """Flip-equivariant toy network: logit = 40 * (centre channel - 0.5), i.e. tumour where HU > 25."""

    in_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (x[:, 1:2] - 0.5)


class Skewed(nn.Module):
    """Not flip-equivariant: a fixed asymmetric 3x3 kernel on the centre channel."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 1] = torch.tensor([[4.0, 0, 0], [0, 1.0, 0], [-2.0, 0, 3.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) - 2.0


def _reference_inputs(image: np.ndarray, k: int) -> np.ndarray:
    """Hand-written preprocessing without resize: window, replicate the ends, float16 rounding."""
    scaled = (np.clip(image, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    z = image.shape[0]
    out = np.stack([[scaled[min(max(i + j, 0), z - 1)] for j in range(-k, k + 1)] for i in range(z)])
    return out.astype(np.float16).astype(np.float32)


def _opts(size: int, k: int = 1) -> dict:
    return {"window": list(WINDOW), "size": size, "context_slices": k}


@pytest.fixture(scope="module")
def phantom() -> Volume:
    return make_phantom(SHAPE, n_tumors=2, seed=3)


@pytest.fixture(scope="module")
def lits_case(tmp_path_factory) -> Path:
    """A labelled phantom in the LiTS layout (volume-0.nii.gz + segmentation-0.nii.gz)."""
    root = tmp_path_factory.mktemp("lits")
    (path,) = write_phantom_dataset(root, "lits", n_cases=1, shape=SHAPE, seed=3, n_tumors=2)
    return path


@pytest.fixture(scope="module")
def plain_case(tmp_path_factory, phantom) -> Path:
    """The same phantom as a plain NIfTI without labels."""
    path = tmp_path_factory.mktemp("plain") / "scan.nii.gz"
    write_image_nifti(phantom, path)
    return path


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocess_matches_hand_written_reference_with_edge_replication():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1000, 600, size=(5, 16, 16)).astype(np.float32)
    got = preprocess_slices(image, np.arange(5), _opts(16, k=2)).numpy()
    np.testing.assert_array_equal(got, _reference_inputs(image, 2))
    # A batch of non-consecutive centres gathers the same rows.
    np.testing.assert_array_equal(preprocess_slices(image, [4, 0], _opts(16, k=2)).numpy(), got[[4, 0]])


def test_preprocess_matches_prepare_shards_bit_for_bit(lits_case, tmp_path):
    from hepaseg.data.prepare import prepare

    out = tmp_path / "prepared"
    manifest = prepare(lits_case, out, window=WINDOW, size=48, slices="all", context_slices=1, progress=False,
                       console=Console(file=io.StringIO()))
    shard = np.load(out / manifest["cases"][0]["shard"])
    volume = read_volume(lits_case)
    got = preprocess_slices(volume.image, shard["slice_index"], _opts(48, k=1)).numpy()
    np.testing.assert_array_equal(got, shard["image"].astype(np.float32))


# --- predict_volume -----------------------------------------------------------------------------


def test_predict_volume_without_resize_equals_independent_threshold():
    rng = np.random.default_rng(1)
    # Keep every HU away from the decision value 25 HU so float16 rounding cannot flip a voxel.
    image = np.where(rng.random((6, 24, 24)) < 0.3, 120.0, -80.0).astype(np.float32)
    mask = predict_volume(CentreThreshold(), image, _opts(24), progress=False)
    assert mask.dtype == np.uint8 and mask.shape == image.shape
    np.testing.assert_array_equal(mask, (image > 25).astype(np.uint8))


def test_predict_volume_maps_back_to_odd_original_size():
    image = np.full((7, 50, 70), -100.0, np.float32)
    image[:, 10:40, 15:55] = 200.0  # bright block -> tumour for CentreThreshold
    block = image > 25
    prob = predict_volume(CentreThreshold(), image, _opts(32), threshold=None, progress=False)
    assert prob.shape == (7, 50, 70) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    mask = predict_volume(CentreThreshold(), image, _opts(32), progress=False)
    iou = (mask.astype(bool) & block).sum() / (mask.astype(bool) | block).sum()
    assert iou > 0.9


def test_tta_with_flip_equivariant_model_equals_plain_prediction(phantom):
    plain = predict_volume(CentreThreshold(), phantom, _opts(48), threshold=None, progress=False)
    tta = predict_volume(CentreThreshold(), phantom, _opts(48), threshold=None, tta=True, progress=False)
    np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_tta_averages_the_three_flips_for_a_skewed_model(phantom):
    model = Skewed()
    x = torch.from_numpy(_reference_inputs(phantom.image, 1))  # size 64 = original: no resize
    with torch.no_grad():
        expected = sum(torch.sigmoid(torch.flip(model(torch.flip(x, d)), d) if d else model(x))
                       for d in [(), (-1,), (-2,)]) / 3
    plain = predict_volume(model, phantom, _opts(64), threshold=None, progress=False, precision="fp32")
    tta = predict_volume(model, phantom, _opts(64), threshold=None, tta=True, progress=False, precision="fp32")
    np.testing.assert_allclose(tta, expected[:, 0].numpy(), atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-3  # the flips do change this model's output


def test_batch_size_does_not_change_the_result(phantom):
    torch.manual_seed(0)
    model = build_model("mfcnet", in_channels=3, num_classes=1, base_width=4)
    kw = {"threshold": None, "progress": False, "precision": "fp32"}
    image = phantom.image[:9]  # 9 slices: batch 8 leaves a last batch of 1
    one = predict_volume(model, image, _opts(32), batch=1, **kw)
    eight = predict_volume(model, image, _opts(32), batch=8, **kw)
    np.testing.assert_allclose(one, eight, atol=1e-5)


@pytest.mark.slow
def test_compiled_prediction_equals_eager_and_pads_the_last_batch(phantom):
    # 9 slices at batch 4: the last batch of 1 is padded to 4, so one compiled graph serves all.
    torch.manual_seed(0)
    eager_net = build_model("mfcnet", in_channels=3, num_classes=1, base_width=4)
    compiled_net = build_model("mfcnet", in_channels=3, num_classes=1, base_width=4)
    compiled_net.load_state_dict(eager_net.state_dict())
    kw = {"threshold": None, "progress": False, "precision": "fp32", "batch": 4}
    image = phantom.image[:9]
    eager = predict_volume(eager_net, image, _opts(32), **kw)
    timings: dict[str, float] = {}
    calls = []
    compiled_net.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    compiled = predict_volume(compiled_net, image, _opts(32), compile=True, timings=timings, **kw)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
    assert calls == [(4, 3, 32, 32)] * 3  # the padded last batch has the compiled shape
    assert timings["first_batch"] > 0
    assert set(compiled_net.state_dict()) == set(eager_net.state_dict())  # compiled in place, same keys


def test_bf16_precision_stays_close_to_fp32(phantom):
    kw = {"threshold": None, "progress": False}
    fp32 = predict_volume(Skewed(), phantom, _opts(64), precision="fp32", **kw)
    bf16 = predict_volume(Skewed(), phantom, _opts(64), precision="bf16", **kw)
    assert np.abs(bf16 - fp32).max() < 0.05


@pytest.mark.parametrize(
    "image, k, match",
    [
        (np.zeros((64, 64), np.float32), 1, "3D CT volume"),
        (np.zeros((1, 64, 64), np.float32), 0, "at least 2 slices"),
        (np.zeros((4, 32, 32), np.float32), 3, "at least 7 slices"),
    ],
)
def test_predict_volume_refuses_inputs_the_model_cannot_read(image, k, match):
    with pytest.raises(HepasegError, match=match):
        predict_volume(nn.Conv2d(2 * k + 1, 1, 1), image, _opts(32, k), progress=False)


def test_predict_volume_refuses_channel_mismatch(phantom):
    with pytest.raises(HepasegError, match="reads 1 channels.*context_slices \\+ 1 = 3"):
        predict_volume(nn.Conv2d(1, 1, 1), phantom, _opts(32, k=1), progress=False)


def test_predict_volume_argument_checks(phantom):
    with pytest.raises(ValueError, match="batch"):
        predict_volume(CentreThreshold(), phantom, _opts(32), batch=0)
    with pytest.raises(ValueError, match="precision"):
        predict_volume(CentreThreshold(), phantom, _opts(32), precision="int8")


# --- overlay ------------------------------------------------------------------------------------


def test_overlay_is_a_png_of_the_most_tumour_slices(phantom, tmp_path):
    import matplotlib.image

    from hepaseg.inference.overlay import select_slices

    gt = phantom.label == 2
    path = draw_overlay(phantom.image, np.zeros_like(gt), tmp_path / "o.png", gt_mask=gt, n=3)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3
    counts = gt.sum(axis=(1, 2))
    # Empty prediction -> ranked by ground truth.
    assert select_slices(np.zeros_like(gt), gt, 3) == sorted(np.argsort(-counts, kind="stable")[:3].tolist())
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]  # no temporary left behind


# --- predict_case end to end --------------------------------------------------------------------


def test_predict_case_end_to_end_with_labels(lits_case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "out"
    result = predict_case(lits_case, out, checkpoint=ckpt, batch=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".hepaseg-output.json", "tumor_mask.nii.gz", "lesions.csv", "lesions.json", "overlay.png", "metrics.json"]
    )
    assert json.loads((out / ".hepaseg-output.json").read_text())["command"] == "predict"
    # Issue 9, item 7: the folder gets the user's normal permissions (not mkdtemp's 0700), like the files.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "lesions.csv").stat().st_mode & 0o777 == 0o666 & ~umask
    source = nib.load(lits_case)
    written = nib.load(out / "tumor_mask.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"dice", "jaccard", "rvd", "assd", "hd95", "hausdorff"} <= set(metrics)
    assert (out / "overlay.png").read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((out / "lesions.json").read_text())["lesions"] == result.lesions
    assert set(result.timings) >= {"read", "inference", "write"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dir renamed


def test_all_tumour_model_gives_exact_mask_lesion_and_dice(lits_case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "all.ckpt", head_bias=10.0)
    result = predict_case(lits_case, tmp_path / "out", checkpoint=ckpt, progress=False)
    volume = read_volume(lits_case)
    n, t = volume.image.size, int((volume.label == 2).sum())
    assert nib.load(result.paths["mask"]).get_fdata().min() == 1
    assert [r["voxels"] for r in result.lesions] == [n]
    assert result.metrics["dice"] == pytest.approx(2 * t / (n + t))


def test_lits_labels_take_the_liver_from_the_input(lits_case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "none.ckpt", head_bias=-10.0)  # predicts no tumour
    result = predict_case(lits_case, tmp_path / "out", checkpoint=ckpt, labels="lits", progress=False)
    volume = read_volume(lits_case)
    mask = np.asarray(nib.load(result.paths["mask"]).dataobj).transpose(2, 1, 0)  # (x,y,z) -> (z,y,x)
    np.testing.assert_array_equal(mask, (volume.label > 0).astype(np.uint8))
    assert result.lesions == []


def test_unlabelled_input_writes_no_metrics_and_lits_mode_is_refused(plain_case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    result = predict_case(plain_case, tmp_path / "out", checkpoint=ckpt, progress=False)
    assert result.metrics is None and not (tmp_path / "out" / "metrics.json").exists()
    with pytest.raises(HepasegError, match="--labels lits needs a liver mask"):
        predict_case(plain_case, tmp_path / "out2", checkpoint=ckpt, labels="lits", progress=False)
    assert not (tmp_path / "out2").exists()


def test_out_dir_with_other_files_is_refused_even_with_overwrite(plain_case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # issue 9, item 1: --overwrite replaces only hepaseg's own outputs
        with pytest.raises(HepasegError, match=r"holds files hepaseg did not write \(notes.txt;.*delete or move"):
            predict_case(plain_case, out, checkpoint=ckpt, overwrite=overwrite, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    predict_case(plain_case, out, checkpoint=ckpt, progress=False)  # an existing EMPTY folder is fine
    with pytest.raises(HepasegError, match=r"already holds an earlier `hepaseg predict` output.*--overwrite"):
        predict_case(plain_case, out, checkpoint=ckpt, progress=False)
    (out / "stale.txt").write_text("inside hepaseg's own output")
    predict_case(plain_case, out, checkpoint=ckpt, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "tumor_mask.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "out"]  # no temporary or .old left


def test_overwrite_never_deletes_an_input(tmp_path):
    # Issue 9, item 1: `cp -r case x; hepaseg predict x --out x --overwrite` deleted the input CT.
    case_dir = tmp_path / "x"
    (case,) = write_phantom_dataset(case_dir, "lits", n_cases=1, shape=SHAPE, seed=3, n_tumors=1)
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    link = tmp_path / "link"
    link.symlink_to(case_dir)
    before = {p: p.read_bytes() for p in case_dir.iterdir()}
    for source, out, relation in ((case, case_dir, "contains"), (case, tmp_path, "contains"),
                                  (case_dir, case_dir / "pred", "is inside"), (case, link, "contains"),
                                  (link, case_dir, "is"), (case, case, "is"), (case, tmp_path / "m.ckpt", "is")):
        with pytest.raises(HepasegError, match=rf"--out {relation} the input"):
            predict_case(source, out, checkpoint=ckpt, overwrite=True, progress=False)
    assert {p: p.read_bytes() for p in case_dir.iterdir()} == before
    # A folder hepaseg did not write is never replaced, however it is named (`--out ~`).
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("keep")
    with pytest.raises(HepasegError, match="hepaseg did not write"):
        predict_case(case, home, checkpoint=ckpt, overwrite=True, progress=False)
    assert (home / ".bashrc").read_text() == "keep"


def _write_raw(path: Path, image: np.ndarray) -> Path:
    write_image_nifti(Volume(image=image.astype(np.float32), spacing=(2.0, 1.0, 1.0), affine=np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    "image, ckpt_kwargs, match",
    [
        (np.full((1, 32, 32), -1000.0), {}, "single 2D slice"),  # io refuses 1-slice NIfTI
        (np.random.default_rng(0).uniform(0, 900, (10, 32, 32)), {}, "does not look like CT"),  # MRI-like
        (np.full((4, 32, 32), -1000.0), {"k": 2}, "has 4 axial slice.*at least 5"),  # too thin for K=2
        (np.full((10, 32, 32), -1000.0), {"k": 1, "in_channels": 1}, "reads 1 channels"),  # inconsistent ckpt
    ],
)
def test_predict_case_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, image, ckpt_kwargs, match):
    case = _write_raw(tmp_path / "case.nii.gz", image)
    ckpt = write_checkpoint(tmp_path / "m.ckpt", model="unet", **ckpt_kwargs)
    with pytest.raises(HepasegError, match=match) as info:
        predict_case(case, tmp_path / "out", checkpoint=ckpt, progress=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "m.ckpt"]


def test_predict_case_option_errors(plain_case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(HepasegError, match="--labels"):
        predict_case(plain_case, tmp_path / "o", checkpoint=ckpt, labels="liver")
    with pytest.raises(HepasegError, match="--threshold"):
        predict_case(plain_case, tmp_path / "o", checkpoint=ckpt, threshold=1.5)
    with pytest.raises(HepasegError, match="--checkpoint"):
        predict_case(plain_case, tmp_path / "o")


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_predict_prints_lesions_and_paths(lits_case, tmp_path):
    ckpt = write_checkpoint(tmp_path / "all.ckpt", head_bias=10.0)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["predict", str(lits_case), "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "1 lesion(s)" in res.output and "tumor_mask.nii.gz" in res.output and "dice" in res.output
    res = CliRunner().invoke(
        app, ["predict", str(lits_case), "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
    )
    assert res.exit_code == 1 and "error:" in res.output and "--overwrite" in res.output


_SLOW_WRITER = """
import pathlib, sys, time
import hepaseg.inference.pipeline as pipeline
real, flag = pipeline.draw_overlay, pathlib.Path(sys.argv[1])

def slow(*args, **kwargs):  # the overlay is drawn inside the temporary output folder: stop there
    real(*args, **kwargs)
    flag.write_text("writing")
    time.sleep(120)

pipeline.draw_overlay = slow
from hepaseg.cli import app
sys.argv = ["hepaseg", *sys.argv[2:]]
app()
"""


@pytest.mark.slow
@pytest.mark.parametrize("earlier_output", [False, True])
def test_sigterm_during_predict_leaves_no_temporary_folder(lits_case, tmp_path, earlier_output):
    # Issue 9, item 6: SIGTERM while predict writes left a hidden temp folder with a partial mask.
    import hashlib
    import signal
    import subprocess
    import sys
    import time

    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = ["predict", str(lits_case), "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
    if earlier_output:  # an --overwrite that is stopped keeps the earlier output as it was
        assert CliRunner().invoke(app, args).exit_code == 0
        args.append("--overwrite")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} if out.exists() else None
    script, flag = tmp_path / "slow.py", tmp_path / "writing.flag"
    script.write_text(_SLOW_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(flag), *args], text=True, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "predict did not reach the writing step in 120 s"
            time.sleep(0.05)
        assert any(p.name.startswith(".out.") for p in work.iterdir())  # the temporary folder exists now
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: SIGTERM: stopped") and "Traceback" not in stderr
    assert [p.name for p in work.iterdir()] == (["out"] if earlier_output else [])  # no temporary left
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} if out.exists() else None
    assert after == before
