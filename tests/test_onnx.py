"""ONNX export and the onnxruntime engine agree with torch; corrupt files are one-line errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.data.phantom import make_phantom, write_phantom_dataset
from hepaseg.errors import HepasegError
from hepaseg.inference import OnnxModel, export_checkpoint, export_onnx, predict_case, predict_volume
from hepaseg.io import read_volume
from hepaseg.models import build_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

OPTS = {"window": [-200.0, 250.0], "size": 64, "context_slices": 1}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mfcnet", in_channels=3, num_classes=1, base_width=4).eval()
    path = tmp_path_factory.mktemp("onnx") / "mfcnet.onnx"
    export_onnx(model, path, in_channels=3, size=64, metadata={"data_options": OPTS, "model_name": "mfcnet"})
    return model, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_logits_match_torch_for_several_batch_sizes(exported, batch):
    model, path = exported
    x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(x).numpy()
    engine = OnnxModel(path)
    got = engine(x.numpy())
    assert isinstance(got, np.ndarray) and got.shape == (batch, 1, 64, 64)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    as_tensor = engine(x)  # torch in, torch out
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), expected, atol=1e-4)


def test_onnx_model_in_predict_volume_matches_torch_on_a_phantom(exported):
    model, path = exported
    volume = make_phantom((12, 64, 64), n_tumors=2, seed=5)
    kw = {"threshold": None, "progress": False, "batch": 3}
    torch_prob = predict_volume(model, volume, OPTS, precision="fp32", **kw)
    onnx_prob = predict_volume(OnnxModel(path), volume, OPTS, **kw)
    np.testing.assert_allclose(onnx_prob, torch_prob, atol=1e-4)


def test_metadata_round_trip_and_dynamic_batch_only(exported):
    _, path = exported
    engine = OnnxModel(path)
    assert engine.data_options == OPTS and engine.model_name == "mfcnet"
    assert engine.in_channels == 3 and engine.size == 64
    assert engine.metadata["in_channels"] == 3
    assert not isinstance(engine.session.get_inputs()[0].shape[0], int)  # symbolic batch axis


def test_corrupt_and_missing_onnx_files_are_one_line_errors(tmp_path, exported):
    _, good = exported
    bad = tmp_path / "model.onnx"
    bad.write_bytes(good.read_bytes()[: 2000])  # truncated
    with pytest.raises(HepasegError, match="model.onnx: not a valid ONNX model") as info:
        OnnxModel(bad)
    assert "\n" not in str(info.value)
    bad.write_bytes(b"this is not protobuf at all")
    with pytest.raises(HepasegError, match="not a valid ONNX model"):
        OnnxModel(bad)
    with pytest.raises(HepasegError, match="missing.onnx: ONNX model not found"):
        OnnxModel(tmp_path / "missing.onnx")


def _checkpoint(path):
    torch.manual_seed(1)
    net = build_model("unet", in_channels=3, num_classes=1, base_width=4)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hepaseg": {
                "version": "0.1.0", "model": "unet", "model_options": {}, "in_channels": 3, "num_classes": 1,
                "base_width": 4, "metrics": {}, "config": {},
                "data_options": {"window": [-200.0, 250.0], "size": 32, "context_slices": 1, "target": "tumor"},
            },
        },
        path,
    )
    return path


def test_export_checkpoint_then_predict_case_with_onnx_equals_torch(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.ckpt")
    onnx_path = export_checkpoint(ckpt, tmp_path / "m.onnx")
    assert OnnxModel(onnx_path).data_options["size"] == 32
    (case,) = write_phantom_dataset(tmp_path / "data", "lits", n_cases=1, shape=(12, 64, 64), seed=2)
    engine = OnnxModel(onnx_path)
    # An untrained net is nearly constant: threshold at its 90th percentile so the masks are not trivial.
    prob = predict_volume(engine, read_volume(case), engine.data_options, threshold=None, progress=False)
    threshold = float(np.quantile(prob, 0.9))
    kw = {"threshold": threshold, "progress": False, "precision": "fp32"}
    a = predict_case(case, tmp_path / "torch", checkpoint=ckpt, **kw)
    b = predict_case(case, tmp_path / "onnx", onnx_model=onnx_path, **kw)
    assert (a.engine, b.engine, b.model_name) == ("torch", "onnx", "unet")
    ma = np.asarray(nib.load(a.paths["mask"]).dataobj)
    mb = np.asarray(nib.load(b.paths["mask"]).dataobj)
    assert 0.05 < ma.mean() < 0.2
    # Probabilities agree to ~1e-6; only voxels within that of the threshold may differ.
    assert (ma != mb).sum() <= 0.001 * ma.size


def test_cli_export_writes_a_loadable_file(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.ckpt")
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "cli.onnx")])
    assert res.exit_code == 0, res.output
    assert OnnxModel(tmp_path / "cli.onnx").model_name == "unet"
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--onnx", "x.onnx"])
    assert res.exit_code == 1 and "checkpoint not found" in res.output
