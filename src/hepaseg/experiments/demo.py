"""``hepaseg demo``: the whole product in one command, on one real CT case, on a CPU, in minutes.

:func:`run_demo` runs every stage of the package on the LiTS-117 sample (LiTS
training case 117, a 128^3 crop with liver and tumour labels) and writes a
self-contained ``report.html``::

    DIR/.hepaseg-demo                marker: DIR is a demo output and may be replaced by the next demo
    DIR/sample/                      volume-117.nii.gz + segmentation-117.nii.gz   (hepaseg sample)
    DIR/prepared/                    slice dataset with the DEMO z-split           (hepaseg prepare)
    DIR/runs/{mfcnet,unet}/          checkpoints and CSV logs                      (hepaseg train)
    DIR/eval/{mfcnet,unet}/          Table-1 metrics on the test z-block           (hepaseg evaluate)
    DIR/heldout/                     the test z-block as a LiTS-layout sub-volume  (write_z_block)
    DIR/predict/                     tumor_mask.nii.gz, lesions.csv/json, overlay.png, metrics.json (hepaseg predict)
    DIR/explain.png                  MFCNet's context blocks on one held-out slice (hepaseg explain)
    DIR/curves.png                   train loss and validation Dice per epoch
    DIR/slice_dice.png               test Dice of each slice along z, both networks
    DIR/report.html                  everything above in one file
    DIR/demo.json                    the numbers of the report, machine-readable (written last)

Honesty of the split. One patient cannot give a patient-level evaluation. The demo
cuts the volume along z into three contiguous blocks (train: lowest 60 %, val 20 %,
test: highest 20 %, with unused gap slices between them so that no context channel
crosses a block) and says so in bold in the report: slices of one patient are
strongly correlated, so the scores are optimistic and only show that the pipeline
works end to end.

The whole-volume prediction runs on the held-out test block only: the block is
written as its own NIfTI sub-volume (same voxels, labels and spacing; the affine's
origin moved to the block's first slice, so it overlays the full scan), and
``predict_case`` sees nothing else. Its volume metrics therefore score slices that
no network trained on. The better network for that prediction is chosen by its
VALIDATION Dice (never by the test scores it is then reported with).

Time budget. ``minutes`` is split: 40 % for each network's training (Lightning's
``max_minutes``), the rest for the other steps. Because the learning-rate
schedule (warm-up + cosine) is laid out over ``max_epochs``, the demo first times a
few training steps of each network and chooses the number of epochs that fits the
budget, so the schedule runs to its end instead of being cut in its warm-up.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.io.atomic import write_json_atomic
from hepaseg.io.outputs import OUTPUT_MARKER, check_output_dir, write_output_marker

__all__ = [
    "DEMO_MARKER",
    "DEMO_MODELS",
    "DEMO_Z_SPLIT",
    "DemoResult",
    "default_sample_source",
    "run_demo",
    "write_z_block",
]

#: File that marks a folder as a hepaseg output; the next demo replaces a folder whose marker names
#: the demo (and one with the ``.hepaseg-demo`` marker of earlier versions).
DEMO_MARKER = OUTPUT_MARKER
#: Networks the demo trains, in report order (the paper's method and its baseline).
DEMO_MODELS = ("mfcnet", "unet")
#: Fractions (train, val, test) of the contiguous z blocks.
DEMO_Z_SPLIT = (0.6, 0.2, 0.2)
#: Share of the time budget for each network's training.
TRAIN_SHARE = 0.4
Z_SPLIT_WARNING = (
    "Demonstration only: train, validation and test are contiguous z-blocks of ONE patient (LiTS case 117), "
    "a single-patient z-split, not a patient-level evaluation. Neighbouring slices of one patient are strongly "
    "correlated, so these scores are optimistic and say nothing about performance on new patients."
)
_REPO_ROOT = Path(__file__).resolve().parents[3]  # src/hepaseg/experiments/demo.py -> the checkout (editable installs)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced (all paths inside ``out_dir``).

    Attributes:
        out_dir: the demo folder.
        report: ``out_dir/report.html``.
        table1: ``{model: summarize_slices() summary}`` on the test z-block (fractions, Hausdorff px).
        params: ``{model: trainable parameters}``.
        ms_per_slice: ``{model: forward ms per slice}`` measured by the evaluation (fp32, CPU or CUDA).
        best_val_dice: ``{model: best validation Dice of its run}`` (None: no validation finished).
        chosen_model: the network used for the whole-volume prediction (best validation Dice).
        volume_metrics: ``volume_metrics()`` of that prediction on the held-out block (mm, fractions).
        lesions: lesion rows of the prediction.
        timings: ``{step: seconds}``, plus ``total``.
        commands: ``[(step, shell command)]`` that reproduce each step.
        paths: ``{name: path}`` of the main outputs.
    """

    out_dir: Path
    report: Path
    table1: dict[str, dict[str, Any]]
    params: dict[str, int]
    ms_per_slice: dict[str, float]
    best_val_dice: dict[str, float | None]
    chosen_model: str
    volume_metrics: dict[str, Any] | None
    lesions: list[dict[str, Any]]
    timings: dict[str, float]
    commands: list[tuple[str, str]]
    paths: dict[str, Path] = field(default_factory=dict)


def default_sample_source() -> Path | None:
    """An offline copy of the LiTS-117 MRC files, or None (then the sample is downloaded).

    Looks in ``$HEPASEG_SHARED_DATA/lits117`` and then ``../shared/data/lits117`` beside the
    checkout; a folder counts only when it holds ``img_117.mrc``.
    """
    candidates = []
    if os.environ.get("HEPASEG_SHARED_DATA"):
        candidates.append(Path(os.environ["HEPASEG_SHARED_DATA"]) / "lits117")
    candidates.append(_REPO_ROOT.parent / "shared" / "data" / "lits117")
    return next((c for c in candidates if (c / "img_117.mrc").is_file()), None)


def _check_out_dir(out: Path, sample_dir: Path | None) -> bool:
    """Refuse an ``out`` that is a file, holds anything but an earlier demo, or overlaps the sample
    folder; True: an earlier demo (replaced)."""
    return check_output_dir(out, command="demo", inputs=[sample_dir], overwrite=True) == "own"


def _claim_out_dir(out: Path, sample_dir: Path | None) -> None:
    """Create ``out`` (or empty an earlier demo output there) and write the marker first."""
    if _check_out_dir(out, sample_dir):
        shutil.rmtree(out)  # an earlier demo's output (it has our marker): ours to replace
    out.mkdir(parents=True, exist_ok=True)
    write_output_marker(out, "demo")


def write_z_block(volume_file: str | os.PathLike, out_dir: str | os.PathLike, z_start: int, z_stop: int) -> Path:
    """Write slices ``z_start <= z < z_stop`` of a labelled case as a LiTS-layout sub-volume.

    The sub-volume keeps the voxels (HU), the label map and the spacing; its affine is the
    source's with the origin moved to slice ``z_start`` (``A @ translate(k = z_start)``), so it
    overlays the full scan in a viewer.

    Args:
        volume_file: a labelled case :func:`hepaseg.io.read_volume` reads (e.g. ``volume-117.nii.gz``).
        out_dir: folder for ``volume-<N>.nii.gz`` + ``segmentation-<N>.nii.gz`` (``N`` from the
            case id ``lits-N``, else ``0``).
        z_start, z_stop: the axial range, ``0 <= z_start < z_stop <= depth``.

    Returns:
        The written ``volume-<N>.nii.gz``.
    """
    from hepaseg.io import Volume, read_volume, write_image_nifti, write_label_nifti

    vol = read_volume(volume_file, with_label=True)
    depth = vol.shape[0]
    if not 0 <= z_start < z_stop <= depth:
        raise HepasegError(
            f"{volume_file}: z block [{z_start}, {z_stop}) out of range: expected 0 <= start < stop <= {depth}."
        )
    if vol.label is None:
        raise HepasegError(f"{volume_file}: no label map: expected a labelled case (LiTS, MSD, MRC sample).")
    shift = np.eye(4)
    shift[2, 3] = z_start  # NIfTI index order (i, j, k) = (x, y, z)
    block = Volume(
        image=np.ascontiguousarray(vol.image[z_start:z_stop]),
        label=np.ascontiguousarray(vol.label[z_start:z_stop]),
        spacing=vol.spacing,
        affine=np.asarray(vol.affine, dtype=np.float64) @ shift,
        case_id=vol.case_id,
        kind=vol.kind,
    )
    number = vol.case_id.split("-")[-1] if vol.case_id.startswith("lits-") else "0"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_label_nifti(block.label, block, out / f"segmentation-{number}.nii.gz")
    return write_image_nifti(block, out / f"volume-{number}.nii.gz")


