"""Checkpoint content, weights-only round trip, atomic writes, and one-line errors on bad files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from _tiny_data import make_tiny_dataset
from hepaseg.errors import HepasegError
from hepaseg.io import CANONICAL_DESCRIPTION
from hepaseg.models import build_model
from hepaseg.training import SegmentationModule, SliceDataModule, TrainConfig, load_checkpoint
from hepaseg.training.checkpoint import AtomicCheckpointIO
from hepaseg.training.losses import DiceBCELoss


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch fit kept in memory, and its checkpoint written through the Lightning path."""
    root = tmp_path_factory.mktemp("ckpt")
    data = make_tiny_dataset(root / "data", context_slices=0)
    L.seed_everything(0, verbose=False)
    dm = SliceDataModule(data, batch_size=4, augment=False)
    dm.setup("fit")
    options = {}
    config = TrainConfig(data=str(data), model="unet", out=str(root / "run"), width=4)
    meta = {"model": "unet", "model_options": options, "in_channels": dm.in_channels, "num_classes": 1,
            "base_width": 4, "data_options": dm.data_options, "config": config.to_dict()}
    net = build_model("unet", in_channels=dm.in_channels, base_width=4, **options)
    module = SegmentationModule(net, DiceBCELoss(), meta=meta)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, datamodule=dm)
    path = root / "run" / "model.ckpt"
    trainer.save_checkpoint(path)
    return module, path, dm


def test_checkpoint_is_plain_and_complete(trained):
    _, path, _ = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # raises on any non-plain object
    meta = ckpt["hepaseg"]
    assert meta["version"] == "0.1.0"
    assert (meta["model"], meta["in_channels"], meta["num_classes"], meta["base_width"]) == ("unet", 1, 1, 4)
    assert meta["data_options"] == {"window": [-100, 200], "size": 32, "context_slices": 0, "slices": "all",
                                    "target": "tumor", "orientation": CANONICAL_DESCRIPTION}
    # Saved after fit, so Lightning's current_epoch already counts the finished epoch.
    assert meta["metrics"]["epoch"] == ckpt["epoch"] == 1 and meta["metrics"]["step"] == ckpt["global_step"] == 3
    assert 0.0 <= meta["metrics"]["val_dice"] <= 1.0
    assert meta["config"]["model"] == "unet" and meta["config"]["width"] == 4
    assert "net" not in ckpt["hyper_parameters"] and "loss" not in ckpt["hyper_parameters"]
    assert all(k.startswith("net.") for k in ckpt["state_dict"])


def test_load_round_trip_matches_in_memory_model(trained):
    module, path, dm = trained
    loaded = load_checkpoint(path)
    assert (loaded.model_name, loaded.in_channels, loaded.base_width) == ("unet", 1, 4)
    assert loaded.metrics["step"] == 3 and loaded.data_options["size"] == 32 and loaded.version == "0.1.0"
    assert not loaded.model.training
    assert not isinstance(loaded.model, L.LightningModule)
    x = torch.stack([dm.val_set[i][0] for i in range(3)])
    module.net.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), module.net(x))


def test_errors_name_the_file(trained, tmp_path):
    _, path, _ = trained
    with pytest.raises(HepasegError, match=r"missing.ckpt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")

    data = path.read_bytes()
    half = tmp_path / "half.ckpt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(HepasegError, match=r"half.ckpt: cannot read checkpoint \(truncated or corrupt\?\)") as err:
        load_checkpoint(half)
    assert "\n" not in str(err.value)

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(HepasegError, match=r"foreign.ckpt: not a hepaseg checkpoint"):
        load_checkpoint(foreign)

    ckpt = torch.load(path, weights_only=True)
    ckpt["hepaseg"]["model"] = "nosuch"
    renamed = tmp_path / "renamed.ckpt"
    torch.save(ckpt, renamed)
    with pytest.raises(HepasegError, match=r"renamed.ckpt: unknown model 'nosuch'.*mfcnet.*unet"):
        load_checkpoint(renamed)

    # Loading is weights-only: a pickled arbitrary object is refused, never executed.
    ckpt["hepaseg"]["model"] = "unet"
    ckpt["hepaseg"]["extra"] = Path("x")
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(ckpt, unsafe)
    unpickle = r"unsafe.ckpt: checkpoint holds non-tensor Python objects \(pathlib\."
    with pytest.raises(HepasegError, match=unpickle) as err:
        load_checkpoint(unsafe)
    # Issue 9, item 9: not "truncated or corrupt?", and never torch's advice to drop weights_only.
    assert "corrupt" not in str(err.value) and "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(2)}, target)
    before = target.read_bytes()

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(2)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind
