"""compare/crossval as cluster array jobs: plan, claimed runs (two workers, one folder), stale takeover, collect."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hepaseg
import hepaseg.training
from _tiny_data import make_tiny_dataset
from hepaseg.errors import HepasegError
from hepaseg.experiments import compare, compare_collect, compare_plan, compare_run
from hepaseg.io.claims import claim_owner, run_claimed, try_claim

OPTIONS = {"models": "unet,mfcnet", "seeds": 2, "width": 4, "max_epochs": 1,
           "train_overrides": {"batch_size": 2, "lr": 1e-2, "augment": False, "precision": "32"}}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Every process of these tests trains with one thread, so the workers' and the serial run's
    floating-point sums agree (and tiny convolutions gain nothing from threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_tiny_dataset(tmp_path_factory.mktemp("cluster") / "data", n_cases=4)
    manifest = json.loads((root / "manifest.json").read_text())
    for case, split in zip(manifest["cases"], ["train", "train", "test", "val"]):
        case["split"] = split
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _worker(data: Path, out: Path, run_index: int | None = None) -> subprocess.Popen:
    """A worker process: compare_run on the shared folder; prints its outcome as JSON."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from hepaseg.experiments import compare_run\n"
        f"opts = json.loads({json.dumps(json.dumps(OPTIONS))})\n"
        f"print(json.dumps(compare_run({str(data)!r}, {str(out)!r}, run_index={run_index!r}, **opts)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(hepaseg.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _table_without_timing(text: str) -> list[str]:
    """table.md minus what depends on the call: CPU ms/slice (measured now) and the 'this call' line."""
    lines = []
    for line in text.splitlines():
        if line.startswith("- this call:"):
            continue
        if line.startswith("| ") and "|" in line[2:]:
            cells = line.split("|")
            line = "|".join(cells[:-3] + ["", ""]) if len(cells) > 12 else line  # CPU ms and Epochs columns
        lines.append(line)
    return lines


def test_two_workers_share_a_four_run_plan_and_collect_equals_a_serial_run(data, tmp_path):
    shared = tmp_path / "shared"
    runs = compare_plan(data, shared, **OPTIONS)
    assert [r["id"] for r in runs] == ["unet/seed0", "unet/seed1", "mfcnet/seed0", "mfcnet/seed1"]
    assert json.loads((shared / "plan.json").read_text())["runs"] == runs

    workers = [_worker(data, shared), _worker(data, shared)]
    outcomes = []
    for proc in workers:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        outcomes.append(json.loads(stdout.strip().splitlines()[-1]))
    ran = [run_id for o in outcomes for run_id in o["ran"]]
    assert sorted(ran) == sorted(r["id"] for r in runs)  # every run done, and exactly once
    assert len(set(ran)) == len(ran)
    markers = [json.loads((shared / "runs" / r["model"] / f"seed{r['seed']}" / "compare.json").read_text())
               for r in runs]
    assert {m["worker"] for m in markers} <= {f"{socket.gethostname()}:{p.pid}" for p in workers}
    for r in runs:  # one training invocation per run: one logger version
        logs = shared / "runs" / r["model"] / f"seed{r['seed']}" / "logs" / "csv"
        assert [p.name for p in logs.iterdir()] == ["version_0"]
    assert list((shared / "claims").iterdir()) == []  # every claim released

    collected = compare_collect(data, shared, timing_repeats=1, **OPTIONS)
    assert collected.missing == []
    serial = compare(data, tmp_path / "serial", timing_repeats=1, **OPTIONS)
    skip = {"cpu_ms_per_slice", "train_wall_s", "checkpoint"}
    got = [{k: v for k, v in row.items() if k not in skip} for row in _rows(shared / "results.csv")]
    want = [{k: v for k, v in row.items() if k not in skip} for row in _rows(tmp_path / "serial" / "results.csv")]
    assert got == want  # the same metrics, bit for bit (repr of every float)
    assert _table_without_timing(collected.table) == _table_without_timing(serial.table)
    assert _rows(shared / "wilcoxon.csv") == _rows(tmp_path / "serial" / "wilcoxon.csv")


def test_collect_names_what_is_missing_and_run_index_runs_one_entry(data, tmp_path, monkeypatch):
    out = tmp_path / "partial"
    compare_plan(data, out, **OPTIONS)
    with pytest.raises(HepasegError, match="no finished run"):
        compare_collect(data, out, timing_repeats=1, **OPTIONS)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    from hepaseg.experiments.compare import run_index_from_env

    assert run_index_from_env(None) == 2 and run_index_from_env(0) == 0
    assert compare_run(data, out, run_index=run_index_from_env(None), **OPTIONS) == {
        "ran": ["mfcnet/seed0"], "done": [], "held": []}
    assert compare_run(data, out, run_index=2, **OPTIONS) == {"ran": [], "done": ["mfcnet/seed0"], "held": []}
    result = compare_collect(data, out, timing_repeats=1, **OPTIONS)
    assert result.missing == [("unet", 0), ("unet", 1), ("mfcnet", 1)]
    assert [(r["model"], r["seed"]) for r in result.runs] == [("mfcnet", 0)]
    assert "incomplete: 3 planned run(s) not finished" in result.table and "unet/seed0" in result.table
    with pytest.raises(HepasegError, match="--run-index: expected 0..3"):
        compare_run(data, out, run_index=4, **OPTIONS)
    with pytest.raises(HepasegError, match="other runs"):
        compare_run(data, out, run_index=0, **{**OPTIONS, "seeds": 1})


