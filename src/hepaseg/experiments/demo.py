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
    from hepaseg.data.prepare import prepare
    from hepaseg.data.sample import fetch_lits117
    from hepaseg.evaluation.evaluate import evaluate_checkpoint, json_safe
    from hepaseg.inference import predict_case
    from hepaseg.training import TrainConfig, load_checkpoint, train
    from hepaseg.training.train import resolve_config
    from hepaseg.viz.curves import plot_slice_dice, plot_training_curves
    from hepaseg.viz.explain import explain_slice
    from hepaseg.viz.report import ReportContent, ReportFigure, write_report

    for option, value, ok, expected in (
        ("--minutes", minutes, isinstance(minutes, (int, float)) and minutes > 0, "a positive number"),
        ("size", size, isinstance(size, int) and size >= 16, "an integer >= 16"),
        ("width", width, isinstance(width, int) and width > 0, "a positive integer"),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size > 0, "a positive integer"),
    ):
        if not ok:
            raise HepasegError(f"{option}: invalid value: expected {expected}, got {value!r}.")
    console = console or Console()
    out = Path(out)
    source = Path(sample_dir) if sample_dir is not None else default_sample_source()
    _check_out_dir(out, source)  # before anything else, so a wrong --out is the error the user sees
    if sample_dir is not None and not (source / "img_117.mrc").is_file():
        raise HepasegError(
            f"{source}: --sample-dir has no img_117.mrc: expected the folder holding img_117.mrc and lab_117.mrc."
        )
    _claim_out_dir(out, source)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    commands: list[tuple[str, str]] = []

    def step(name: str) -> None:
        console.rule(f"[bold]demo: {name}")

    # 1. the sample ---------------------------------------------------------------------------
    step("LiTS-117 sample")
    t0 = time.perf_counter()
    sample = fetch_lits117(out / "sample", from_dir=source)
    timings["sample"] = time.perf_counter() - t0
    commands.append(
        (
            "sample",
            _cmd(
                "hepaseg",
                "sample",
                "lits117",
                "--dest",
                sample,
                *(("--from-dir", source) if source is not None else ()),
            ),
        )
    )
    volume_file = sample / "volume-117.nii.gz"

    # 2. prepare with the demo z-split ------------------------------------------------------------
    step("prepare (demo z-split)")
    console.print(f"[yellow]demo split:[/] {Z_SPLIT_WARNING}", highlight=False)
    t0 = time.perf_counter()
    prepared = out / "prepared"
    z_text = ",".join(f"{f:g}" for f in DEMO_Z_SPLIT)
    manifest = prepare(
        [volume_file],
        prepared,
        size=size,
        slices="tumor",
        z_split={"fractions": list(DEMO_Z_SPLIT), "gap": None},
        progress=progress,
        console=console,
    )
    timings["prepare"] = time.perf_counter() - t0
    commands.append(
        (
            "prepare",
            _cmd(
                "hepaseg",
                "prepare",
                volume_file,
                "--out",
                prepared,
                "--size",
                size,
                "--slices",
                "tumor",
                "--z-split",
                z_text,
            ),
        )
    )
    blocks = {c["split"]: c for c in manifest["cases"]}
    n_train, n_val = blocks["train"]["n_slices"], blocks["val"]["n_slices"]
    test_z = blocks["test"]["kept_slices"]
    if not test_z or not n_val:
        raise HepasegError(
            f"{volume_file}: the demo z-split left no test or validation slices: expected "
            "a volume with tumour along z (the LiTS-117 sample has it in every slice)."
        )

    # 3. train both networks ----------------------------------------------------------------------
    train_minutes = TRAIN_SHARE * float(minutes)
    runs, best_ckpt, best_val, precisions = {}, {}, {}, {}
    for model in DEMO_MODELS:
        step(f"train {model} ({train_minutes:.2f} min)")
        t0 = time.perf_counter()
        config = resolve_config(
            TrainConfig(
                data=str(prepared),
                model=model,
                out=str(out / "runs" / model),
                width=width,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                progress_bar=progress,
            )
        )
        # The share covers the whole step: the probe and Lightning's start-up (~5 s) come out of it.
        step_s = _time_training_step(
            model,
            size=size,
            width=width,
            batch_size=batch_size,
            precision=str(config.precision),
            channels_last=bool(config.channels_last),
            max_seconds=0.1 * train_minutes * 60,
        )
        fit_s = max(0.25 * train_minutes * 60, train_minutes * 60 - (time.perf_counter() - t0) - 5.0)
        epochs = _epochs_for_budget(step_s, n_train=n_train, n_val=n_val, batch_size=batch_size, budget_s=fit_s)
        config.max_minutes = round(fit_s / 60, 3)
        console.print(
            f"{model}: {step_s:.2f} s per training step measured -> --max-epochs {epochs}, "
            f"--max-minutes {config.max_minutes:g}",
            highlight=False,
        )
        config.max_epochs = epochs
        precisions[model] = str(config.precision)
        result = train(config)
        timings[f"train {model}"] = time.perf_counter() - t0
        runs[model] = result
        # A budget smaller than one epoch leaves no validated best.ckpt: fall back to last.ckpt.
        best_ckpt[model] = result.best_checkpoint or result.last_checkpoint
        best_val[model] = result.best_val_dice
        if best_ckpt[model] is None:
            raise HepasegError(
                f"--minutes {minutes}: too short: {model} wrote no checkpoint in "
                f"{train_minutes:.2f} min. Give the demo more minutes."
            )
        commands.append(
            (
                f"train {model}",
                _cmd(
                    "hepaseg",
                    "train",
                    "--data",
                    prepared,
                    "--model",
                    model,
                    "--out",
                    config.out,
                    "--width",
                    width,
                    "--batch-size",
                    batch_size,
                    "--lr",
                    f"{lr:g}",
                    "--max-epochs",
                    epochs,
                    "--max-minutes",
                    f"{config.max_minutes:g}",
                    "--precision",
                    config.precision,
                    "--seed",
                    seed,
                ),
            )
        )

    # 4. evaluate on the test z-block -----------------------------------------------------------
    table1, params, ms_per_slice, slice_rows = {}, {}, {}, {}
    for model in DEMO_MODELS:
        step(f"evaluate {model}")
        t0 = time.perf_counter()
        ev = evaluate_checkpoint(best_ckpt[model], prepared, split="test", out=out / "eval" / model)
        timings[f"evaluate {model}"] = time.perf_counter() - t0
        table1[model] = dict(ev.summary)
        slice_rows[model] = ev.rows
        ms_per_slice[model] = float(ev.timings["ms_per_slice"])
        params[model] = int(
            sum(p.numel() for p in load_checkpoint(best_ckpt[model]).model.parameters() if p.requires_grad)
        )
        commands.append(
            (
                f"evaluate {model}",
                _cmd(
                    "hepaseg",
                    "evaluate",
                    "--checkpoint",
                    best_ckpt[model],
                    "--data",
                    prepared,
                    "--split",
                    "test",
                    "--out",
                    out / "eval" / model,
                ),
            )
        )
        console.print(
            f"{model}: test Dice {100 * ev.summary['dice']:.2f} % over {ev.summary['n_slices']} slices", highlight=False
        )

    # 5. the held-out block as a volume, predicted by the network with the best validation Dice ----
    step("predict the held-out block")
    t0 = time.perf_counter()
    z0, z1 = int(min(test_z)), int(max(test_z)) + 1
    heldout = write_z_block(volume_file, out / "heldout", z0, z1)
    timings["held-out volume"] = time.perf_counter() - t0
    commands.append(
        (
            "held-out volume",
            _cmd(
                "python",
                "-c",
                f"from hepaseg.experiments.demo import write_z_block; "
                f"write_z_block({json.dumps(str(volume_file))}, {json.dumps(str(out / 'heldout'))}, {z0}, {z1})",
            ),
        )
    )
    chosen = max(DEMO_MODELS, key=lambda m: -1.0 if best_val[m] is None else best_val[m])  # ties: mfcnet
    t0 = time.perf_counter()
    prediction = predict_case(heldout, out / "predict", checkpoint=best_ckpt[chosen], progress=progress)
    timings["predict"] = time.perf_counter() - t0
    commands.append(
        ("predict", _cmd("hepaseg", "predict", heldout, "--checkpoint", best_ckpt[chosen], "--out", out / "predict"))
    )

    # 6. explain MFCNet on the held-out slice with the most tumour -------------------------------
    step("explain")
    t0 = time.perf_counter()
    from hepaseg.io import read_volume

    block = read_volume(heldout, with_label=True)
    tumour_per_slice = (block.label == 2).reshape(block.shape[0], -1).sum(axis=1)
    z_local = int(np.argmax(tumour_per_slice))  # the first of the largest, when tied
    explanation = explain_slice(best_ckpt["mfcnet"], heldout, z_local, out / "explain.png")
    timings["explain"] = time.perf_counter() - t0
    commands.append(
        (
            "explain",
            _cmd(
                "hepaseg",
                "explain",
                "--checkpoint",
                best_ckpt["mfcnet"],
                "--input",
                heldout,
                "--slice",
                z_local,
                "--out",
                out / "explain.png",
            ),
        )
    )

    # 7. curves and report ----------------------------------------------------------------------
    step("report")
    t0 = time.perf_counter()
    curves = plot_training_curves(
        {m: runs[m].run_dir for m in DEMO_MODELS}, out / "curves.png", title=f"LiTS-117 demo: {size} px, width {width}"
    )
    slice_dice = plot_slice_dice(
        slice_rows, out / "slice_dice.png", title=f"Dice per slice of the test z-block (slices {z0}-{z1 - 1})"
    )
    metrics = prediction.metrics
    lesions = prediction.lesions
    n_test = int(table1["mfcnet"]["n_slices"])
    val_text = ", ".join(f"{m} {100 * v:.2f} %" if v is not None else f"{m} none" for m, v in best_val.items())
    timings["curves + report"] = time.perf_counter() - t0  # updated below, after writing
    timings["total"] = time.perf_counter() - t_start
    content = ReportContent(
        title="hepaseg demo: MFCNet vs U-Net on LiTS-117",
        subtitle=f"LiTS training case 117 (128 x 128 x 128 crop, nominal 1 mm voxels), {size} px slices, "
        f"width {width}, {minutes:g}-minute budget",
        warning=Z_SPLIT_WARNING,
        table1=table1,
        table1_extra={"Params": params, "ms/slice": ms_per_slice},
        table1_note=(
            f"Mean over the {n_test} slices of the test z-block (original slices {z0}-{z1 - 1}) at {size} x {size} "
            "pixels, threshold 0.5; Hausdorff in pixels; F1 is the paper's (harmonic mean of the mean precision "
            "and the mean recall). ms/slice: fp32 forward time per slice during evaluation. Checkpoints: the "
            "best validation Dice of each run (last.ckpt when no validation finished)."
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
        volume_metrics=metrics,
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
        lesions=lesions,
        explanation=ReportFigure(
            path=explanation.path,
            title=f"MFCNet explanation, held-out slice {z_local} (original z {z0 + z_local})",
            caption="Input with query pixels, ground truth, prediction; context-block features before/after and "
            "the spatial attention of each query (the paper's Fig. 1). " + " ".join(explanation.notes),
        ),
        timings=timings,
        commands=commands,
        details={
            "case": "lits-117 (LiTS training case 117 = MSD Task03 liver_117)",
            "sample source": str(source) if source is not None else "pip download (cached)",
            "slice size (px)": size,
            "base width": width,
            "batch size": batch_size,
            "learning rate": lr,
            "seed": seed,
            "precision": ", ".join(f"{m} {p}" for m, p in precisions.items()),
            "epochs run": ", ".join(f"{m} {runs[m].epochs}" for m in DEMO_MODELS),
            "stopped by the clock": ", ".join(f"{m} {runs[m].stopped_by_time}" for m in DEMO_MODELS),
            "z blocks (train / val / test slices)": f"{n_train} / {n_val} / {n_test}",
            "hepaseg": __version__,
        },
    )
    report = write_report(content, out / "report.html")
    timings["curves + report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    paths = {
        "report": report,
        "curves": curves,
        "slice_dice": slice_dice,
        "explain": explanation.path,
        **prediction.paths,
    }
    result = DemoResult(
        out_dir=out,
        report=report,
        table1=table1,
        params=params,
        ms_per_slice=ms_per_slice,
        best_val_dice=best_val,
        chosen_model=chosen,
        volume_metrics=metrics,
        lesions=lesions,
        timings=timings,
        commands=commands,
        paths=paths,
    )
    write_json_atomic(
        out / "demo.json",
        json_safe(
            {
                "format": "hepaseg-demo/1",
                "demo_z_split": True,
                "warning": Z_SPLIT_WARNING,
                "table1": table1,
                "params": params,
                "ms_per_slice": ms_per_slice,
                "best_val_dice": best_val,
                "chosen_model": chosen,
                "volume_metrics": metrics,
                "lesions": lesions,
                "timings": timings,
                "commands": [{"step": s, "command": c} for s, c in commands],
                "paths": {k: str(v) for k, v in paths.items()},
            }
        ),
    )  # last: NaN sds (one slice) become null
    return result
