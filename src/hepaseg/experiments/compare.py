"""Train and evaluate several networks under one protocol: the paper's Table 1 on your data.

:func:`compare` trains every listed model for every seed with the SAME protocol (data and
split, epoch/time budget, width, loss, augmentation, optimiser, batch size, precision),
evaluates each run's ``best.ckpt`` on the test split with
:func:`hepaseg.evaluation.evaluate_checkpoint`, measures CPU inference time and parameter
counts, and writes::

    OUT/.hepaseg-output.json     marker: a compare folder (another non-empty folder is refused)
    OUT/protocol.json            the pinned protocol (a later call must match it)
    OUT/runs/<model>/seed<k>/    the training run (hepaseg train layout) + eval-<split>/ + compare.json
    OUT/table.md                 Table 1 layout, mean ± sd over seeds, Params (M), CPU ms/slice,
                                 Wilcoxon tests and the protocol
    OUT/results.csv              one row per model x seed with every metric
    OUT/wilcoxon.csv             paired Wilcoxon signed-rank tests, mfcnet vs each baseline
    OUT/dice_boxplot.png         per-slice Dice per model, pooled over seeds
    OUT/ensembles/<model>.json   the model's seeds as an ensemble list (the checkpoint each run was
                                 evaluated with), for `--checkpoints-from` (hepaseg.evaluation.ensemble)

Resuming: a (model, seed) whose ``compare.json`` marker and evaluation exist is not
retrained; a run with ``last.ckpt`` but no marker (interrupted) continues with
``resume=True``; a run killed before its first checkpoint starts again. So rerunning the
same command after an interruption finishes the comparison.

On a cluster (``hepaseg compare ... --plan | --run-index I | --worker | --collect``):
:func:`compare_plan` pins the protocol and writes ``OUT/plan.json``, one entry per (model, seed)
(``model/seed<k>``, models in order, then seeds); :func:`compare_run` trains and evaluates entry
``I`` (an array task; default ``$SLURM_ARRAY_TASK_ID``) or, as a local worker, every entry that
no live worker holds; :func:`compare_collect` writes the tables from whatever has finished and
names what is missing. Workers share ``OUT`` through claim files in ``OUT/claims``
(:mod:`hepaseg.io.claims`): a run is taken by one worker at a time, and a killed worker's run is
taken over and resumed from its ``last.ckpt``. :func:`compare` itself claims each run too.

Statistics: the paper reports no significance tests. We add a two-sided paired Wilcoxon
signed-rank test (:func:`scipy.stats.wilcoxon`, zero differences dropped as in its default
``zero_method="wilcox"``) of mfcnet against each baseline on per-slice Dice, pairing slices
by ``(seed, case, slice)``; no correction for multiple comparisons.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hepaseg.data import SliceDataset, read_manifest
from hepaseg.data.zval import val_note
from hepaseg.errors import HepasegError
from hepaseg.evaluation.ensemble import write_ensemble_list
from hepaseg.evaluation.evaluate import evaluate_checkpoint, json_safe
from hepaseg.evaluation.metrics import SLICE_METRICS
from hepaseg.evaluation.report import table1_markdown
from hepaseg.io.atomic import atomic_path, write_csv_atomic, write_json_atomic, write_text_atomic
from hepaseg.io.claims import Claim, claim_owner, run_claimed
from hepaseg.io.outputs import check_output_dir, write_output_marker

__all__ = [
    "CompareResult",
    "check_sizes",
    "compare",
    "compare_collect",
    "compare_plan",
    "compare_run",
    "cpu_ms_per_slice",
    "parse_models",
    "wilcoxon_vs",
]

REFERENCE_MODEL = "mfcnet"
_MARKER = "compare.json"
#: Files shared by the workers of one output folder (see :func:`compare_run`).
PLAN_FILE = "plan.json"
CLAIMS_DIR = "claims"
# TrainConfig fields compare sets itself; everything else may come in train_overrides.
_OWN_FIELDS = ("data", "model", "out", "seed", "width", "model_options", "max_epochs", "max_minutes", "resume",
               "overwrite", "progress_bar")


@dataclass
class CompareResult:
    """What :func:`compare` produced. ``runs`` has one dict per (model, seed) (the rows of
    ``results.csv``); ``wilcoxon`` one dict per baseline (the rows of ``wilcoxon.csv``)."""

    out: Path
    models: list[str]
    seeds: list[int]
    runs: list[dict[str, Any]]
    wilcoxon: list[dict[str, Any]]
    params: dict[str, int]
    cpu_ms_per_slice: dict[str, float]
    trained: list[tuple[str, int]]  # (model, seed) trained or resumed in this call
    table: str
    protocol: dict[str, Any]
    wall_seconds: float
    paths: dict[str, Path] = field(default_factory=dict)
    missing: list[tuple[str, int]] = field(default_factory=list)  # planned (model, seed) not finished


def parse_models(models: str | Sequence[str]) -> list[str]:
    """``"all"`` -> every registered model; ``"a,b"`` or ``["a", "b"]`` -> those, checked, in order.

    Raises:
        HepasegError: an unknown name (the message lists the valid ones) or an empty list.
    """
    from hepaseg.models import list_models

    known = list_models()
    if isinstance(models, str):
        names = known if models.strip() == "all" else [m.strip() for m in models.split(",") if m.strip()]
    else:
        names = [str(m).strip() for m in models]
    if not names:
        raise HepasegError(f"--models: empty: expected 'all' or comma-separated names from {', '.join(known)}")
    for name in names:
        if name not in known:
            raise HepasegError(f"--models: unknown model {name!r}: expected 'all' or names from {', '.join(known)}")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def cpu_ms_per_slice(model: torch.nn.Module, *, in_channels: int, size: int, batch: int = 8,
                     repeats: int = 5, warmup: int = 2) -> float:
    """Median CPU wall time per slice (ms) of fp32 inference on ``(batch, in_channels, size, size)``.

    A copy of ``model`` runs on the CPU in eval mode under ``torch.inference_mode``; ``warmup``
    untimed passes (oneDNN picks kernels on the first calls), then the median of ``repeats``
    timed passes, divided by ``batch``. Uses the process's torch thread count.
    """
    net = copy.deepcopy(model).to("cpu").float().eval()
    x = torch.rand(batch, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            net(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / batch


def check_sizes(
    data: str | os.PathLike,
    *,
    models: str | Sequence[str] = "all",
    width: int = 64,
    batch: int = 8,
    timing_repeats: int = 3,
) -> list[dict[str, Any]]:
    """Dry run of a comparison (``hepaseg compare --size-check``): build, run and time every model.

    Each model is built at ``width`` with the data's ``2K + 1`` input channels and run once in
    fp32 on a CPU batch ``(batch, 2K + 1, size, size)`` at the prepared size, checking that the
    logits come back as ``(batch, 1, size, size)``; nothing is trained or written.

    Returns:
        One dict per model: ``model``, ``params`` (trainable), ``in_channels``, ``size`` (px),
        ``cpu_ms_per_slice`` (see :func:`cpu_ms_per_slice`).

    Raises:
        HepasegError: unknown model, missing data, or a model whose output has the wrong shape.
    """
    from hepaseg.models import build_model, count_parameters

    names = parse_models(models)
    data = Path(data)
    if not data.is_dir():
        raise HepasegError(f"{data}: data directory not found: expected a directory written by "
                           "`hepaseg prepare`. Check --data or run `hepaseg prepare SOURCES --out DIR`")
    options = read_manifest(data)["options"]
    size, channels = int(options["size"]), 2 * int(options["context_slices"]) + 1
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build_model(name, in_channels=channels, num_classes=1, base_width=width).eval()
        with torch.inference_mode():
            shape = tuple(model(torch.zeros(batch, channels, size, size)).shape)
        if shape != (batch, 1, size, size):
            raise HepasegError(f"model {name!r}: output shape at {size} px: expected {(batch, 1, size, size)}, "
                               f"got {shape}. Prepare the data with another --size")
        rows.append({"model": name, "params": count_parameters(model), "in_channels": channels, "size": size,
                     "cpu_ms_per_slice": cpu_ms_per_slice(model, in_channels=channels, size=size, batch=batch,
                                                          repeats=timing_repeats)})
    return rows


def wilcoxon_vs(reference: Mapping[tuple, float], other: Mapping[tuple, float]) -> dict[str, Any]:
    """Two-sided paired Wilcoxon signed-rank test of ``reference - other`` over their common keys.

    Args:
        reference, other: per-slice Dice keyed by ``(seed, case, slice)``.

    Returns:
        ``n`` (pairs), ``n_nonzero`` (pairs with a difference; the test uses only these),
        ``median_diff`` (median of reference - other over all pairs), ``statistic`` and
        ``p_value`` of :func:`scipy.stats.wilcoxon` (defaults: ``zero_method="wilcox"``,
        ``method="auto"``), and ``note``. When every difference is zero the test is undefined:
        ``p_value = 1``, ``statistic = NaN`` and a note say so.
    """
    from scipy.stats import wilcoxon

    keys = sorted(set(reference) & set(other))
    if not keys:
        return {"n": 0, "n_nonzero": 0, "median_diff": math.nan, "statistic": math.nan, "p_value": math.nan,
                "note": "no common (seed, case, slice) pairs"}
    a = np.array([reference[k] for k in keys], dtype=np.float64)
    b = np.array([other[k] for k in keys], dtype=np.float64)
    diff = a - b
    out = {"n": len(keys), "n_nonzero": int(np.count_nonzero(diff)), "median_diff": float(np.median(diff))}
    if out["n_nonzero"] == 0:
        return {**out, "statistic": math.nan, "p_value": 1.0, "note": "all differences are zero: p set to 1"}
    res = wilcoxon(a, b, alternative="two-sided")
    note = "" if out["n_nonzero"] >= 10 else "fewer than 10 non-zero differences: low power"
    return {**out, "statistic": float(res.statistic), "p_value": float(res.pvalue), "note": note}


def _read_slice_dice(path: Path) -> dict[tuple[str, int], float]:
    with open(path, newline="") as fh:
        return {(row["case"], int(row["slice"])): float(row["dice"]) for row in csv.DictReader(fh)}


def train_state(run: Path, done: bool) -> str:
    """``done`` (when ``done``: the caller's marker says so) | ``resume`` (last.ckpt) | ``restart``
    (started, no checkpoint) | ``new``: what a protocol does next with one training run folder."""
    if done:
        return "done"
    if (run / "last.ckpt").is_file():
        return "resume"
    if (run / "config.json").is_file():
        return "restart"
    return "new"


def _run_state(run: Path, eval_dir: Path) -> str:
    """:func:`train_state` of a compare run: done once its marker and its evaluation exist."""
    return train_state(run, (run / _MARKER).is_file() and (eval_dir / "metrics.json").is_file())


def _train_defaults() -> dict[str, Any]:
    """Every :class:`~hepaseg.training.TrainConfig` field's default, JSON-ready (as protocols store them)."""
    from hepaseg.training import TrainConfig

    defaults = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return json_safe(defaults)


def _with_later_fields(saved: dict[str, Any], protocol: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the training fields that a later hepaseg added filled in, where this call
    leaves them at their default.

    A field added after ``saved`` was written did not exist for its runs; at its default it
    trains exactly as they did (that is how fields are added), so an upgrade does not block
    resuming. A field this call sets to anything else still differs.
    """
    defaults = _train_defaults()
    saved = copy.deepcopy(saved)
    for key in ("train", "liver_train"):
        old, new = saved.get(key), protocol.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            for name, value in new.items():
                if name not in old and name in defaults and value == defaults[name]:
                    old[name] = value
    return saved


def _check_protocol(out: Path, protocol: dict[str, Any]) -> None:
    path = out / "protocol.json"
    if path.is_file():
        saved = _with_later_fields(json.loads(path.read_text()), protocol)
        diffs = [k for k in sorted(set(saved) | set(protocol)) if saved.get(k) != protocol.get(k)]
        if diffs:
            k = diffs[0]
            raise HepasegError(
                f"{path}: {k} differs from this call's: expected {saved.get(k)!r} (the runs already in --out), "
                f"got {protocol.get(k)!r}. Use the same options to resume, or a new --out"
            )
    else:
        write_json_atomic(path, protocol)


@dataclass
class _Setup:
    """Everything a comparison's runs share, checked once (and ``protocol.json`` pinned)."""

    data: Path
    out: Path
    names: list[str]
    seeds: int
    width: int
    max_epochs: int
    max_minutes_per_run: float | None
    split: str
    shared: dict[str, Any]
    protocol: dict[str, Any]
    manifest: dict[str, Any]
    model_options: dict[str, Any] = field(default_factory=dict)

    @property
    def runs(self) -> list[dict[str, Any]]:
        """The plan: one entry per (model, seed), models in order, then seeds."""
        return [{"index": i, "id": f"{name}/seed{seed}", "model": name, "seed": seed}
                for i, (name, seed) in enumerate((n, s) for n in self.names for s in range(self.seeds))]

    def run_dir(self, name: str, seed: int) -> Path:
        return self.out / "runs" / name / f"seed{seed}"


def _setup(data, out, *, models, seeds, width, max_minutes_per_run, max_epochs, train_overrides, split,
           model_options=None) -> _Setup:
    from hepaseg.training import TrainConfig
    from hepaseg.training.train import resolve_config

    names = parse_models(models)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise HepasegError(f"--seeds: invalid value: expected a positive integer, got {seeds!r}")
    data, out = Path(data), Path(out)
    # Before any work: a new folder, or this command's earlier (resumable) output; never around --data.
    out_state = check_output_dir(out, command="compare", inputs=[data], reuse=True)
    if not data.is_dir():
        raise HepasegError(f"{data}: data directory not found: expected a directory written by "
                           "`hepaseg prepare`. Check --data or run `hepaseg prepare SOURCES --out DIR`")
    manifest = read_manifest(data)
    SliceDataset(data, split)  # fails early, with its own message, when the split is empty
    overrides = dict(train_overrides or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in overrides:
        if key in _OWN_FIELDS or key not in fields:
            allowed = sorted(fields - set(_OWN_FIELDS))
            raise HepasegError(f"train_overrides: {key!r} cannot be overridden: expected one of {', '.join(allowed)}")
    # Resolve hardware defaults (precision) ONCE so every run of the comparison shares them.
    probe = resolve_config(TrainConfig(data=str(data), model=names[0], out=str(out), width=width,
                                       max_epochs=max_epochs, max_minutes=max_minutes_per_run, **overrides))
    shared = {k: v for k, v in probe.to_dict().items() if k not in _OWN_FIELDS}
    protocol = json_safe({
        "data": str(data.resolve()), "split": split, "width": width, "max_epochs": max_epochs,
        "max_minutes_per_run": max_minutes_per_run, "train": shared,
        # Only when given, so that folders written before the option existed still resume.
        **({"model_options": dict(model_options)} if model_options else {}),
    })
    out.mkdir(parents=True, exist_ok=True)
    if out_state == "new":
        write_output_marker(out, "compare")
    _check_protocol(out, protocol)
    return _Setup(data=data, out=out, names=names, seeds=seeds, width=width, max_epochs=max_epochs,
                  max_minutes_per_run=max_minutes_per_run, split=split, shared=shared, protocol=protocol,
                  manifest=manifest, model_options=dict(model_options or {}))


def _is_done(setup: _Setup, name: str, seed: int) -> bool:
    run = setup.run_dir(name, seed)
    return _run_state(run, run / f"eval-{setup.split}") == "done"


def _train_and_evaluate(setup: _Setup, name: str, seed: int, claim: Claim, say: Callable[[str], None],
                        where: str) -> None:
    """Train (or resume) one run, evaluate it, and publish its marker while ``claim`` is ours."""
    from hepaseg.training import TrainConfig, train

    run = setup.run_dir(name, seed)
    eval_dir = run / f"eval-{setup.split}"
    state = _run_state(run, eval_dir)
    say(f"{where}: {'resuming' if state == 'resume' else 'training'}")
    config = TrainConfig(data=str(setup.data), model=name, out=str(run), seed=seed, width=setup.width,
                         model_options=dict(setup.model_options), max_epochs=setup.max_epochs,
                         max_minutes=setup.max_minutes_per_run,
                         resume=state == "resume", overwrite=state == "restart", progress_bar=False, **setup.shared)
    result = train(config)
    ckpt = result.best_checkpoint or result.last_checkpoint
    if ckpt is None:
        raise HepasegError(f"{run}: training wrote no checkpoint: expected best.ckpt or last.ckpt. "
                           "Raise --max-minutes-per-run")
    say(f"{where}: evaluating {ckpt.name} on {setup.split}")
    evaluate_checkpoint(ckpt, setup.data, split=setup.split, out=eval_dir, device=None)
    if not claim.still_owned():
        raise HepasegError(f"{run}: another worker took this run over while it ran (its claim went stale): "
                           "expected to hold it to the end. Its result is left to that worker")
    write_json_atomic(run / _MARKER, json_safe({
        "model": name, "seed": seed, "checkpoint": str(ckpt),
        "train": result.to_dict(), "eval": str(eval_dir / "metrics.json"),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }))


def compare(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    models: str | Sequence[str] = "all",
    seeds: int = 3,
    width: int = 64,
    max_minutes_per_run: float | None = None,
    max_epochs: int = 50,
    train_overrides: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    split: str = "test",
    timing_repeats: int = 5,
    log: Callable[[str], None] | None = None,
) -> CompareResult:
    """Train, evaluate and tabulate ``models`` x ``seeds`` under one protocol (see the module docstring).

    Runs one after another in this process (:func:`compare_run` splits the same work over
    cluster array tasks or local workers; each run is claimed, so this call may share ``out``
    with such workers: it waits for the runs they hold).

    Args:
        data: prepared dataset directory with train, val and ``split`` cases.
        out: comparison directory (created; rerun with the same arguments to resume).
        models: ``"all"`` (default: the ten registered networks), ``"unet,mfcnet"`` or a list.
        seeds: number of seeds per model, >= 1 (default 3); seeds ``0 .. seeds - 1``.
        width: ``base_width`` of every network (default 64, the papers').
        max_minutes_per_run: wall-clock training budget of each run (default None: epochs only).
        max_epochs: epoch budget of each run (default 50).
        train_overrides: further :class:`hepaseg.training.TrainConfig` fields shared by every
            run (``batch_size``, ``precision``, ``lr``, ``loss``, ``augment``, ``accelerator``...).
            ``precision=None`` is resolved once from the hardware so all runs share it.
        model_options: architecture options passed to every listed model (each must accept
            them), e.g. ``{"channel_form": "slides"}`` with ``models="mfcnet"``; default none.
        split: split to evaluate on (default ``"test"``).
        timing_repeats: timed passes of the CPU ms/slice measurement (default 5, after 2 warm-up).
        log: called with one line per step (e.g. ``console.print``); default silent.

    Returns:
        A :class:`CompareResult`; the same numbers are in ``OUT/table.md``, ``results.csv``,
        ``wilcoxon.csv`` and ``dice_boxplot.png``.

    Raises:
        HepasegError: unknown model, seeds < 1, missing data or split, an override that is not a
            TrainConfig field (or one compare sets itself), a protocol that differs from the one
            already in ``out``, or any training/evaluation error.
    """
    t_start = time.perf_counter()
    say = log or (lambda _msg: None)
    setup = _setup(data, out, models=models, seeds=seeds, width=width, max_minutes_per_run=max_minutes_per_run,
                   max_epochs=max_epochs, train_overrides=train_overrides, split=split,
                   model_options=model_options)
    trained: list[tuple[str, int]] = []
    total = len(setup.runs)
    for entry in setup.runs:
        name, seed = entry["model"], entry["seed"]
        where = f"[{entry['index'] + 1}/{total}] {name} seed {seed}"
        outcome = run_claimed(
            setup.out / CLAIMS_DIR, entry["id"], lambda n=name, k=seed: _is_done(setup, n, k),
            lambda claim, n=name, k=seed, w=where: _train_and_evaluate(setup, n, k, claim, say, w),
            wait=True, log=say,
        )
        if outcome == "ran":
            trained.append((name, seed))
        else:
            say(f"{where}: done already, skipped")
    return _collect(setup, timing_repeats=timing_repeats, say=say, trained=trained, t_start=t_start)


def compare_plan(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    models: str | Sequence[str] = "all",
    seeds: int = 3,
    width: int = 64,
    max_minutes_per_run: float | None = None,
    max_epochs: int = 50,
    train_overrides: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Pin the protocol and write ``OUT/plan.json``: the runs that ``compare_run`` executes by index.

    Arguments as :func:`compare`. Returns the runs: ``index``, ``id`` (``model/seed<k>``),
    ``model``, ``seed``; index ``i`` is array task ``i`` (``sbatch --array=0-<n-1>``).
    """
    setup = _setup(data, out, models=models, seeds=seeds, width=width, max_minutes_per_run=max_minutes_per_run,
                   max_epochs=max_epochs, train_overrides=train_overrides, split=split,
                   model_options=model_options)
    write_json_atomic(setup.out / PLAN_FILE, {"kind": "compare", "runs": setup.runs, "protocol": setup.protocol})
    return setup.runs


def read_plan(out: str | os.PathLike, kind: str, expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``OUT/plan.json``'s runs, checked against the runs this call's options give.

    Raises:
        HepasegError: no plan (run ``--plan`` first), another kind's plan, or other runs.
    """
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise HepasegError(f"{path}: plan not found: expected the plan that `--plan` writes. Run the same command "
                           "with --plan once before the array job")
    plan = json.loads(path.read_text())
    if plan.get("kind") != kind:
        raise HepasegError(f"{path}: plan of {plan.get('kind')!r}: expected a {kind} plan. Use another --out")
    if [r["id"] for r in plan["runs"]] != [r["id"] for r in expected]:
        raise HepasegError(f"{path}: the plan lists other runs than this call's options give: expected "
                           f"{len(expected)} runs ({', '.join(r['id'] for r in expected[:3])}...), got "
                           f"{len(plan['runs'])}. Pass the same --models/--seeds (and options) as --plan")
    return plan["runs"]


def run_index_from_env(run_index: int | None) -> int | None:
    """``run_index``, or ``$SLURM_ARRAY_TASK_ID`` when it is None and set (an array task), else None."""
    if run_index is not None:
        return run_index
    value = os.environ.get("SLURM_ARRAY_TASK_ID")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise HepasegError(f"SLURM_ARRAY_TASK_ID: expected an integer array index, got {value!r}. Pass "
                           "--run-index") from None


def run_plan(runs: list[dict[str, Any]], claims: Path, run_index: int | None, is_done, work, say) -> dict[str, list]:
    """Execute plan entry ``run_index`` (waiting while a live worker holds it), or (None) every entry
    no live worker holds, each claimed.

    ``is_done(entry)`` and ``work(entry, claim, where)`` do the caller's part. Returns
    ``{"ran": [ids], "done": [ids], "held": [ids]}``.
    """
    if run_index is not None:
        if not 0 <= run_index < len(runs):
            raise HepasegError(f"--run-index: expected 0..{len(runs) - 1} (the plan has {len(runs)} runs), got "
                               f"{run_index}")
        chosen = [runs[run_index]]
    else:
        chosen = runs
    outcome: dict[str, list] = {"ran": [], "done": [], "held": []}
    for entry in chosen:
        where = f"[{entry['index']}] {entry['id']}"
        # An array task owns its index: it waits for a live holder (a requeued task whose killed
        # predecessor's claim has not gone stale yet) rather than leave the run undone. A worker
        # looping over the plan leaves held runs to their holders.
        result = run_claimed(claims, entry["id"], lambda e=entry: is_done(e),
                             lambda claim, e=entry, w=where: work(e, claim, w), wait=run_index is not None,
                             poll_s=30.0, log=say)
        outcome[result].append(entry["id"])
        if result == "held":
            owner = claim_owner(claims, entry["id"]) or {}
            say(f"{where}: held by {owner.get('host')}:{owner.get('pid')}, left to it")
        elif result == "done":
            say(f"{where}: done already")
    return outcome


def compare_run(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    run_index: int | None = None,
    models: str | Sequence[str] = "all",
    seeds: int = 3,
    width: int = 64,
    max_minutes_per_run: float | None = None,
    max_epochs: int = 50,
    train_overrides: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    split: str = "test",
    log: Callable[[str], None] | None = None,
) -> dict[str, list]:
    """Train and evaluate plan entry ``run_index`` of ``OUT/plan.json`` (one array task), or with
    ``run_index=None`` every entry that no live worker holds (a local worker).

    Each run is claimed first (:mod:`hepaseg.io.claims`): a run whose worker died (its process is
    gone on this host, or its heartbeat is 10 minutes old) is taken over and resumed from its
    ``last.ckpt``; a run a live worker holds is waited for with ``run_index`` and left to it
    without. Arguments as :func:`compare`, which must match ``--plan``'s.

    Returns:
        ``{"ran": [ids], "done": [ids], "held": [ids]}`` for the entries this call looked at.
    """
    say = log or (lambda _msg: None)
    setup = _setup(data, out, models=models, seeds=seeds, width=width, max_minutes_per_run=max_minutes_per_run,
                   max_epochs=max_epochs, train_overrides=train_overrides, split=split,
                   model_options=model_options)
    runs = read_plan(setup.out, "compare", setup.runs)
    return run_plan(
        runs, setup.out / CLAIMS_DIR, run_index,
        lambda e: _is_done(setup, e["model"], e["seed"]),
        lambda e, claim, where: _train_and_evaluate(setup, e["model"], e["seed"], claim, say, where), say,
    )


def compare_collect(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    models: str | Sequence[str] = "all",
    seeds: int = 3,
    width: int = 64,
    max_minutes_per_run: float | None = None,
    max_epochs: int = 50,
    train_overrides: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    split: str = "test",
    timing_repeats: int = 5,
    log: Callable[[str], None] | None = None,
) -> CompareResult:
    """Tables, tests and plots from the runs finished so far; ``missing`` names the others.

    Arguments as :func:`compare`. Trains nothing. Raises HepasegError when no run has finished.
    """
    setup = _setup(data, out, models=models, seeds=seeds, width=width, max_minutes_per_run=max_minutes_per_run,
                   max_epochs=max_epochs, train_overrides=train_overrides, split=split,
                   model_options=model_options)
    return _collect(setup, timing_repeats=timing_repeats, say=log or (lambda _msg: None), trained=[],
                    t_start=time.perf_counter())


def _collect(setup: _Setup, *, timing_repeats: int, say, trained, t_start: float) -> CompareResult:
    from hepaseg.models import count_parameters
    from hepaseg.training import load_checkpoint

    out, split, seeds = setup.out, setup.split, setup.seeds
    runs: list[dict[str, Any]] = []
    missing: list[tuple[str, int]] = []
    dice_by_model: dict[str, dict[tuple, float]] = {}
    loaded_any: dict[str, Path] = {}
    for entry in setup.runs:
        name, seed = entry["model"], entry["seed"]
        dice_by_model.setdefault(name, {})
        if not _is_done(setup, name, seed):
            missing.append((name, seed))
            continue
        run = setup.run_dir(name, seed)
        eval_dir = run / f"eval-{split}"
        marker = json.loads((run / _MARKER).read_text())
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        loaded_any.setdefault(name, Path(marker["checkpoint"]))
        train_info = marker["train"]
        summary = {k: (math.nan if v is None else v) for k, v in metrics["summary"].items()}
        runs.append({
            "model": name, "seed": seed, **{k: summary[k] for k in summary},
            "epochs": train_info.get("epochs"), "best_val_dice": train_info.get("best_val_dice"),
            "stopped_by_time": train_info.get("stopped_by_time"), "train_wall_s": train_info.get("wall_seconds"),
            "checkpoint": marker["checkpoint"],
        })
        for (case, z), d in _read_slice_dice(eval_dir / "slices.csv").items():
            dice_by_model[name][(seed, case, z)] = d
    if missing:
        say(f"missing (not finished): {', '.join(f'{n}/seed{k}' for n, k in missing)}")
    names = [n for n in setup.names if n in loaded_any]  # models with at least one finished run
    if not names:
        raise HepasegError(f"{out}: no finished run to collect: expected at least one of the "
                           f"{len(setup.runs)} planned runs done. Run the workers (--run-index) first")
    dice_by_model = {n: dice_by_model[n] for n in names}

    paths: dict[str, Path] = {}
    for name in names:
        members = [r["checkpoint"] for r in runs if r["model"] == name]
        paths[f"ensemble_{name}"] = write_ensemble_list(
            out / "ensembles" / f"{name}.json", members, model=name, source="compare",
            note=f"{len(members)} seed(s) of {name}, each with the checkpoint compare evaluated (best.ckpt, or "
                 "last.ckpt without validation); predict with --checkpoints-from this file")

    # Size and speed, measured now on this machine (after training, so nothing else of ours runs).
    params: dict[str, int] = {}
    cpu_ms: dict[str, float] = {}
    size = int(setup.manifest["options"]["size"])
    for name in names:
        loaded = load_checkpoint(loaded_any[name])
        params[name] = count_parameters(loaded.model)
        say(f"timing {name} on CPU ({size} px, batch 8, fp32)")
        cpu_ms[name] = cpu_ms_per_slice(loaded.model, in_channels=loaded.in_channels, size=size,
                                        repeats=timing_repeats)
    for row in runs:
        row["params"] = params[row["model"]]
        row["cpu_ms_per_slice"] = cpu_ms[row["model"]]

    tests: list[dict[str, Any]] = []
    if REFERENCE_MODEL in names:
        for name in names:
            if name != REFERENCE_MODEL:
                tests.append({"reference": REFERENCE_MODEL, "baseline": name,
                              **wilcoxon_vs(dice_by_model[REFERENCE_MODEL], dice_by_model[name])})

    metric_cols = [k for m in SLICE_METRICS for k in (m, f"{m}_sd")] + ["f1", "f1_mean_per_slice", "n_slices"]
    run_cols = ["model", "seed", *metric_cols, "params", "cpu_ms_per_slice", "epochs", "best_val_dice",
                "stopped_by_time", "train_wall_s", "checkpoint"]
    paths["results"] = write_csv_atomic(out / "results.csv", runs, run_cols)
    test_cols = ["reference", "baseline", "n", "n_nonzero", "median_diff", "statistic", "p_value", "note"]
    paths["wilcoxon"] = write_csv_atomic(out / "wilcoxon.csv", tests, test_cols)
    paths["boxplot"] = _boxplot(out / "dice_boxplot.png", dice_by_model, seeds)
    wall = time.perf_counter() - t_start
    table = _table_markdown(names, seeds, runs, params, cpu_ms, tests, setup.protocol, setup.manifest, setup.data,
                            split, trained, wall, missing)
    paths["table"] = write_text_atomic(out / "table.md", table)
    return CompareResult(out=out, models=names, seeds=list(range(seeds)), runs=runs, wilcoxon=tests, params=params,
                         cpu_ms_per_slice=cpu_ms, trained=trained, table=table, protocol=setup.protocol,
                         wall_seconds=wall, paths=paths, missing=missing)


def _boxplot(path: Path, dice_by_model: Mapping[str, Mapping[tuple, float]], seeds: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in CI and over ssh
    import matplotlib.pyplot as plt

    names = list(dice_by_model)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 4.0), dpi=120)
    ax.boxplot([list(dice_by_model[n].values()) for n in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_ylabel("per-slice Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Test-slice Dice per model ({f'{seeds} seeds pooled' if seeds > 1 else '1 seed'})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def _table_markdown(names, seeds, runs, params, cpu_ms, tests, protocol, manifest, data, split, trained,
                    wall, missing=()) -> str:
    means: dict[str, dict[str, float]] = {}
    sds: dict[str, dict[str, float]] = {}
    epochs: dict[str, str] = {}
    for name in names:
        rows = [r for r in runs if r["model"] == name]
        keys = [*SLICE_METRICS, "f1"]
        means[name] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        if seeds > 1:
            sds[name] = {k: float(np.std([r[k] for r in rows], ddof=1)) for k in SLICE_METRICS}
        epochs[name] = "/".join(str(r["epochs"]) for r in rows)
    n_slices = runs[0]["n_slices"] if runs else 0
    train = protocol["train"]
    lines = []
    demo = bool(manifest.get("demo_z_split", False))
    title = "hepaseg compare" + (" — SMOKE comparison (demo z-split)" if demo else "")
    lines += [f"# {title}", ""]
    if demo:
        lines += [("**Warning: smoke comparison on one patient's z-blocks, not a patient-level split.** "
                  "Slices of one patient are strongly correlated; these numbers say nothing about "
                  "generalisation to new patients."), ""]
    sd_text = f"mean ± sd over {seeds} seeds" if seeds > 1 else "1 seed (no sd)"
    lines += [(f"Table 1 layout: per-slice metrics averaged over the {n_slices} {split} slices, {sd_text}. "
              "F1 = 2PR/(P+R) of mean precision and mean recall (the paper's definition; mean over seeds)."), ""]
    extra = {
        "Params (M)": {n: f"{params[n] / 1e6:.3f}" for n in names},
        "CPU ms/slice": {n: cpu_ms[n] for n in names},
        "Epochs": epochs,
    }
    lines.append(table1_markdown(means, sd=sds or None, extra=extra).rstrip("\n"))
    lines += ["", "## Paired Wilcoxon signed-rank tests (per-slice Dice)", ""]
    if REFERENCE_MODEL not in names:
        lines.append(f"Skipped: {REFERENCE_MODEL} is not among the compared models.")
    elif not tests:
        lines.append(f"Skipped: no baseline besides {REFERENCE_MODEL}.")
    else:
        lines += [f"| {REFERENCE_MODEL} vs | pairs | non-zero | median Δ Dice (pp) | W | p (two-sided) | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for t in tests:
            stat = "–" if math.isnan(t["statistic"]) else f"{t['statistic']:.1f}"
            lines.append(f"| {t['baseline']} | {t['n']} | {t['n_nonzero']} | {100 * t['median_diff']:+.2f} | "
                         f"{stat} | {_fmt_p(t['p_value'])} | {t['note'] or ''} |")
        lines += ["", ("Pairs are (seed, case, slice); Δ = mfcnet − baseline. scipy.stats.wilcoxon, two-sided, "
                  "zero differences dropped (zero_method='wilcox'); no multiple-comparison correction.")]
    budget = f"{protocol['max_epochs']} epochs max"
    if protocol["max_minutes_per_run"]:
        budget += f", {protocol['max_minutes_per_run']:g} min wall-clock max per run"
    lines += [
        "",
        "## Protocol",
        "",
        f"- data: `{data}` ({split} split; manifest window {manifest['options'].get('window')}, size "
        f"{manifest['options'].get('size')} px, slices {manifest['options'].get('slices')!r}, context_slices "
        f"{manifest['options'].get('context_slices')})" + ("; **demo_z_split: smoke comparison on one patient's "
                                                            "z-blocks, not a patient-level split**" if demo else ""),
        *([f"- {note}; best.ckpt is chosen on it"] if (note := val_note(manifest)) is not None else []),
        (f"- every run: width {protocol['width']}, budget {budget}, batch size {train['batch_size']}, "
        f"loss {train['loss']}, AdamW lr {train['lr']:g} (wd {train['weight_decay']:g}, {train['schedule']}), "
        f"augmentation {'on' if train['augment'] else 'off'}, precision {train['precision']}, "
        f"seeds 0..{seeds - 1}; evaluated with its best.ckpt (best val Dice; last.ckpt if no validation ran), "
        "fp32, threshold 0.5"),
        (f"- CPU ms/slice: fp32 inference at {manifest['options'].get('size')} px, batch 8, median of timed passes "
        f"after 2 warm-up passes, {torch.get_num_threads()} torch threads, this machine (shared machines make it "
        "noisy)"),
        "- Epochs: epochs completed per seed (a time budget stops runs at different epochs)",
        ("- Significance: the paper (Pang et al., PAKDD 2020) reports no significance tests; we add the paired "
        "Wilcoxon signed-rank tests above."),
        f"- this call: trained or resumed {len(trained)} of {len(runs)} runs, {wall / 60:.1f} min wall",
    ]
    if missing:
        lines.append(f"- **incomplete: {len(missing)} planned run(s) not finished, left out of every number above: "
                     + ", ".join(f"{n}/seed{k}" for n, k in missing) + "**")
    return "\n".join(lines) + "\n"