def test_without_a_plan_a_worker_is_told_to_plan_first(data, tmp_path):
    with pytest.raises(HepasegError, match="--plan"):
        compare_run(data, tmp_path / "noplan", run_index=0, **OPTIONS)


def test_a_dead_workers_run_is_taken_over_and_resumed(data, tmp_path, monkeypatch):
    out = tmp_path / "takeover"
    compare_plan(data, out, **OPTIONS)
    run = out / "runs" / "unet" / "seed0"
    # A worker that died mid-run: its training left last.ckpt (no marker) and its claim a dead pid.
    from hepaseg.training import TrainConfig, train

    train(TrainConfig(data=str(data), model="unet", out=str(run), seed=0, width=4, max_epochs=1, batch_size=2,
                      lr=1e-2, augment=False, precision="32", progress_bar=False))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = try_claim(out / "claims", "unet/seed0", heartbeat_s=None)
    claim.path.write_text(json.dumps({"run": "unet/seed0", "host": socket.gethostname(), "pid": int(dead.stdout)}))
    assert claim_owner(out / "claims", "unet/seed0") is None  # stale: its process is gone

    calls = []
    real = hepaseg.training.train
    monkeypatch.setattr(hepaseg.training, "train", lambda config: calls.append(config) or real(config))
    lines = []
    assert compare_run(data, out, run_index=0, log=lines.append, **OPTIONS)["ran"] == ["unet/seed0"]
    assert [c.resume for c in calls] == [True]  # resumed from the dead worker's last.ckpt
    assert any("taking over" in line for line in lines)
    assert (run / "compare.json").is_file() and list((out / "claims").iterdir()) == []


def test_claims_are_exclusive_and_go_stale(tmp_path):
    folder = tmp_path / "claims"
    first = try_claim(folder, "m/seed0", heartbeat_s=None)
    assert first is not None and try_claim(folder, "m/seed0") is None  # a live claim (this process) holds
    owner = claim_owner(folder, "m/seed0")
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["gen"] == 0
    # Another host's claim is judged by its heartbeat alone.
    first.path.write_text(json.dumps({"run": "m/seed0", "host": "elsewhere", "pid": 1}))
    assert try_claim(folder, "m/seed0", stale_after_s=60) is None  # fresh heartbeat: held
    old = time.time() - 3600
    os.utime(first.path, (old, old))
    second = try_claim(folder, "m/seed0", stale_after_s=60, heartbeat_s=None)
    assert second is not None and second.gen == 1 and second.took_over["host"] == "elsewhere"
    assert not first.still_owned() and second.still_owned()
    first.release()  # a superseded owner's release leaves the new claim alone
    assert second.path.exists()
    second.release()
    assert list(folder.iterdir()) == []


def test_only_one_of_many_racing_processes_wins_a_claim(tmp_path):
    code = ("import sys, time\n"
            "from hepaseg.io.claims import try_claim\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "c = try_claim(sys.argv[1], 'race', heartbeat_s=None)\n"
            "print('won' if c else 'lost'); time.sleep(2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(hepaseg.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    start = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), start], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(6)]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["lost"] * 5 + ["won"]


def test_run_claimed_waits_for_a_live_holder(tmp_path):
    folder = tmp_path / "claims"
    holder = try_claim(folder, "r", heartbeat_s=None)
    done = {"flag": False}

    def finish_later(*_):  # the holder finishes while the other waits
        done["flag"] = True
        holder.release()

    import threading

    threading.Timer(0.5, finish_later).start()
    ran = []
    assert run_claimed(folder, "r", lambda: done["flag"], ran.append, wait=True, poll_s=0.1) == "done"
    assert ran == []
    assert run_claimed(folder, "s", lambda: False, lambda claim: ran.append(claim.run_id), wait=False) == "ran"
    assert ran == ["s"]


def test_cli_plan_and_one_step_per_call(data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hepaseg.cli import app

    out = tmp_path / "cli"
    args = ["compare", "--data", str(data), "--out", str(out), "--models", "unet", "--seeds", "3", "--width", "4",
            "--max-epochs", "1", "--batch-size", "2", "--precision", "32"]
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    result = CliRunner().invoke(app, [*args, "--plan"])
    assert result.exit_code == 0, result.output
    assert "3 runs, indices 0..2 (sbatch --array=0-2)" in " ".join(result.output.split())
    assert [r["id"] for r in json.loads((out / "plan.json").read_text())["runs"]] == [
        "unet/seed0", "unet/seed1", "unet/seed2"]
    result = CliRunner().invoke(app, [*args, "--plan", "--collect"])
    assert result.exit_code != 0 and "expected at most one cluster step" in result.output
    # Inside an array task --collect is still --collect, not task $SLURM_ARRAY_TASK_ID.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    result = CliRunner().invoke(app, [*args, "--collect"])
    assert result.exit_code != 0 and "no finished run" in result.output
