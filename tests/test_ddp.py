"""The same `hepaseg train` command under DDP: two CPU processes (gloo) on the tiny dataset."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from _tiny_data import make_tiny_dataset


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hepaseg.cli", "train", "--data", str(data), "--model", "unet", "--width", "4",
           "--out", str(run), "--batch-size", "2", "--max-epochs", "1", "--precision", "32", "--no-progress",
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["hepaseg"]["config"]["strategy"] == "ddp"
    # 12 training slices over 2 ranks with batch 2: 3 steps per rank.
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    result = json.loads((run / "result.json").read_text())
    assert result["epochs"] == 1 and math.isfinite(result["best_val_dice"])
    assert (run / "best.ckpt").is_file()