def _time_training_step(
    model: str,
    *,
    size: int,
    width: int,
    batch_size: int,
    precision: str,
    channels_last: bool,
    max_seconds: float = 10.0,
) -> float:
    """Seconds of one CPU training step (forward, backward, AdamW) of ``model`` on random slices.

    The median of up to three steps after one warm-up step (which pays one-off costs: allocator,
    oneDNN kernel choice), stopping early once ``max_seconds`` are spent (a slow machine must not
    spend its budget on measuring); NaN on a CUDA machine, where the demo does not need to plan.
    """
    import torch

    from hepaseg.models import build_model

    if torch.cuda.is_available():
        return float("nan")
    torch.manual_seed(0)
    net = build_model(model, in_channels=1, num_classes=1, base_width=width)
    x = torch.rand(batch_size, 1, size, size)
    y = (torch.rand(batch_size, 1, size, size) > 0.9).float()
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    times: list[float] = []
    while len(times) < 4 and (len(times) < 2 or sum(times) < max_seconds):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))  # the median: one step slowed by another process does not count


def _epochs_for_budget(step_s: float, *, n_train: int, n_val: int, batch_size: int, budget_s: float) -> int:
    """Epochs of ``step_s``-second steps that fit ``budget_s`` seconds of ``Trainer.fit`` (1 to 100).

    The learning-rate schedule is laid out over ``max_epochs``, so it should end when the budget
    does; ``max_minutes`` still stops a run that turns out slower. Validation (forward only, about
    a third of a step per batch), data loading and checkpointing add to each epoch; 0.85 keeps a
    margin for a busy machine. On CUDA (``step_s`` NaN): 30 epochs, and the clock decides.
    """
    if not np.isfinite(step_s):
        return 30
    steps_per_epoch = max(1, n_train // batch_size)
    epoch_s = step_s * (1.25 * steps_per_epoch + 0.35 * -(-n_val // batch_size)) + 0.5
    return max(1, min(100, int(0.85 * budget_s / epoch_s)))


def _cmd(*parts: object) -> str:
    return shlex.join(str(p) for p in parts)


@dataclass
class _Settings:
    """The options of one :func:`run_demo` call that its steps share."""

    out: Path
    source: Path | None  # the offline LiTS-117 copy (None: download)
    minutes: float
    size: int
    width: int
    batch_size: int
    lr: float
    seed: int
    progress: bool


@dataclass
class _Log:
    """The demo's running record: where it prints, each step's seconds and the commands that reproduce it."""

    console: Console
    timings: dict[str, float] = field(default_factory=dict)  # in step order (the report lists them so)
    commands: list[tuple[str, str]] = field(default_factory=list)

    def step(self, name: str) -> None:
        self.console.rule(f"[bold]demo: {name}")


@dataclass
class _ZSplit:
    """The prepared demo z-split: where it is and how many slices each block holds."""

    volume_file: Path  # the sample's volume-117.nii.gz
    prepared: Path
    n_train: int
    n_val: int
    test_z: list[int]  # original z of the test block's kept slices


@dataclass
class _Trained:
    """One network's training step: its run, the checkpoint used from here on, its precision."""

    run: Any  # hepaseg.training.TrainResult
    checkpoint: Path  # best.ckpt, or last.ckpt when no validation finished
    precision: str


@dataclass
class _Evaluated:
    """One network's evaluation on the test z-block."""

    summary: dict[str, Any]  # summarize_slices() of the test slices
    rows: list[dict[str, Any]]  # per-slice metric rows
    ms_per_slice: float
    params: int


@dataclass
class _HeldOut:
    """The held-out test block as its own volume, and its whole-volume prediction."""

    volume: Path  # heldout/volume-117.nii.gz
    z0: int  # first original slice of the block
    z1: int  # one past its last
    chosen: str  # the network with the best validation Dice
    prediction: Any  # hepaseg.inference.PredictResult


def _check_options(*, minutes: float, size: int, width: int, batch_size: int) -> None:
    for option, value, ok, expected in (
        ("--minutes", minutes, isinstance(minutes, (int, float)) and minutes > 0, "a positive number"),
        ("size", size, isinstance(size, int) and size >= 16, "an integer >= 16"),
        ("width", width, isinstance(width, int) and width > 0, "a positive integer"),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size > 0, "a positive integer"),
    ):
        if not ok:
            raise HepasegError(f"{option}: invalid value: expected {expected}, got {value!r}.")


def _claim(out: Path, sample_dir: str | os.PathLike | None) -> Path | None:
    """Check ``out`` and the sample folder, then claim ``out``; return the sample source (None: download)."""
    source = Path(sample_dir) if sample_dir is not None else default_sample_source()
    _check_out_dir(out, source)  # before anything else, so a wrong --out is the error the user sees
    if sample_dir is not None and not (source / "img_117.mrc").is_file():
        raise HepasegError(
            f"{source}: --sample-dir has no img_117.mrc: expected the folder holding img_117.mrc and lab_117.mrc."
        )
    _claim_out_dir(out, source)
    return source


def _fetch_sample(log: _Log, s: _Settings) -> Path:
    """Step 1: the LiTS-117 sample as LiTS-layout NIfTI; returns its volume file."""
    from hepaseg.data.sample import fetch_lits117

    log.step("LiTS-117 sample")
    t0 = time.perf_counter()
    sample = fetch_lits117(s.out / "sample", from_dir=s.source)
    log.timings["sample"] = time.perf_counter() - t0
    from_dir = ("--from-dir", s.source) if s.source is not None else ()
    log.commands.append(("sample", _cmd("hepaseg", "sample", "lits117", "--dest", sample, *from_dir)))
    return sample / "volume-117.nii.gz"


def _prepare_z_split(log: _Log, s: _Settings, volume_file: Path) -> _ZSplit:
    """Step 2: prepare the tumour slices with the demo z-split (train / val / test blocks along z)."""
    from hepaseg.data.prepare import prepare

    log.step("prepare (demo z-split)")
    log.console.print(f"[yellow]demo split:[/] {Z_SPLIT_WARNING}", highlight=False)
    t0 = time.perf_counter()
    prepared = s.out / "prepared"
    manifest = prepare(
        [volume_file],
        prepared,
        size=s.size,
        slices="tumor",
        z_split={"fractions": list(DEMO_Z_SPLIT), "gap": None},
        progress=s.progress,
        console=log.console,
    )
    log.timings["prepare"] = time.perf_counter() - t0
    z_text = ",".join(f"{f:g}" for f in DEMO_Z_SPLIT)
    log.commands.append(("prepare", _cmd("hepaseg", "prepare", volume_file, "--out", prepared, "--size", s.size,
                                         "--slices", "tumor", "--z-split", z_text)))
    blocks = {c["split"]: c for c in manifest["cases"]}
    split = _ZSplit(volume_file, prepared, n_train=blocks["train"]["n_slices"], n_val=blocks["val"]["n_slices"],
                    test_z=blocks["test"]["kept_slices"])
    if not split.test_z or not split.n_val:
        raise HepasegError(
            f"{volume_file}: the demo z-split left no test or validation slices: expected "
            "a volume with tumour along z (the LiTS-117 sample has it in every slice)."
        )
    return split


def _train_in_budget(log: _Log, s: _Settings, split: _ZSplit, model: str) -> _Trained:
    """Step 3 (per network): time a training step, choose the epochs that fit the budget, train."""
    from hepaseg.training import TrainConfig, train
    from hepaseg.training.train import resolve_config

    train_minutes = TRAIN_SHARE * float(s.minutes)
    log.step(f"train {model} ({train_minutes:.2f} min)")
    t0 = time.perf_counter()
    config = resolve_config(TrainConfig(data=str(split.prepared), model=model, out=str(s.out / "runs" / model),
                                        width=s.width, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                                        progress_bar=s.progress))
    # The share covers the whole step: the probe and Lightning's start-up (~5 s) come out of it.
    step_s = _time_training_step(model, size=s.size, width=s.width, batch_size=s.batch_size,
                                 precision=str(config.precision), channels_last=bool(config.channels_last),
                                 max_seconds=0.1 * train_minutes * 60)
    fit_s = max(0.25 * train_minutes * 60, train_minutes * 60 - (time.perf_counter() - t0) - 5.0)
    epochs = _epochs_for_budget(step_s, n_train=split.n_train, n_val=split.n_val, batch_size=s.batch_size,
                                budget_s=fit_s)
    config.max_minutes = round(fit_s / 60, 3)
    log.console.print(f"{model}: {step_s:.2f} s per training step measured -> --max-epochs {epochs}, "
                      f"--max-minutes {config.max_minutes:g}", highlight=False)
    config.max_epochs = epochs
    result = train(config)
    log.timings[f"train {model}"] = time.perf_counter() - t0
    # A budget smaller than one epoch leaves no validated best.ckpt: fall back to last.ckpt.
    checkpoint = result.best_checkpoint or result.last_checkpoint
    if checkpoint is None:
        raise HepasegError(
            f"--minutes {s.minutes}: too short: {model} wrote no checkpoint in "
            f"{train_minutes:.2f} min. Give the demo more minutes."
        )
    log.commands.append((f"train {model}", _cmd(
        "hepaseg", "train", "--data", split.prepared, "--model", model, "--out", config.out, "--width", s.width,
        "--batch-size", s.batch_size, "--lr", f"{s.lr:g}", "--max-epochs", epochs, "--max-minutes",
        f"{config.max_minutes:g}", "--precision", config.precision, "--seed", s.seed,
    )))
    return _Trained(run=result, checkpoint=checkpoint, precision=str(config.precision))


def _evaluate_test_block(log: _Log, s: _Settings, split: _ZSplit, model: str, checkpoint: Path) -> _Evaluated:
    """Step 4 (per network): Table-1 metrics on the test z-block, parameters and ms per slice."""
    from hepaseg.evaluation.evaluate import evaluate_checkpoint
    from hepaseg.training import load_checkpoint

    log.step(f"evaluate {model}")
    t0 = time.perf_counter()
    eval_dir = s.out / "eval" / model
    ev = evaluate_checkpoint(checkpoint, split.prepared, split="test", out=eval_dir)
    log.timings[f"evaluate {model}"] = time.perf_counter() - t0
    params = int(sum(p.numel() for p in load_checkpoint(checkpoint).model.parameters() if p.requires_grad))
    log.commands.append((f"evaluate {model}", _cmd("hepaseg", "evaluate", "--checkpoint", checkpoint, "--data",
                                                   split.prepared, "--split", "test", "--out", eval_dir)))
    log.console.print(
        f"{model}: test Dice {100 * ev.summary['dice']:.2f} % over {ev.summary['n_slices']} slices", highlight=False
    )
    return _Evaluated(summary=dict(ev.summary), rows=ev.rows, ms_per_slice=float(ev.timings["ms_per_slice"]),
                      params=params)


def _predict_held_out(log: _Log, s: _Settings, split: _ZSplit, trained: dict[str, _Trained]) -> _HeldOut:
    """Step 5: the test block written as its own volume, predicted by the network with the best val Dice."""
    from hepaseg.inference import predict_case

    log.step("predict the held-out block")
    t0 = time.perf_counter()
    z0, z1 = int(min(split.test_z)), int(max(split.test_z)) + 1
    heldout = write_z_block(split.volume_file, s.out / "heldout", z0, z1)
    log.timings["held-out volume"] = time.perf_counter() - t0
    log.commands.append(("held-out volume", _cmd(
        "python",
        "-c",
        f"from hepaseg.experiments.demo import write_z_block; "
        f"write_z_block({json.dumps(str(split.volume_file))}, {json.dumps(str(s.out / 'heldout'))}, {z0}, {z1})",
    )))
    best_val = {m: trained[m].run.best_val_dice for m in DEMO_MODELS}
    chosen = max(DEMO_MODELS, key=lambda m: -1.0 if best_val[m] is None else best_val[m])  # ties: mfcnet
    t0 = time.perf_counter()
    checkpoint = trained[chosen].checkpoint
    prediction = predict_case(heldout, s.out / "predict", checkpoint=checkpoint, progress=s.progress)
    log.timings["predict"] = time.perf_counter() - t0
    log.commands.append(("predict", _cmd("hepaseg", "predict", heldout, "--checkpoint", checkpoint, "--out",
                                         s.out / "predict")))
    return _HeldOut(volume=heldout, z0=z0, z1=z1, chosen=chosen, prediction=prediction)


def _explain(log: _Log, s: _Settings, heldout: _HeldOut, checkpoint: Path) -> tuple[Any, int]:
    """Step 6: MFCNet's context blocks on the held-out slice with the most tumour; (explanation, its z)."""
    from hepaseg.io import read_volume
    from hepaseg.viz.explain import explain_slice

    log.step("explain")
    t0 = time.perf_counter()
    block = read_volume(heldout.volume, with_label=True)
    tumour_per_slice = (block.label == 2).reshape(block.shape[0], -1).sum(axis=1)
    z_local = int(np.argmax(tumour_per_slice))  # the first of the largest, when tied
    explanation = explain_slice(checkpoint, heldout.volume, z_local, s.out / "explain.png")
    log.timings["explain"] = time.perf_counter() - t0
    log.commands.append(("explain", _cmd("hepaseg", "explain", "--checkpoint", checkpoint, "--input", heldout.volume,
                                         "--slice", z_local, "--out", s.out / "explain.png")))
    return explanation, z_local


def _write_report(log: _Log, s: _Settings, split: _ZSplit, trained: dict[str, _Trained],
                  evaluated: dict[str, _Evaluated], heldout: _HeldOut, explanation: Any, z_local: int,
                  t_start: float) -> dict[str, Path]:
    """Step 7: training curves, Dice per slice and ``report.html``; returns the paths of the outputs."""
    from hepaseg.viz.curves import plot_slice_dice, plot_training_curves
    from hepaseg.viz.report import ReportContent, ReportFigure, write_report

    log.step("report")
    t0 = time.perf_counter()
    z0, z1, chosen, prediction = heldout.z0, heldout.z1, heldout.chosen, heldout.prediction
    curves = plot_training_curves({m: trained[m].run.run_dir for m in DEMO_MODELS}, s.out / "curves.png",
                                  title=f"LiTS-117 demo: {s.size} px, width {s.width}")
    slice_dice = plot_slice_dice({m: evaluated[m].rows for m in DEMO_MODELS}, s.out / "slice_dice.png",
                                 title=f"Dice per slice of the test z-block (slices {z0}-{z1 - 1})")
    table1 = {m: evaluated[m].summary for m in DEMO_MODELS}
    n_test = int(table1["mfcnet"]["n_slices"])
    best_val = {m: trained[m].run.best_val_dice for m in DEMO_MODELS}
    val_text = ", ".join(f"{m} {100 * v:.2f} %" if v is not None else f"{m} none" for m, v in best_val.items())
    log.timings["curves + report"] = time.perf_counter() - t0  # updated below, after writing
    log.timings["total"] = time.perf_counter() - t_start
    content = ReportContent(
        title="hepaseg demo: MFCNet vs U-Net on LiTS-117",
        subtitle=f"LiTS training case 117 (128 x 128 x 128 crop, nominal 1 mm voxels), {s.size} px slices, "
        f"width {s.width}, {s.minutes:g}-minute budget",
        warning=Z_SPLIT_WARNING,
        table1=table1,
        table1_extra={"Params": {m: evaluated[m].params for m in DEMO_MODELS},
                      "ms/slice": {m: evaluated[m].ms_per_slice for m in DEMO_MODELS}},
        table1_note=(
            f"Mean over the {n_test} slices of the test z-block (original slices {z0}-{z1 - 1}) at {s.size} x "
            f"{s.size} pixels, threshold 0.5; Hausdorff in pixels; F1 is the paper's (harmonic mean of the mean "
            "precision and the mean recall). ms/slice: fp32 forward time per slice during evaluation. Checkpoints: "
            "the best validation Dice of each run (last.ckpt when no validation finished)."
        ),
        slice_dice=ReportFigure(
            path=slice_dice,
            title="Dice per test slice",
            caption="Per-slice Dice of each network on the test z-block (an empty prediction "
            "on a slice with tumour scores 0).",
        ),
        curves=ReportFigure(
            path=curves,
            title="Training curves",
            caption="Mean training loss and mean per-slice validation Dice per epoch.",
        ),
        volume_metrics=prediction.metrics,
        volume_note=(
            f"{chosen} (best validation Dice: {val_text}) predicted the held-out test z-block as a volume: "
            f"slices {z0}-{z1 - 1} of LiTS-117 written as their own NIfTI (heldout/volume-117.nii.gz, same voxels "
            "and labels, origin moved to the block), so the prediction and its metrics cover only slices no "
            "network trained on. Distances in mm at the nominal 1 mm spacing of the sample."
        ),
        overlay=ReportFigure(
            path=prediction.paths["overlay"],
            title="Overlay",
            caption="Slices of the held-out block with the most predicted tumour: prediction "
            f"(red) and reference (green) outlines; z counts slices of the block "
            f"(original z = z + {z0}).",
        ),
        lesions=prediction.lesions,
        explanation=ReportFigure(
            path=explanation.path,
            title=f"MFCNet explanation, held-out slice {z_local} (original z {z0 + z_local})",
            caption="Input with query pixels, ground truth, prediction; context-block features before/after and "
            "the spatial attention of each query (the paper's Fig. 1). " + " ".join(explanation.notes),
        ),
        timings=log.timings,
        commands=log.commands,
        details={
            "case": "lits-117 (LiTS training case 117 = MSD Task03 liver_117)",
            "sample source": str(s.source) if s.source is not None else "pip download (cached)",
            "slice size (px)": s.size,
            "base width": s.width,
            "batch size": s.batch_size,
            "learning rate": s.lr,
            "seed": s.seed,
            "precision": ", ".join(f"{m} {trained[m].precision}" for m in DEMO_MODELS),
            "epochs run": ", ".join(f"{m} {trained[m].run.epochs}" for m in DEMO_MODELS),
            "stopped by the clock": ", ".join(f"{m} {trained[m].run.stopped_by_time}" for m in DEMO_MODELS),
            "z blocks (train / val / test slices)": f"{split.n_train} / {split.n_val} / {n_test}",
            "hepaseg": __version__,
        },
    )
    report = write_report(content, s.out / "report.html")
    log.timings["curves + report"] = time.perf_counter() - t0
    log.timings["total"] = time.perf_counter() - t_start
    return {"report": report, "curves": curves, "slice_dice": slice_dice, "explain": explanation.path,
            **prediction.paths}


def _write_demo_json(result: DemoResult) -> None:
    """Last: ``demo.json``, the report's numbers machine-readable (NaN sds of one slice become null)."""
    from hepaseg.evaluation.evaluate import json_safe

    write_json_atomic(
        result.out_dir / "demo.json",
        json_safe(
            {
                "format": "hepaseg-demo/1",
                "demo_z_split": True,
                "warning": Z_SPLIT_WARNING,
                "table1": result.table1,
                "params": result.params,
                "ms_per_slice": result.ms_per_slice,
                "best_val_dice": result.best_val_dice,
                "chosen_model": result.chosen_model,
                "volume_metrics": result.volume_metrics,
                "lesions": result.lesions,
                "timings": result.timings,
                "commands": [{"step": s, "command": c} for s, c in result.commands],
                "paths": {k: str(v) for k, v in result.paths.items()},
            }
        ),
    )


def run_demo(
    out: str | os.PathLike = "demo_out",
    *,
    minutes: float = 5.0,
    sample_dir: str | os.PathLike | None = None,
    size: int = 128,
    width: int = 8,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> DemoResult:
    """Fetch, prepare, train MFCNet and U-Net, evaluate, predict, explain, and write ``out/report.html``.

    Args:
        out: the demo folder: new, empty, or an earlier demo's output (which is replaced; a folder
            holding anything else is refused).
        minutes: total time budget in minutes (> 0; default 5): 40 % for each network's training,
            the rest for the other steps (which take well under a minute on 2 CPU cores).
        sample_dir: a folder holding ``img_117.mrc`` and ``lab_117.mrc`` (no download); default
            :func:`default_sample_source`, else ``pip download`` into the cache.
        size: slice size in pixels (default 128: the 128^3 sample at its own resolution).
        width: base width of both networks (default 8: about 0.5 M parameters, several epochs a
            minute on 2 CPU cores).
        batch_size: slices per training step (default 8).
        lr: AdamW peak learning rate (default 2e-3: a short schedule).
        seed: seed of training (CPU runs stopped by the schedule, not the clock, repeat exactly).
        progress: progress bars.
        console: where progress and tables go (default stdout).

    Returns:
        :class:`DemoResult`.

    Raises:
        HepasegError: bad options, an ``out`` holding other files, a sample that cannot be
            fetched, or any stage's own error.
    """
    _check_options(minutes=minutes, size=size, width=width, batch_size=batch_size)
    out = Path(out)
    source = _claim(out, sample_dir)
    t_start = time.perf_counter()
    s = _Settings(out=out, source=source, minutes=minutes, size=size, width=width, batch_size=batch_size, lr=lr,
                  seed=seed, progress=progress)
    log = _Log(console or Console())

    volume_file = _fetch_sample(log, s)  # 1
    split = _prepare_z_split(log, s, volume_file)  # 2
    trained = {model: _train_in_budget(log, s, split, model) for model in DEMO_MODELS}  # 3
    evaluated = {m: _evaluate_test_block(log, s, split, m, trained[m].checkpoint) for m in DEMO_MODELS}  # 4
    heldout = _predict_held_out(log, s, split, trained)  # 5
    explanation, z_local = _explain(log, s, heldout, trained["mfcnet"].checkpoint)  # 6
    paths = _write_report(log, s, split, trained, evaluated, heldout, explanation, z_local, t_start)  # 7

    result = DemoResult(
        out_dir=out,
        report=paths["report"],
        table1={m: evaluated[m].summary for m in DEMO_MODELS},
        params={m: evaluated[m].params for m in DEMO_MODELS},
        ms_per_slice={m: evaluated[m].ms_per_slice for m in DEMO_MODELS},
        best_val_dice={m: trained[m].run.best_val_dice for m in DEMO_MODELS},
        chosen_model=heldout.chosen,
        volume_metrics=heldout.prediction.metrics,
        lesions=heldout.prediction.lesions,
        timings=log.timings,
        commands=log.commands,
        paths=paths,
    )
    _write_demo_json(result)
    return result
