"""train(): learning, determinism, run-directory safety, NaN stop, time budget, CLI, kill + resume.

Everything runs a width-4 U-Net on a 32 x 32 synthetic dataset (tests/_tiny_data.py).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _tiny_data import make_tiny_dataset
from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.models import build_model
from hepaseg.training import TrainConfig, parse_key_values, train
from hepaseg.training.module import dice_per_slice, lr_factor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    # 2 train cases x 6 slices = 12 training slices, 6 validation slices, 3 channels (K = 1).
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    options = {"model": "unet", "width": 4, "batch_size": 4, "max_epochs": 2, "precision": "32",
               "progress_bar": False}
    options.update(overrides)
    return TrainConfig(data=str(data), out=str(out), **options)


def _metrics(run: Path, version: int = 0) -> list[dict[str, str]]:
    with open(run / "logs" / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_loss_decreases_on_overfittable_set(tiny_data, tmp_path):
    result = train(_config(tiny_data, tmp_path / "run", max_epochs=8, lr=1e-2, augment=False))
    losses = [float(r["train_loss_epoch"]) for r in _metrics(tmp_path / "run") if r["train_loss_epoch"]]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0], losses
    dices = [float(r["val_dice"]) for r in _metrics(tmp_path / "run") if r["val_dice"]]
    assert result.best_val_dice == pytest.approx(max(dices))
    assert (result.epochs, result.steps) == (8, 8 * 3)  # 12 slices / batch 4
    assert result.best_checkpoint == tmp_path / "run" / "best.ckpt" and result.best_checkpoint.is_file()
    assert len(result.epoch_seconds) == 8 and result.seconds_per_epoch > 0


def test_same_seed_same_weights(tiny_data, tmp_path):
    # Default precision (bf16-mixed where the CPU has it) and augmentation on: the real path.
    runs = [train(_config(tiny_data, tmp_path / name, precision=None, seed=seed))
            for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    a, b, c = (torch.load(r.last_checkpoint, weights_only=True)["state_dict"] for r in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters, so the check above can fail


def test_run_directory_refused_then_overwritten(tiny_data, tmp_path):
    # Issue 9, item 2: a folder that merely holds a file named like a run file is not a run.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "last.ckpt").write_text("not a checkpoint")
    (mine / "notes.txt").write_text("mine")
    (mine / "sub").mkdir()
    for overwrite in (False, True):
        with pytest.raises(HepasegError, match=r"mine: --out holds files hepaseg did not write.*delete or move"):
            train(_config(tiny_data, mine, overwrite=overwrite))
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "last.ckpt", "notes.txt", "sub"]
    assert (mine / "notes.txt").read_text() == "mine"  # refused before touching anything
    run = tmp_path / "run"
    with pytest.raises(HepasegError, match=r"last.ckpt: not found: --resume"):
        train(_config(tiny_data, run, resume=True))
    with pytest.raises(HepasegError, match="--resume and --overwrite"):
        _config(tiny_data, run, resume=True, overwrite=True)
    first = train(_config(tiny_data, run, max_epochs=1))
    assert json.loads((run / ".hepaseg-output.json").read_text())["command"] == "train"
    with pytest.raises(HepasegError, match=r"run: already holds a run \(config.json, last.ckpt.*--resume.*--overwrite"):
        train(_config(tiny_data, run, max_epochs=1))
    (run / "notes.txt").write_text("inside a hepaseg run folder")
    result = train(_config(tiny_data, run, overwrite=True, max_epochs=1, seed=3))
    assert not (run / "notes.txt").exists() and result.last_checkpoint.is_file()
    assert (run / "config.json").is_file() and (run / "result.json").is_file()
    assert first.run_dir == run and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]  # nothing aside


def test_run_inside_or_around_the_data_is_refused(tiny_data, tmp_path):
    for out in (tiny_data, tiny_data / "run", tiny_data.parent):
        with pytest.raises(HepasegError, match=r"--out (is|is inside|contains) the input"):
            train(_config(tiny_data, out, overwrite=True))
    assert sorted(p.name for p in tiny_data.iterdir()) == ["cases", "manifest.json"]


def test_bad_inputs_name_the_option(tiny_data, tmp_path):
    with pytest.raises(HepasegError, match=r"unknown model 'nosuch'.*unet"):
        train(_config(tiny_data, tmp_path / "r1", model="nosuch"))
    with pytest.raises(HepasegError, match="manifest.json"):
        train(_config(tmp_path / "nowhere", tmp_path / "r2"))
    with pytest.raises(HepasegError, match=r"--precision: invalid value.*'64'"):
        _config(tiny_data, tmp_path / "r3", precision="64")
    with pytest.raises(HepasegError, match="--loss: unknown loss"):
        train(_config(tiny_data, tmp_path / "r4", loss="l2"))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r4").exists()


def test_nan_loss_stops_naming_the_step(tiny_data, tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("hepaseg.training.train")  # the module, not the function

    class NanAfterTwo(torch.nn.Module):
        calls = 0

        def forward(self, logits, target):
            NanAfterTwo.calls += torch.is_grad_enabled()  # count training steps only, not validation
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
            return loss * float("nan") if NanAfterTwo.calls > 2 else loss

    monkeypatch.setattr(train_module, "build_loss", lambda name: NanAfterTwo())
    with pytest.raises(HepasegError, match=r"training loss: not finite.*got nan at step 2 \(epoch 0, batch 2\)"):
        train(_config(tiny_data, tmp_path / "run"))
    # Issue 9, item 8: a run that failed before its first checkpoint leaves nothing behind, so a
    # plain re-run is not refused.
    assert list(tmp_path.iterdir()) == []
    NanAfterTwo.calls = -10**6  # finite from now on
    assert train(_config(tiny_data, tmp_path / "run", max_epochs=1)).last_checkpoint.is_file()


def test_overwrite_that_fails_at_step_0_puts_the_earlier_run_back(tiny_data, tmp_path, monkeypatch):
    import hashlib
    import importlib

    train_module = importlib.import_module("hepaseg.training.train")
    run = tmp_path / "run"
    train(_config(tiny_data, run, max_epochs=1))
    before = {p.relative_to(run): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}

    class Nan(torch.nn.Module):
        def forward(self, logits, target):
            return logits.float().mean() * float("nan")

    monkeypatch.setattr(train_module, "build_loss", lambda name: Nan())
    with pytest.raises(HepasegError, match="training loss: not finite"):
        train(_config(tiny_data, run, overwrite=True))
    after = {p.relative_to(run): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_time_budget_stops_and_saves(tiny_data, tmp_path):
    result = train(_config(tiny_data, tmp_path / "run", max_epochs=1000, max_minutes=0.0001))
    assert result.stopped_by_time and result.epochs < 1000
    meta = torch.load(result.last_checkpoint, weights_only=True)["hepaseg"]
    assert meta["metrics"]["step"] == result.steps


def test_cli_train_one_epoch(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--model", "unet", "--width", "4", "--out", str(out),
            "--max-epochs", "1", "--batch-size", "4", "--precision", "32", "--no-augment", "--schedule", "poly"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best val_dice" in result.output and (out / "best.ckpt").is_file()
    record = json.loads((out / "result.json").read_text())  # steps of this run over its epoch seconds
    assert record["steps_per_second"] == pytest.approx(record["steps"] / sum(record["epoch_seconds"]))
    assert record["peak_gpu_memory_bytes"] is None and "steps / s" in result.output  # CPU run: no GPU memory
    config = torch.load(out / "last.ckpt", weights_only=True)["hepaseg"]["config"]
    assert (config["schedule"], config["augment"], config["precision"]) == ("poly", False, "32-true")
    again = CliRunner().invoke(app, args)  # same RUN again: refused, one line, exit 1
    assert again.exit_code == 1 and "already holds a run" in again.output
    bad = CliRunner().invoke(app, [*args[:-2], "--model-option", "depth"])
    assert bad.exit_code == 1 and "--model-option: cannot parse 'depth'" in bad.output


def test_cli_train_compile_and_model_options_reach_the_config(monkeypatch, tmp_path):
    import hepaseg.training

    seen = {}

    def fake_train(config):  # the wiring only; a compiled step is tested through the module below
        seen["config"] = config
        raise HepasegError("stop here")

    monkeypatch.setattr(hepaseg.training, "train", fake_train)
    args = ["train", "--data", str(tmp_path), "--model", "mfcnet", "--out", str(tmp_path / "r"), "--compile",
            "--model-option", "channel_form=slides", "--model-option", "placement=inline"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "stop here" in result.output
    config = seen["config"]
    assert config.compile is True and config.model_options == {"channel_form": "slides", "placement": "inline"}


@pytest.mark.slow
def test_compiled_module_trains_like_the_eager_one_with_the_same_state_dict():
    from hepaseg.training.losses import build_loss
    from hepaseg.training.module import SegmentationModule

    torch.manual_seed(0)
    nets = [build_model("unet", in_channels=1, num_classes=1, base_width=2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    eager, compiled = (SegmentationModule(net, build_loss("dice_bce"), compile=flag) for net, flag in
                       zip(nets, (False, True)))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod prefix in checkpoints
    x, y = torch.rand(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.8).float()
    for module in (eager, compiled):
        module.loss(module(x), y).backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


def test_parse_key_values():
    assert parse_key_values(["depth=4", "p=0.5", "on=true", "mode=add", "s=[1,2]", "x=null", "t=a=b"]) == {
        "depth": 4, "p": 0.5, "on": True, "mode": "add", "s": [1, 2], "x": None, "t": "a=b"}
    with pytest.raises(HepasegError, match="--model-option: cannot parse '=3'"):
        parse_key_values(["=3"])


def test_dice_per_slice_and_schedule():
    logits = torch.full((3, 1, 2, 2), -5.0)
    target = torch.zeros(3, 1, 2, 2)
    logits[1, 0, 0, 0] = 5.0  # slice 1: one false positive on an empty mask -> 0
    target[2, 0, 0, :] = 1  # slice 2: half of the mask found -> 2 * 1 / 3
    logits[2, 0, 0, 0] = 5.0
    assert dice_per_slice(logits, target).tolist() == pytest.approx([1.0, 0.0, 2 / 3])
    f = [lr_factor(s, total_steps=10, warmup_steps=4, schedule="cosine") for s in range(10)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and f[4] == pytest.approx(1.0)
    assert all(x > y for x, y in itertools.pairwise(f[4:]))
    assert lr_factor(7, total_steps=10, warmup_steps=0, schedule="poly") == pytest.approx(0.3**0.9)


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "hepaseg.cli", "train", "--data", str(tiny_data), "--model", "unet",
            "--width", "4", "--out", str(run), "--batch-size", "4", "--precision", "32", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*base, "--max-epochs", "500"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.ckpt").exists():
            assert proc.poll() is None, "training exited before writing last.ckpt"
            assert time.monotonic() < deadline, "no last.ckpt after 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = torch.load(run / "last.ckpt", weights_only=True)  # complete despite the kill: atomic write
    epoch = killed["hepaseg"]["metrics"]["epoch"]
    assert epoch < 499
    done = subprocess.run([*base, "--resume", "--max-epochs", str(epoch + 3)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert f"resuming {run / 'last.ckpt'} (saved after epoch {epoch}" in log
    final = torch.load(run / "last.ckpt", weights_only=True)
    assert final["hepaseg"]["metrics"]["epoch"] == epoch + 2
    assert final["global_step"] == (epoch + 3) * 3  # 3 steps per epoch, none repeated or lost
    # The resumed invocation logged only the new epochs, in a new CSV version.
    epochs = {int(r["epoch"]) for r in _metrics(run, version=1) if r["epoch"]}
    assert epochs == {epoch + 1, epoch + 2}


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_resume_finishes(tiny_data, tmp_path):
    # Issue 9, item 6: SLURM preemption, `timeout` and `docker stop` send SIGTERM; the run must save
    # last.ckpt and `--resume` must continue it to the end, no step repeated or lost.
    run = tmp_path / "run"
    base = [sys.executable, "-m", "hepaseg.cli", "train", "--data", str(tiny_data), "--model", "unet",
            "--width", "4", "--out", str(run), "--batch-size", "2", "--precision", "32", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*base, "--max-epochs", "500"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.ckpt").exists():  # training is under way (epoch 0 saved)
            assert proc.poll() is None, "training exited before writing last.ckpt"
            assert time.monotonic() < deadline, "no last.ckpt after 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in a later epoch, usually mid-epoch
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by SIGTERM" in errors[0] and str(run / "last.ckpt") in errors[0] and "--resume" in errors[0]
    stopped = torch.load(run / "last.ckpt", weights_only=True)
    step = stopped["global_step"]
    assert 6 <= step < 500 * 6  # after epoch 0 (6 steps of 2 slices), long before the end
    epochs = step // 6 + 2
    done = subprocess.run([*base, "--resume", "--max-epochs", str(epochs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    final = torch.load(run / "last.ckpt", weights_only=True)
    assert final["global_step"] == epochs * 6  # every step of every epoch exactly once
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing set aside or half-written


def test_train_console_has_no_lightning_noise_but_keeps_hepasegs_notes(tmp_path):
    # Issue 13: every `train` printed Lightning's accelerator inventory, an internal "Loading
    # `train_dataloader`" step and torch's LeafSpec deprecation. A separate process, because Lightning's
    # console handler writes to the stderr it found at import time, which pytest's capture does not see.
    data = make_tiny_dataset(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["options"].update(val_fraction=0.15, val_gap=2)  # val_note: hepaseg's rank_zero_info line
    (data / "manifest.json").write_text(json.dumps(manifest))
    args = [sys.executable, "-m", "hepaseg.cli", "train", "--data", str(data), "--model", "unet", "--width", "4",
            "--out", str(tmp_path / "run"), "--max-epochs", "1", "--batch-size", "4", "--precision", "32",
            "--no-progress"]
    done = subprocess.run(args, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    for noise in ("GPU available", "TPU available", "Loading `train_dataloader`", "LeafSpec", "max_epochs=1"):
        assert noise not in console, f"{noise!r} printed:\n{console}"
    assert "hepaseg: validation = the last 0.15 of each training patient's kept slices" in console
    assert "best val_dice" in console  # the summary table


def test_lightning_filter_keeps_accelerator_lines_when_there_is_one():
    import logging

    from hepaseg.training.train import _QuietLightning

    def kept(message: str) -> bool:
        return _QuietLightning().filter(logging.LogRecord("x", logging.INFO, "", 0, message, None, None))

    assert not kept("GPU available: False, used: False") and not kept("TPU available: False, using: 0 TPU cores")
    assert kept("GPU available: True (cuda), used: True") and kept("TPU available: True, using: 8 TPU cores")
    assert not kept("Loading `train_dataloader` to estimate number of stepping batches.")
    assert kept("hepaseg: resuming RUN/last.ckpt (saved after epoch 3, step 9); continuing at epoch 4")


def test_a_checkpoint_from_before_resolved_options_rebuilds_with_the_defaults_of_its_time(tiny_data, tmp_path):
    # MFCNet's channel_form default moved from "danet" to the slides' form (issue 13). Checkpoints
    # written before options were recorded resolved name no channel_form: they were trained with
    # "danet" and must load, predict and resume as such (models.registry legacy_options).
    from hepaseg.models import build_model
    from hepaseg.training import load_checkpoint

    run = tmp_path / "run"
    train(_config(tiny_data, run, model="mfcnet", max_epochs=1, model_options={"channel_form": "danet"}))
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["hepaseg"]["model_options"]["channel_form"] == "danet"  # recorded resolved
    assert build_model("mfcnet", base_width=4).architecture_options()["channel_form"] == "slides"  # today's default
    ckpt["hepaseg"]["model_options"] = {}  # as an older hepaseg wrote it: only the options given
    torch.save(ckpt, run / "last.ckpt")

    loaded = load_checkpoint(run / "last.ckpt")
    assert loaded.model_options == {"channel_form": "danet"}
    assert {block.channel.form for block in loaded.model.context.values()} == {"danet"}
    x = torch.rand(2, loaded.in_channels, 32, 32)
    danet = build_model("mfcnet", in_channels=loaded.in_channels, base_width=4, channel_form="danet").eval()
    danet.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), danet(x))  # (that the two forms differ: test_mfcnet)

    with pytest.raises(HepasegError, match="different model_options"):  # today's default is not what it trained
        train(_config(tiny_data, run, model="mfcnet", max_epochs=2, resume=True))
    resumed = train(_config(tiny_data, run, model="mfcnet", max_epochs=2, resume=True,
                            model_options={"channel_form": "danet"}))
    assert resumed.epochs == 2
