"""The ``hepaseg`` command line: typer + rich, thin wiring only.

Each command parses its options and calls one library function of the matching
stage package; user errors (:class:`hepaseg.errors.HepasegError`) become a
one-line ``error: ...`` on stderr and exit status 1 (143 after SIGTERM, 130 after Ctrl-C).
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from pathlib import Path  # noqa: F401
from typing import Annotated, Optional  # noqa: F401  (Optional: typer needs it on 3.11 for some types)

import typer
from rich.console import Console

from hepaseg import __version__
from hepaseg.errors import HepasegError, HepasegWarning, Terminated

app = typer.Typer(
    name="hepaseg",
    help="Liver-tumour segmentation in abdominal CT: MFCNet (Pang et al., PAKDD 2020) and nine baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _terminated(signum, frame) -> None:
    """SIGTERM handler while a command runs: unwind like an error, so temporary outputs are removed."""
    raise Terminated(
        f"{signal.Signals(signum).name}: stopped by a termination signal (SLURM, timeout, docker stop): expected "
        "the command to run to its end. Nothing half-written was left; rerun the command to finish",
        signum,
    )


def user_errors(fn):
    """Turn HepasegError (and OSError on a named path, and Ctrl-C) into one ``error:`` line and a non-zero exit.

    While the command runs, SIGTERM raises :class:`hepaseg.errors.Terminated` (exit 143), so every
    ``except``/``finally`` that removes a temporary output runs (``train`` handles it itself:
    it saves ``last.ckpt`` for ``--resume``).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", HepasegWarning)
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except HepasegError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]error:[/] interrupted (Ctrl-C): expected the command to run to its end. "
                              "Nothing half-written was left; rerun the command to finish", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            if not exc.filename:
                raise  # not about a path the user gave: a bug, keep the traceback
            err_console.print(f"[bold red]error:[/] {exc.filename}: {exc.strerror or type(exc).__name__}: expected a "
                              "readable input / writable output path. Check the path, its permissions and the free "
                              "disk space", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """HepasegWarning (an odd DICOM image left out, ...) as one ``warning: ...`` line on stderr."""
    if issubclass(category, HepasegWarning):
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


# --- DICOM options shared by the commands that read CT (prepare, predict, evaluate, explain, info) ---
SeriesOption = Annotated[
    Optional[str],
    typer.Option("--series", help="DICOM: series to use: SeriesInstanceUID, SeriesNumber or description text "
                                  "(default: the axial CT series with the most images)."),
]
SegOption = Annotated[
    Optional[list[Path]], typer.Option("--seg", help="DICOM-SEG file with the labels of a single DICOM case.")
]
SegLabelsOption = Annotated[
    Optional[str],
    typer.Option("--seg-labels", help='DICOM-SEG segment names per role, e.g. "liver=Liver;tumor=Mass,Lesion".'),
]


# --- Options shared by several commands: flag, type and help declared once (defaults stay per command) ---
def out_option(help: str) -> typer.models.OptionInfo:
    """``--out``/``-o``: every command's output folder or file; ``help`` says what it holds for that command."""
    return typer.Option("--out", "-o", help=help)


OverwriteOption = Annotated[
    bool, typer.Option(help="Replace hepaseg's own earlier output at --out (a folder it did not write is refused).")
]
ProgressOption = Annotated[bool, typer.Option(help="Show progress bars (on a terminal).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON to stdout, not tables.")]
WidthOption = Annotated[int, typer.Option("--width", help="Base width (channels of the first level) of the networks.")]
PreparedDataOption = Annotated[
    Path, typer.Option("--data", help="Prepared dataset directory (`hepaseg prepare` output).")
]
ModelOptionOption = Annotated[
    Optional[list[str]],
    typer.Option("--model-option", help="Architecture option KEY=VALUE (JSON value) of the trained (tumour) networks; "
                                        "repeatable."),
]
# Prediction (evaluate, predict, benchmark, crossval)
CheckpointsOption = Annotated[
    Optional[list[Path]], typer.Option("--checkpoint", help="Checkpoint from `hepaseg train`; repeat for an ensemble.")
]
CheckpointsFromOption = Annotated[
    Optional[Path],
    typer.Option(help="Ensemble list file (OUT/ensembles/<model>.json of compare or crossval): its checkpoints."),
]
BatchOption = Annotated[int, typer.Option(help="Slices per forward pass.")]
ThresholdOption = Annotated[float, typer.Option(help="Tumour probability threshold (tumour where sigmoid > it).")]
TtaOption = Annotated[bool, typer.Option("--tta", help="Average identity + horizontal + vertical flips.")]
# Protocols of many runs (compare, crossval), and their cluster steps
SeedsOption = Annotated[int, typer.Option(help="Seeds per model (and fold): 0..N-1.")]
MaxMinutesPerRunOption = Annotated[Optional[float], typer.Option(help="Wall-clock training budget of each run.")]
PlanOption = Annotated[
    bool,
    typer.Option("--plan", help="Cluster: write OUT/plan.json (the runs; crossval prepares the data first) and stop."),
]
RunIndexOption = Annotated[
    Optional[int], typer.Option(help="Cluster: run plan entry I only (default $SLURM_ARRAY_TASK_ID when set).")
]
WorkerOption = Annotated[
    bool, typer.Option("--worker", help="Cluster: run every plan entry no live worker holds, then stop.")
]
CollectOption = Annotated[
    bool,
    typer.Option("--collect", help="Cluster: tables (and compare's tests) from the finished runs; names the missing."),
]


def _dicom_options(series: str | None, seg: list[Path] | None, seg_labels: str | None):
    """The DicomOptions of --series/--seg/--seg-labels (validated), or None when none is given."""
    if series is None and not seg and seg_labels is None:
        return None
    from hepaseg.io import DicomOptions

    return DicomOptions(series=series, seg=tuple(seg or ()), seg_labels=seg_labels).check()


def _command_line(ctx: typer.Context) -> str:
    """The running command as a shell line, rebuilt from its parsed options (so it is exact
    whatever called it: a shell, ``python -m``, a test runner)."""
    import shlex

    parts = ["hepaseg", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or param.name == "version":
            continue
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif isinstance(value, bool):
            parts.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
        else:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                parts += [param.opts[0], str(item)]
    return shlex.join(parts)


def _print_trained_and_written(result) -> None:
    """The closing lines of `compare` and `crossval`: runs trained and files written."""
    console.print(
        f"trained {len(result.trained)} run(s) in {result.wall_seconds / 60:.1f} min; written to {result.out}:",
        highlight=False,
    )
    for key, path in result.paths.items():
        console.print(f"  {key:<8} {path}", highlight=False, soft_wrap=True)


def _postprocess(min_lesion_mm3: float, fill_holes: bool, min_liver_fraction: float):
    from hepaseg.inference.postprocess import PostProcess

    return PostProcess(min_lesion_mm3=min_lesion_mm3, fill_holes=fill_holes, min_liver_fraction=min_liver_fraction)


_MIN_LESION_HELP = "Post-processing: drop lesions smaller than this volume, mm^3 (default 0: off)."
_FILL_HOLES_HELP = "Post-processing: fill holes of the tumour mask slice by slice (default off)."
_LIVER_FRACTION_HELP = ("Post-processing: drop lesions with less than this share of voxels in the predicted liver "
                        "(0.5 = mostly outside; needs --liver-checkpoint; default 0: off).")


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"hepaseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """hepaseg: prepare CT, train and compare networks, predict tumour masks and lesion reports."""


# --- io / data commands (prepare, sample) ---------------------------------------------------
def _parse_floats(text: str | None, option: str, n: int) -> list[float] | None:
    """``"a,b,c"`` -> ``[a, b, c]`` (exactly ``n`` numbers) or a one-line HepasegError naming ``option``."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise HepasegError(f"{option}: expected {n} comma-separated numbers, got {text!r}.")
    return values


@app.command("prepare")
@user_errors
def prepare_command(
    sources: Annotated[
        list[Path], typer.Argument(help="CT files or folders: LiTS, MSD Task03, 3D-IRCADb, NIfTI, DICOM, MRC.")
    ],
    out: Annotated[Path, out_option("Output directory (new, empty or a previous output).")],
    window: Annotated[str, typer.Option(help="HU window LO,HI clipped and scaled to [0, 1].")] = "-200,250",
    size: Annotated[int, typer.Option(help="Slice size in pixels after resizing.")] = 224,
    slices: Annotated[
        Optional[str],
        typer.Option(help="Slices kept: tumor (paper) | liver | all (default: tumor; all with --target liver)."),
    ] = None,
    context_slices: Annotated[int, typer.Option(help="Neighbour slices each side stored as channels.")] = 0,
    split: Annotated[str, typer.Option(help="Patient-level TRAIN,VAL,TEST fractions.")] = "0.7,0.1,0.2",
    split_file: Annotated[
        Optional[Path],
        typer.Option(help='JSON with lists of case ids under "train", "val", "test" (overrides --split).'),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the patient shuffle.")] = 0,
    z_split: Annotated[
        Optional[str],
        typer.Option(help="DEMO ONLY, one volume: TRAIN,VAL,TEST fractions of contiguous z blocks (not by patient)."),
    ] = None,
    z_gap: Annotated[Optional[int], typer.Option(help="Unused slices between z blocks (default 2K+2).")] = None,
    target: Annotated[
        str, typer.Option(help="tumor (default) | liver: data for the liver stage of a cascade (mask = label > 0).")
    ] = "tumor",
    roi: Annotated[
        Optional[str], typer.Option(help="liver: crop each case to its labelled liver's box (cascade tumour stage).")
    ] = None,
    roi_margin: Annotated[float, typer.Option(help="Margin around the liver box with --roi liver, mm.")] = 10.0,
    val_fraction: Annotated[
        Optional[float],
        typer.Option(help="Validate on the last z-block (this share) of each TRAINING patient, as crossval; "
                          "needs --split VAL 0, e.g. --split 1,0,0."),
    ] = None,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    workers: Annotated[
        int, typer.Option(help="Processes preparing cases side by side (same output; one volume in memory each).")
    ] = 1,
    series: SeriesOption = None,
    seg: SegOption = None,
    seg_labels: SegLabelsOption = None,
) -> None:
    """Window, resize and select axial slices of CT volumes into a slice dataset with a patient-level split."""
    from hepaseg.data.prepare import prepare  # imports torch: keep `hepaseg --help` fast

    lo_hi = _parse_floats(window, "--window", 2)
    z = _parse_floats(z_split, "--z-split", 3)
    report: dict = {}
    prepare(
        sources,
        out,
        window=(lo_hi[0], lo_hi[1]),
        size=size,
        slices=slices,
        context_slices=context_slices,
        split=_parse_floats(split, "--split", 3),
        seed=seed,
        split_file=split_file,
        z_split=None if z is None else {"fractions": z, "gap": z_gap},
        target=target,
        roi=roi,
        roi_margin_mm=roi_margin,
        val_fraction=val_fraction,
        overwrite=overwrite,
        progress=progress,
        console=console,
        workers=workers,
        report=report,
        dicom=_dicom_options(series, seg, seg_labels),
    )  # prints the per-case table
    peaks = [mb for mb in report["peak_rss_mb"].values() if mb is not None]
    if workers > 1 and peaks:
        console.print(f"{workers} workers, {report['seconds']:.1f} s; peak memory per worker: "
                      + ", ".join(f"{mb:,.0f} MB" for mb in peaks))


@app.command("sample")
@user_errors
def sample_command(
    name: Annotated[str, typer.Argument(help="Sample to fetch: lits117 (LiTS case 117, 128^3 crop, MIT).")],
    dest: Annotated[Optional[Path], typer.Option(help="Output folder (default ./NAME).")] = None,
    from_dir: Annotated[
        Optional[Path], typer.Option(help="Offline copy holding img_117.mrc and lab_117.mrc (no download).")
    ] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="pip download cache (default ~/.cache/hepaseg).")] = None,
) -> None:
    """Fetch a small real CT case with labels (checksummed) and store it as NIfTI in the LiTS layout."""
    from rich.table import Table

    from hepaseg.data.sample import SAMPLES, fetch_lits117

    if name not in SAMPLES:
        raise HepasegError(f"sample name: expected one of {', '.join(SAMPLES)}, got {name!r}.")
    folder = fetch_lits117(dest if dest is not None else Path(name), from_dir=from_dir, cache_dir=cache_dir)
    table = Table(title=f"sample {name} -> {folder}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            table.add_row(f.name, f"{f.stat().st_size:,}")
    console.print(table)


@app.command("info")
@user_errors
def info_command(
    path: Annotated[Path, typer.Argument(help="A case or a folder of cases: DICOM study, LiTS, MSD, NIfTI, ...")],
    json_output: JsonOption = False,
    series: SeriesOption = None,
    seg: SegOption = None,
    seg_labels: SegLabelsOption = None,
) -> None:
    """Show what PATH holds: cases, DICOM series (which one is used and why), SEG objects, label counts."""
    import json

    from rich.table import Table

    from hepaseg.io.info import describe_path

    info = describe_path(path, dicom=_dicom_options(series, seg, seg_labels))
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    for case in info["cases"]:
        size = "" if case["shape"] is None else (
            f": {' x '.join(map(str, case['shape']))} voxels (z, y, x) at "
            f"{' x '.join(f'{v:g}' for v in case['spacing_mm'])} mm")
        console.print(f"[bold]{case['case_id'] or case['path']}[/] ({case['kind']}, {case['path']}){size}",
                      highlight=False, soft_wrap=True)
        dicom = case.get("dicom")
        if dicom:
            table = Table(title="series")
            for col in ("used", "#", "description", "mod.", "images", "step; pixel mm", "plane", "phase / time"):
                table.add_column(col, overflow="fold")
            for s in dicom["series"]:
                pixel = "x".join(f"{v:g}" for v in s["pixel_spacing_mm"]) if s["pixel_spacing_mm"] else "?"
                step = "-" if s["slice_step_mm"] is None else f"{s['slice_step_mm']:g}"
                kind = "localiser" if s["localizer"] else s["orientation"]
                when = " ".join(v for v in (s["phase"], s["contrast"] and f"contrast {s['contrast']}", s["time"]) if v)
                table.add_row("*" if s["used"] else "", "-" if s["number"] is None else str(s["number"]),
                              s["description"], s["modality"], str(s["images"]), f"{step}; {pixel}", kind,
                              when or "-")
            console.print(table)
            for s in dicom["series"]:  # on their own lines, never cut: a UID is what --series takes
                console.print(f"  #{'-' if s['number'] is None else s['number']} {s['uid']}", highlight=False,
                              soft_wrap=True)
            console.print(f"used: {dicom['chosen'] or 'none'}: {dicom['choice']}", highlight=False, soft_wrap=True)
            for seg_info in dicom["segs"]:
                segments = ", ".join(f"{x['number']} {x['label']!r}->{x['role'] or 'ignored'}"
                                     for x in seg_info["segments"])
                console.print(f"SEG {seg_info['file']} ({'used' if seg_info['used'] else 'not used'}): {segments}; "
                              f"references {', '.join(seg_info['references']) or 'nothing'}",
                              highlight=False, soft_wrap=True)
            if dicom["skipped"]:
                console.print("skipped: " + ", ".join(f"{n} {what}" for what, n in dicom["skipped"].items()),
                              highlight=False)
        if case["label_counts"] is not None:
            c = case["label_counts"]
            console.print(f"labels (voxels): background {c['background']:,}, liver {c['liver']:,}, "
                          f"tumour {c['tumor']:,}", highlight=False)
        elif case["error"] is None:
            console.print("labels: none", highlight=False)
        for w in case["warnings"]:
            console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
        if case["error"] is not None:
            console.print(f"[red]error:[/] {case['error']}", highlight=False, soft_wrap=True)


# [cli:data]


# --- models commands (models) ---------------------------------------------------------------
@app.command("models")
@user_errors
def models_command(
    json_output: JsonOption = False,
    width: WidthOption = 64,
) -> None:
    """List the registered networks with their trainable parameter counts."""
    import json

    from rich.table import Table

    from hepaseg.models.summary import model_summaries  # imports torch: keep `hepaseg --help` fast

    rows = model_summaries(width=width)
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"hepaseg networks (base_width={width}, 1 input channel, 1 class)")
    table.add_column("name", style="bold")
    table.add_column("params (M)", justify="right")
    table.add_column("params", justify="right")
    table.add_column("paper")
    table.add_column("defining module")
    for row in rows:
        params = row["params"]
        table.add_row(row["name"], f"{params / 1e6:.2f}", f"{params:,}", row["paper"], row["module"])
    console.print(table)


# [cli:models]


# --- training commands (train) --------------------------------------------------------------
def _families(values: list[str] | None) -> list[str]:
    """``--synthetic-family`` values (repeated and/or comma-separated; ``all``) as a list; default hypo."""
    from hepaseg.data.synthetic import FAMILIES

    names = [v.strip().lower() for value in values or ["hypo"] for v in value.split(",") if v.strip()]
    return list(FAMILIES) if "all" in names else names


@app.command("train")
@user_errors
def train_command(
    data: PreparedDataOption,
    model: Annotated[str, typer.Option("--model", help="Network name (see `hepaseg models`).")],
    out: Annotated[Path, out_option("Run directory: config.json, best/last.ckpt, logs/.")],
    width: WidthOption = 64,
    model_option: ModelOptionOption = None,
    loss: Annotated[str, typer.Option(help="dice_bce | focal | tversky | dice_topk.")] = "dice_bce",
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    schedule: Annotated[str, typer.Option(help="cosine | poly, per step after a linear warm-up.")] = "cosine",
    batch_size: Annotated[int, typer.Option(help="Slices per step and device.")] = 8,
    max_epochs: Annotated[int, typer.Option(help="Epochs to train (in total, when resuming).")] = 50,
    max_minutes: Annotated[
        Optional[float], typer.Option(help="Time budget; stops cleanly and saves last.ckpt.")
    ] = None,
    precision: Annotated[Optional[str], typer.Option(help="32 | 16-mixed | bf16-mixed (default: by hardware).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of everything (runs on CPU repeat exactly).")] = 0,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    augment: Annotated[str, typer.Option(help="Augmentation preset: basic | nnunet | none.")] = "basic",
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Same as --augment none.")] = False,
    no_aug: Annotated[
        Optional[list[str]],
        typer.Option("--no-aug", help="Leave out a family: spatial|noise|blur|intensity|lowres|gamma|mirror."),
    ] = None,
    synthetic_tumors: Annotated[
        float, typer.Option(help="Probability per slice of painting synthetic tumours (Hu et al. 2023).")
    ] = 0.0,
    synthetic_family: Annotated[
        Optional[list[str]],
        typer.Option("--synthetic-family", help="Synthetic lesion family, repeatable or comma-separated: "
                     "hypo|iso|hyper|rim|deposit|all (default hypo)."),
    ] = None,
    liver_enhancement: Annotated[
        float, typer.Option(help="Probability per slice of shifting the liver's HU by -60..+20 (phase).")
    ] = 0.0,
    crop: Annotated[Optional[int], typer.Option(help="Training crop size in pixels (default: whole slices).")] = None,
    tumor_crop_fraction: Annotated[
        float, typer.Option(help="Share of training crops centred on a tumour pixel (needs --crop).")
    ] = 0.0,
    early_stopping_patience: Annotated[
        Optional[int], typer.Option(help="Stop after this many epochs without a val_dice gain.")
    ] = None,
    channels_last: Annotated[
        Optional[bool], typer.Option(help="NHWC memory format (default: on for CPU bf16).")
    ] = None,
    compile_net: Annotated[
        bool, typer.Option("--compile", help="torch.compile the network (the first step pays the compilation).")
    ] = False,
    accelerator: Annotated[str, typer.Option(help="auto | cpu | gpu | mps.")] = "auto",
    devices: Annotated[str, typer.Option(help="Devices per node (a number or auto).")] = "auto",
    num_nodes: Annotated[int, typer.Option(help="Nodes (torchrun / SLURM).")] = 1,
    strategy: Annotated[str, typer.Option(help="auto | ddp | ddp_spawn | ...")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.ckpt.")] = False,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
) -> None:
    """Train a network on prepared slices; writes best.ckpt (by val_dice) and last.ckpt in OUT."""
    from hepaseg.training import TrainConfig, parse_key_values, train  # imports torch: keep --help fast

    result = train(
        TrainConfig(
            data=str(data),
            model=model,
            out=str(out),
            width=width,
            model_options=parse_key_values(model_option or []),
            loss=loss,
            lr=lr,
            weight_decay=weight_decay,
            schedule=schedule,
            batch_size=batch_size,
            max_epochs=max_epochs,
            max_minutes=max_minutes,
            precision=precision,
            seed=seed,
            num_workers=num_workers,
            augment=False if no_augment else augment,
            aug_off=list(no_aug or []),
            synthetic_tumors=synthetic_tumors,
            synthetic_families=_families(synthetic_family),
            liver_enhancement=liver_enhancement,
            crop=crop,
            tumor_crop_fraction=tumor_crop_fraction,
            early_stopping_patience=early_stopping_patience,
            channels_last=channels_last,
            compile=compile_net,
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            resume=resume,
            overwrite=overwrite,
            progress_bar=progress,
        )
    )
    _print_train_result(result, model, max_minutes)


def _print_train_result(result, model: str, max_minutes: float | None) -> None:
    """`train`: what the run did (val Dice, epochs, speed, checkpoints) and its warnings."""
    from rich.table import Table

    table = Table(title=f"train {model} -> {result.run_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    dice = "-" if result.best_val_dice is None else f"{result.best_val_dice:.4f}"
    per_epoch = "-" if result.seconds_per_epoch is None else f"{result.seconds_per_epoch:.1f}"
    for key, value in (
        ("best val_dice", dice),
        ("epochs", str(result.epochs)),
        ("steps", str(result.steps)),
        ("s / epoch", per_epoch),
        ("wall s", f"{result.wall_seconds:.1f}"),
        ("steps / s", "-" if result.steps_per_second is None else f"{result.steps_per_second:.2f}"),
        ("first step s", "-" if result.first_step_seconds is None else f"{result.first_step_seconds:.2f}"),
        ("median step s", "-" if result.median_step_seconds is None else f"{result.median_step_seconds:.2f}"),
        ("peak GPU GiB", "-" if (peak := result.peak_gpu_memory_bytes) is None else f"{peak / 2**30:.2f}"),
        ("best.ckpt", str(result.best_checkpoint or "-")),
        ("last.ckpt", str(result.last_checkpoint or "-")),
    ):
        table.add_row(key, value)
    if result.stopped_by_time:
        table.add_row("stopped", f"--max-minutes {max_minutes}")
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


# [cli:training]


# --- evaluation commands (evaluate, compare) ------------------------------------------------
@app.command("evaluate")
@user_errors
def evaluate_command(
    checkpoint: CheckpointsOption = None,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="Prepared dataset (same window/size/context as the checkpoint).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to score: test | val | train.")] = "test",
    json_output: JsonOption = False,
    out: Annotated[Optional[Path], out_option("Output folder (default CHECKPOINT_DIR/eval-SPLIT).")] = None,
    batch: BatchOption = 8,
    threshold: ThresholdOption = 0.5,
    volumes: Annotated[
        Optional[list[Path]],
        typer.Option("--volumes", help="Labelled CT case/folder for whole-volume metrics in mm (repeatable)."),
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda (default: CUDA when available).")] = None,
    liver_checkpoint: Annotated[
        Optional[list[Path]],
        typer.Option("--liver-checkpoint", help="Liver-stage checkpoint: --volumes runs the cascade, scores both "
                                                "(repeat for an ensemble)."),
    ] = None,
    checkpoints_from: CheckpointsFromOption = None,
    tta: TtaOption = False,
    min_lesion_mm3: Annotated[float, typer.Option(help=_MIN_LESION_HELP + " With --volumes.")] = 0.0,
    fill_holes: Annotated[bool, typer.Option("--fill-holes", help=_FILL_HOLES_HELP + " With --volumes.")] = False,
    min_liver_fraction: Annotated[float, typer.Option(help=_LIVER_FRACTION_HELP + " With --volumes.")] = 0.0,
    series: SeriesOption = None,
    seg: SegOption = None,
    seg_labels: SegLabelsOption = None,
) -> None:
    """Score a checkpoint on a prepared split (the paper's Table 1 metrics); --volumes adds 3D metrics in mm."""
    import json

    from hepaseg.evaluation import evaluate_checkpoint  # imports torch: keep `hepaseg --help` fast
    from hepaseg.evaluation.ensemble import resolve_members

    checkpoints, liver_checkpoints = resolve_members(checkpoint, checkpoints_from, liver_checkpoint)
    if not checkpoints:
        raise HepasegError("--checkpoint: missing: expected a checkpoint from `hepaseg train` (repeatable) or "
                           "--checkpoints-from FILE")
    if data is None and not volumes:
        raise HepasegError("--data: missing: expected a prepared dataset (--data DIR) and/or --volumes SOURCE")
    if liver_checkpoint and not volumes:
        raise HepasegError(
            "--liver-checkpoint: only used with --volumes (the cascade predicts whole cases): expected --volumes "
            "SOURCE, got none"
        )
    postprocess = _postprocess(min_lesion_mm3, fill_holes, min_liver_fraction)
    if not postprocess.is_off and not volumes:
        raise HepasegError("--min-lesion-mm3/--fill-holes/--min-liver-fraction: post-processing works on whole "
                           "volumes: expected --volumes SOURCE, got none")
    payload: dict = {}
    result = vol = None
    if data is not None:
        result = evaluate_checkpoint(
            checkpoints, data, split=split, batch=batch, threshold=threshold, out=out, device=device, tta=tta
        )
        payload = result.to_json()
    if volumes:
        from hepaseg.inference.evaluate_volumes import evaluate_volumes

        vol_out = out if out is not None else (result.out_dir if result is not None else None)
        vol = evaluate_volumes(
            checkpoints, volumes, batch=batch, threshold=threshold, device=device, out=vol_out,
            progress=not json_output, liver_checkpoint=liver_checkpoints or None, tta=tta, postprocess=postprocess,
            dicom=_dicom_options(series, seg, seg_labels),
        )
        payload["volumes"] = vol.to_json()
    if json_output:
        typer.echo(json.dumps(payload, indent=2))
        return
    if result is not None:
        _print_slice_evaluation(result)
    if vol is not None:
        _print_volume_evaluation(vol)


def _print_slice_evaluation(result) -> None:
    """`evaluate --data`: Table-1 metrics of the slices, notes and the files written."""
    from rich.table import Table

    s = result.summary
    table = Table(
        title=f"{result.model_name} on {result.split} ({s['n_slices']} slices, {len(result.per_case)} cases)"
    )
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("sd", justify="right")
    for key in ("dice", "jaccard", "precision", "recall", "specificity"):
        table.add_row(f"{key} (%)", f"{100 * s[key]:.2f}", f"{100 * s[key + '_sd']:.2f}")
    for key in ("hausdorff", "hd95"):
        table.add_row(f"{key} (px)", f"{s[key]:.2f}", f"{s[key + '_sd']:.2f}")
    table.add_row("f1 (%) = 2PR/(P+R) of means", f"{100 * s['f1']:.2f}", "")
    table.add_row("f1_mean_per_slice (%)", f"{100 * s['f1_mean_per_slice']:.2f}", "")
    table.add_row("ms / slice (forward)", f"{result.timings['ms_per_slice']:.2f}", "")
    console.print(table)
    if result.skipped_cases:
        console.print(f"skipped unlabelled cases: {', '.join(result.skipped_cases)}", highlight=False)
    if result.demo_z_split:
        console.print("[yellow]demo z-split:[/] contiguous z blocks of one patient; scores are optimistic.")
    if result.val_note is not None and result.split == "val":
        console.print(f"[yellow]note:[/] {result.val_note}", highlight=False, soft_wrap=True)
    for key, path in result.paths.items():
        console.print(f"  {key:<8} {path}", highlight=False, soft_wrap=True)


def _print_volume_evaluation(vol) -> None:
    """`evaluate --volumes`: per-case 3D metrics (mm), pooled Dice, liver stage and burden."""
    from rich.table import Table

    table = Table(title=f"{vol.model_name}: whole volumes (distances in mm)")
    for col in ("case", "dice", "jaccard", "rvd", "assd", "hd95", "hausdorff"):
        table.add_column(col, justify="right")
    for row in vol.rows:
        table.add_row(
            row["case"], *(f"{row[k]:.3f}" for k in ("dice", "jaccard", "rvd", "assd", "hd95", "hausdorff"))
        )
    console.print(table)
    v = vol.summary
    console.print(
        f"dice per case {v['dice_per_case']:.4f}, dice global {v['dice_global']:.4f} ({v['n_cases']} cases)",
        highlight=False,
    )
    if "liver" in v:
        lv = v["liver"]
        console.print(
            f"liver stage: dice per case {lv['dice_per_case']:.4f}, dice global {lv['dice_global']:.4f}, "
            f"assd {lv['assd']:.2f} mm",
            highlight=False,
        )
        b = v["burden"]
        console.print(
            f"mean liver volume {b['liver_volume_ml']:.1f} mL (reference {b['reference_liver_volume_ml']:.1f}), "
            f"tumour burden {b['tumor_burden_percent']:.2f} % (reference {b['reference_tumor_burden_percent']:.2f} "
            "%)",
            highlight=False,
        )
    for row in vol.rows:
        if row.get("warnings"):
            console.print(f"[yellow]warning:[/] {row['case']}: {row['warnings']}", highlight=False)
    for key, path in vol.paths.items():
        console.print(f"  {key:<8} {path}", highlight=False, soft_wrap=True)


def _cluster_step(plan: bool, run_index: int | None, worker: bool, collect: bool, out: Path, *, plan_fn,
                  run_fn) -> bool:
    """The --plan / --run-index / --worker part of compare and crossval; True when it handled the call."""
    chosen = [name for name, on in (("--plan", plan), ("--run-index", run_index is not None), ("--worker", worker),
                                    ("--collect", collect)) if on]
    if len(chosen) > 1:
        raise HepasegError(f"{' and '.join(chosen)}: expected at most one cluster step per call, got {len(chosen)}")
    if plan:
        runs = plan_fn()
        console.print(f"{out / 'plan.json'}: {len(runs)} runs, indices 0..{len(runs) - 1} "
                      f"(sbatch --array=0-{len(runs) - 1}); then --collect")
        return True
    if run_index is not None or worker:
        outcome = run_fn(run_index)
        console.print(f"ran {len(outcome['ran'])}, done before {len(outcome['done'])}, held by other workers "
                      f"{len(outcome['held'])}" + (f": {', '.join(outcome['held'])}" if outcome["held"] else ""))
        return True
    return False


@app.command("compare")
@user_errors
def compare_command(
    data: PreparedDataOption,
    out: Annotated[Path, out_option("Comparison folder (rerun the same command to resume).")],
    models: Annotated[str, typer.Option(help="all | comma-separated names (see `hepaseg models`).")] = "all",
    seeds: SeedsOption = 3,
    width: WidthOption = 64,
    max_minutes_per_run: MaxMinutesPerRunOption = None,
    max_epochs: Annotated[int, typer.Option(help="Epoch budget of each run.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Slices per step (every run).")] = 8,
    precision: Annotated[
        Optional[str], typer.Option(help="32 | 16-mixed | bf16-mixed (default: by hardware, same for all).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "test",
    model_option: ModelOptionOption = None,
    size_check: Annotated[
        bool,
        typer.Option("--size-check", help="Dry run: build, run and time each model at the data's size; no training."),
    ] = False,
    plan: PlanOption = False,
    run_index: RunIndexOption = None,
    worker: WorkerOption = False,
    collect: CollectOption = False,
) -> None:
    """Train and evaluate several networks under one protocol: Table 1, Wilcoxon tests, Dice box plot."""
    from rich.table import Table

    from hepaseg.experiments import (  # imports torch: keep `hepaseg --help` fast
        check_sizes,
        compare,
        compare_collect,
        compare_plan,
        compare_run,
        run_index_from_env,
    )
    from hepaseg.training import parse_key_values

    if size_check:
        rows = check_sizes(data, models=models, width=width, batch=batch_size)
        table = Table(title=f"size check: width {width}, {rows[0]['size']} px, {rows[0]['in_channels']} channel(s)")
        for col in ("model", "params (M)", "CPU ms/slice"):
            table.add_column(col, justify="right" if col != "model" else "left")
        for row in rows:
            table.add_row(row["model"], f"{row['params'] / 1e6:.3f}", f"{row['cpu_ms_per_slice']:.2f}")
        console.print(table)
        return
    common = dict(models=models, seeds=seeds, width=width, max_minutes_per_run=max_minutes_per_run,
                  max_epochs=max_epochs, train_overrides={"batch_size": batch_size, "precision": precision},
                  model_options=parse_key_values(model_option or [], option="--model-option"), split=split)
    say = lambda line: console.print(line, highlight=False)  # noqa: E731
    if _cluster_step(plan, run_index if plan or worker or collect else run_index_from_env(run_index), worker,
                     collect, out,
                     plan_fn=lambda: compare_plan(data, out, **common),
                     run_fn=lambda index: compare_run(data, out, run_index=index, log=say, **common)):
        return
    if collect:
        result = compare_collect(data, out, log=say, **common)
    else:
        result = compare(data, out, log=say, **common)
    table = Table(title=f"compare: {len(result.models)} models x {len(result.seeds)} seeds (means over seeds)")
    for col in ("model", "dice (%)", "f1 (%)", "hausdorff (px)", "params (M)", "CPU ms/slice", "p vs mfcnet"):
        table.add_column(col, justify="right" if col != "model" else "left")
    p_values = {t["baseline"]: t["p_value"] for t in result.wilcoxon}
    for name in result.models:
        rows = [r for r in result.runs if r["model"] == name]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("dice", "f1", "hausdorff")}
        p = p_values.get(name)
        table.add_row(
            name,
            f"{100 * mean['dice']:.2f}",
            f"{100 * mean['f1']:.2f}",
            f"{mean['hausdorff']:.2f}",
            f"{result.params[name] / 1e6:.3f}",
            f"{result.cpu_ms_per_slice[name]:.2f}",
            "-" if p is None else f"{p:.3g}",
        )
    console.print(table)
    _print_trained_and_written(result)
    if result.missing:
        console.print("missing (not finished, left out): " + ", ".join(f"{m}/seed{k}" for m, k in result.missing))


# [cli:evaluation]


# --- inference commands (predict, explain, export, benchmark) -------------------------------
@app.command("predict")
@user_errors
def predict_command(
    ctx: typer.Context,
    input_path: Annotated[
        Path,
        typer.Argument(help="CT case (NIfTI, LiTS, MSD, DICOM study, 3D-IRCADb, MRC) or a folder of cases (batch)."),
    ],
    out: Annotated[Path, out_option("Output folder (new or empty unless --overwrite).")],
    checkpoint: CheckpointsOption = None,
    checkpoints_from: CheckpointsFromOption = None,
    batch: BatchOption = 8,
    tta: TtaOption = False,
    threshold: ThresholdOption = 0.5,
    labels: Annotated[
        str, typer.Option(help="tumor: mask 0/1 | lits: 0/1/2 with the input's own liver label.")
    ] = "tumor",
    engine: Annotated[str, typer.Option(help="torch (with --checkpoint) | onnx (with --model).")] = "torch",
    liver_checkpoint: Annotated[
        Optional[list[Path]],
        typer.Option("--liver-checkpoint", help="Liver-stage checkpoint: liver first, then tumour inside it "
                                                "(repeat for an ensemble)."),
    ] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="ONNX file from `hepaseg export`.")] = None,
    save_probabilities: Annotated[
        bool, typer.Option("--save-probabilities", help="Also write probability and uncertainty NIfTIs.")
    ] = False,
    min_lesion_mm3: Annotated[float, typer.Option(help=_MIN_LESION_HELP)] = 0.0,
    fill_holes: Annotated[bool, typer.Option("--fill-holes", help=_FILL_HOLES_HELP)] = False,
    min_liver_fraction: Annotated[float, typer.Option(help=_LIVER_FRACTION_HELP)] = 0.0,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    output_format: Annotated[
        str, typer.Option("--format", help="nifti | dicom-seg | both (DICOM-SEG: DICOM inputs only).")
    ] = "nifti",
    series: SeriesOption = None,
    seg: SegOption = None,
    seg_labels: SegLabelsOption = None,
    report: Annotated[
        bool, typer.Option("--report", help="Also write OUT/report.html: montage, slice browser, lesions, metrics.")
    ] = False,
    compile_net: Annotated[
        bool, typer.Option("--compile", help="torch.compile the network first (the first batch pays for it).")
    ] = False,
) -> None:
    """Predict liver tumours in one CT case: mask NIfTI, lesion table, overlay PNG (+ metrics if labelled).

    A folder of many cases runs them all with the model loaded once: OUT/CASE_ID/... and OUT/summary.csv;
    rerunning the command resumes (finished cases are skipped unless --overwrite)."""
    from hepaseg.evaluation.ensemble import resolve_members
    from hepaseg.inference import predict_case  # imports torch: keep `hepaseg --help` fast

    checkpoints, liver_checkpoints = resolve_members(checkpoint, checkpoints_from, liver_checkpoint)
    if engine not in ("torch", "onnx"):
        raise HepasegError(f"--engine: expected torch or onnx, got {engine!r}")
    if engine == "onnx" and model is None:
        raise HepasegError("--model: --engine onnx needs the ONNX file from `hepaseg export`, got none")
    if engine == "torch" and not checkpoints:
        raise HepasegError("--checkpoint: --engine torch needs a checkpoint from `hepaseg train`, got none")
    dicom = _dicom_options(series, seg, seg_labels)
    postprocess = _postprocess(min_lesion_mm3, fill_holes, min_liver_fraction)
    onnx_model = model if engine == "onnx" else None
    from hepaseg.io import find_cases

    if len(find_cases([input_path])) > 1:
        if report:
            raise HepasegError(
                f"--report: writes the report of one case: expected a single case, got the folder {input_path} of "
                "several. Run predict on a case to get its report"
            )
        _predict_batch(input_path, out, checkpoint=checkpoints, onnx_model=onnx_model,
                       liver_checkpoint=liver_checkpoints or None, batch=batch, tta=tta, threshold=threshold,
                       labels=labels, output_format=output_format, dicom=dicom, overwrite=overwrite, progress=progress,
                       save_probabilities=save_probabilities, postprocess=postprocess, compile=compile_net)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HepasegWarning)  # they come back in result.warnings, printed below
        result = predict_case(
            input_path,
            out,
            checkpoint=checkpoints,
            onnx_model=onnx_model,
            liver_checkpoint=liver_checkpoints or None,
            batch=batch,
            tta=tta,
            threshold=threshold,
            labels=labels,
            overwrite=overwrite,
            progress=progress,
            save_probabilities=save_probabilities,
            postprocess=postprocess,
            output_format=output_format,
            dicom=dicom,
            compile=compile_net,
        )
    if result.settings.get("series"):
        s = result.settings["series"]
        console.print(f"series #{s.get('number') if s.get('number') is not None else '-'} "
                      f"{s.get('description') or 'no description'!r} ({s['uid']}): {s.get('choice')}",
                      highlight=False, soft_wrap=True)
    if report:
        from hepaseg.viz import predict_report

        result.paths["report"] = predict_report(
            result, Path(out) / "report.html", command=_command_line(ctx),
            checkpoints=[onnx_model] if onnx_model is not None else checkpoints,
            liver_checkpoint=liver_checkpoints or None, uncertainty_label="sd over members and flips")
    _print_prediction(result)

def _print_prediction(result) -> None:
    """`predict` of one case: the lesion table, summary, metrics against a label, warnings, files, timings."""
    from rich.table import Table

    members = result.settings.get("n_members", 1)
    table = Table(title=f"{result.case_id}: {len(result.lesions)} lesion(s) ({result.model_name}, {result.engine}"
                        f"{f', {members} members' if members > 1 else ''})")
    for col in ("id", "volume (mL)", "max axial diameter (mm)", "centroid z,y,x (mm)", "slices", "p mean / max",
                "agreement", "to liver surface (mm)"):
        table.add_column(col, justify="right")
    for row in result.lesions:
        z, y, x = row["centroid_mm"]
        distance = row.get("liver_surface_distance_mm", float("nan"))
        table.add_row(
            str(row["id"]),
            f"{row['volume_ml']:.2f}",
            f"{row['max_axial_diameter_mm']:.1f}",
            f"{z:.1f}, {y:.1f}, {x:.1f}",
            f"{row['first_slice']}-{row['last_slice']}",
            f"{row['mean_probability']:.2f} / {row['max_probability']:.2f}",
            f"{row['member_agreement']:.2f}",
            "-" if distance != distance else f"{distance:.1f}",
        )
    console.print(table)
    summary = result.summary
    if "liver_volume_ml" in summary:
        console.print(f"liver {summary['liver_volume_ml']:.1f} mL, tumour {summary['tumor_volume_ml']:.2f} mL, "
                      f"tumour burden {summary['tumor_burden_percent']:.2f} % of the liver", highlight=False)
    if result.metrics is not None:
        m = result.metrics
        console.print(
            f"vs label: dice {m['dice']:.3f}  jaccard {m['jaccard']:.3f}  assd {m['assd']:.2f} mm  "
            f"hd95 {m['hd95']:.2f} mm"
        )
        if "liver" in m:
            lv = m["liver"]
            console.print(f"liver vs label: dice {lv['dice']:.3f}  assd {lv['assd']:.2f} mm", highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if result.settings.get("label_note"):
        console.print(f"[yellow]note:[/] {result.settings['label_note']}", highlight=False)
    console.print(f"written to {result.out_dir}:")
    for key, path in result.paths.items():
        # One path per line, never wrapped, so it can be copied.
        console.print(f"  {key:<12} {path}", highlight=False, soft_wrap=True)
    t = result.timings
    first = f" (first batch {t['first_batch']:.1f} s)" if "first_batch" in t else ""
    console.print(f"read {t['read']:.1f} s, inference {t['inference']:.1f} s{first}, write {t['write']:.1f} s")


def _predict_batch(input_path: Path, out: Path, **kwargs) -> None:
    """`hepaseg predict FOLDER`: every case, the model loaded once; a table of the summary."""
    from rich.table import Table

    from hepaseg.inference import predict_batch

    result = predict_batch(input_path, out, console=err_console, **kwargs)
    table = Table(title=f"{len(result.rows)} case(s): {len(result.predicted)} predicted, {len(result.skipped)} done "
                        f"earlier, {len(result.failed)} failed")
    for col in ("case", "status", "tumour mL", "lesions", "largest mm", "dice", "s"):
        table.add_column(col, justify="left" if col in ("case", "status") else "right")
    for row in result.rows:
        dice = row["dice"]
        table.add_row(row["case"], row["status"], str(row["tumor_volume_ml"]), str(row["lesion_count"]),
                      str(row["largest_diameter_mm"]), "" if dice == "" else f"{float(dice):.3f}", str(row["seconds"]))
    console.print(table)
    for row in result.rows:
        if row["status"] == "error":
            console.print(f"[red]failed:[/] {row['case']}: {row['error']}", highlight=False, soft_wrap=True)
    rate = "-" if result.cases_per_minute is None else f"{result.cases_per_minute:.1f}"
    console.print(f"model loaded once in {result.load_seconds:.1f} s; {rate} cases/min; summary: {result.summary_csv}",
                  highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)


@app.command("export")
@user_errors
def export_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint from `hepaseg train`.")],
    onnx: Annotated[Path, typer.Option("--onnx", help="ONNX file to write (dynamic batch axis).")],
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
) -> None:
    """Export a checkpoint to ONNX (verified with onnx.checker and onnxruntime), with its preprocessing."""
    from hepaseg.inference import export_checkpoint, read_onnx_metadata

    path = export_checkpoint(checkpoint, onnx, opset=opset)
    meta = read_onnx_metadata(path)
    console.print(
        f"wrote {path} (model {meta.get('model_name')}, {meta.get('in_channels')} x {meta.get('size')} x "
        f"{meta.get('size')} input, opset {opset}); predict with "
        f"`hepaseg predict CT --engine onnx --model {path} --out OUT`",
        highlight=False,
    )


def _parse_query(text: str) -> tuple[int, int]:
    """``"Y,X"`` -> ``(Y, X)`` non-negative integers, or a one-line HepasegError naming --query."""
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise HepasegError(f"--query: expected Y,X (row, column in original slice pixels), got {text!r}")
    return int(parts[0]), int(parts[1])


@app.command("explain")
@user_errors
def explain_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint from `hepaseg train`.")],
    input_path: Annotated[Path, typer.Option("--input", help="CT case (any format `hepaseg predict` reads).")],
    slice_index: Annotated[int, typer.Option("--slice", help="Axial slice index z (0-based).")],
    out: Annotated[Path, out_option("PNG to write.")],
    query: Annotated[
        Optional[list[str]],
        typer.Option(
            "--query",
            help="Query pixel Y,X in original slice pixels (repeatable); default: one tumour and one background pixel.",
        ),
    ] = None,
    series: SeriesOption = None,
    seg: SegOption = None,
    seg_labels: SegLabelsOption = None,
) -> None:
    """Draw the paper's Fig. 1 for one slice: input, truth, prediction, context features and attention."""
    from rich.table import Table

    from hepaseg.viz import explain_slice  # imports torch + matplotlib: keep `hepaseg --help` fast

    queries = None if not query else [_parse_query(q) for q in query]
    result = explain_slice(checkpoint, input_path, slice_index, out, queries=queries,
                           dicom=_dicom_options(series, seg, seg_labels))
    table = Table(title=f"{result.model_name}: {result.case_id}, slice {result.slice_index}")
    for col in ("query", "original y,x", "input y,x", "chosen by"):
        table.add_column(col)
    for name, (y, x), (iy, ix), rule in zip(
        result.query_names, result.queries, result.input_queries, result.query_rules
    ):
        table.add_row(name, f"{y}, {x}", f"{iy}, {ix}", rule)
    console.print(table)
    if result.blocks:
        blocks = Table(title="context aggregation blocks")
        for col in ("stage", "h x w x C", "alpha", "beta", "attention sums"):
            blocks.add_column(col, justify="right")
        for block in result.blocks:
            sums = result.arrays[f"stage{block['stage']}_attention"].sum(axis=(1, 2))
            blocks.add_row(
                str(block["stage"]),
                " x ".join(map(str, block["shape"])),
                f"{block['alpha']:.4g}",
                f"{block['beta']:.4g}",
                ", ".join(f"{s:.4f}" for s in sums),
            )
        console.print(blocks)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {result.path}", highlight=False, soft_wrap=True)


@app.command("benchmark")
@user_errors
def benchmark_command(
    json_output: JsonOption = False,
    models: Annotated[str, typer.Option("--models", help="Comma-separated model names, or all.")] = "all",
    width: WidthOption = 64,
    size: Annotated[int, typer.Option(help="Slice size in pixels.")] = 224,
    batch: BatchOption = 8,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (median reported).")] = 5,
    quick: Annotated[
        bool, typer.Option("--quick", help="At most 2 repeats and a 16 x 512 x 512 phantom for prepare/predict.")
    ] = False,
    ratio_widths: Annotated[
        Optional[str], typer.Option(help="Also time mfcnet and unet at these widths (e.g. 32,64) for their ratios.")
    ] = None,
    clock: Annotated[str, typer.Option(help="wall | cpu (this process's CPU time; steady with --threads 1).")] = "wall",
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (default: torch's choice).")] = None,
    out: Annotated[Optional[Path], out_option("Also write the JSON result here.")] = None,
) -> None:
    """Measure parameters, FLOPs, speed and memory of the networks, attention, prepare and predict here."""
    import json

    from hepaseg.experiments.benchmark import benchmark_tables, run_benchmark
    from hepaseg.io.atomic import write_json_atomic
    from hepaseg.io.outputs import check_output_file

    if out is not None:  # before the (minutes of) measuring
        check_output_file(out, option="--out")
    names = None if models.strip().lower() == "all" else [m for m in models.replace(" ", "").split(",") if m]
    widths = [w for w in (ratio_widths or "").replace(" ", "").split(",") if w]
    if not all(w.isdigit() for w in widths):
        raise HepasegError(f"--ratio-widths: expected comma-separated positive integers, got {ratio_widths!r}")
    result = run_benchmark(
        names,
        width=width,
        size=size,
        batch=batch,
        repeats=repeats,
        quick=quick,
        ratio_widths=[int(w) for w in widths],
        clock=clock,
        threads=threads,
        log=lambda line: err_console.print(f"[dim]benchmark:[/] {line}", highlight=False),
    )
    if out is not None:
        write_json_atomic(out, result)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        for table in benchmark_tables(result):
            console.print(table)
    if out is not None:
        err_console.print(f"wrote {out}", highlight=False, soft_wrap=True)


@app.command("crossval")
@user_errors
def crossval_command(
    sources: Annotated[list[Path], typer.Argument(help="CT files or folders: every case is one patient and fold.")],
    out: Annotated[Path, out_option("Crossval folder (rerun the same command to resume).")],
    models: Annotated[str, typer.Option(help="Comma-separated tumour networks (see `hepaseg models`).")] = "unet",
    seeds: SeedsOption = 2,
    cascade: Annotated[
        bool, typer.Option("--cascade", help="Liver-first cascade: liver stage, then tumour on liver crops.")
    ] = False,
    liver_model: Annotated[str, typer.Option(help="Liver-stage network (with --cascade).")] = "unet",
    liver_size: Annotated[int, typer.Option(help="Liver-stage slice size in pixels (with --cascade).")] = 128,
    size: Annotated[int, typer.Option(help="Tumour-stage slice size in pixels.")] = 224,
    width: WidthOption = 16,
    max_minutes_per_run: MaxMinutesPerRunOption = None,
    max_epochs: Annotated[int, typer.Option(help="Epoch budget of each run.")] = 50,
    synthetic_tumors: Annotated[
        Optional[float], typer.Option(help="Train option synthetic_tumors: probability of a synthetic tumour.")
    ] = None,
    augment: Annotated[Optional[str], typer.Option(help="Train option augment (e.g. basic, nnunet, none).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Slices per step (every run).")] = None,
    threshold: ThresholdOption = 0.5,
    val_fraction: Annotated[
        float, typer.Option(help="Share of each training patient's slices (last z block) monitored as val.")
    ] = 0.15,
    model_option: ModelOptionOption = None,
    train_option: Annotated[
        Optional[list[str]], typer.Option("--train-option", help="Further TrainConfig field KEY=VALUE (JSON value).")
    ] = None,
    prepare_option: Annotated[
        Optional[list[str]],
        typer.Option("--prepare-option", help="Further prepare argument KEY=VALUE, e.g. slices=\"liver\"."),
    ] = None,
    postprocess: Annotated[
        Optional[list[str]],
        typer.Option("--postprocess", help="Also score this post-processing setting (repeatable), e.g. "
                                           "'fill_holes,min_lesion_mm3=50,min_liver_fraction=0.5'; writes "
                                           "OUT/postprocess.md beside 'none'. No retraining."),
    ] = None,
    ensemble_seeds: Annotated[
        bool, typer.Option("--ensemble-seeds", help="Also score each fold's seeds as one ensemble (postprocess.md).")
    ] = False,
    score_tta: Annotated[
        bool, typer.Option("--score-tta", help="Predict the postprocess.md variants with flip TTA.")
    ] = False,
    plan: PlanOption = False,
    run_index: RunIndexOption = None,
    worker: WorkerOption = False,
    collect: CollectOption = False,
    series: SeriesOption = None,
    seg_labels: SegLabelsOption = None,
) -> None:
    """Leave-one-patient-out training and whole-volume scoring: Dice, lesion detection by size, FP rates."""
    from hepaseg.experiments.compare import run_index_from_env
    from hepaseg.experiments.crossval import (  # imports torch: keep `hepaseg --help` fast
        crossval,
        crossval_collect,
        crossval_plan,
        crossval_run,
    )
    from hepaseg.experiments.crossval_scoring import parse_settings, score_crossval
    from hepaseg.training import parse_key_values

    settings = parse_settings(postprocess or [], cascade=cascade)  # bad settings fail before any training
    train_options = parse_key_values(train_option or [], option="--train-option")
    for key, value in (("synthetic_tumors", synthetic_tumors), ("augment", augment), ("batch_size", batch_size)):
        if value is not None:
            train_options[key] = value
    if model_option:  # the same TrainConfig field as --train-option model_options={...}, key by key
        train_options["model_options"] = {**train_options.get("model_options", {}),
                                          **parse_key_values(model_option)}
    options = dict(
        models=models,
        seeds=seeds,
        cascade=cascade,
        liver_model=liver_model,
        liver_size=liver_size,
        size=size,
        width=width,
        max_minutes_per_run=max_minutes_per_run,
        max_epochs=max_epochs,
        train_options=train_options,
        prepare_options=parse_key_values(prepare_option or [], option="--prepare-option"),
        threshold=threshold,
        val_fraction=val_fraction,
        log=lambda line: console.print(line, highlight=False),
        dicom=_dicom_options(series, None, seg_labels),
    )
    if _cluster_step(plan, run_index if plan or worker or collect else run_index_from_env(run_index), worker,
                     collect, out,
                     plan_fn=lambda: crossval_plan(sources, out, **options),
                     run_fn=lambda index: crossval_run(sources, out, run_index=index, **options)):
        return
    result = (crossval_collect if collect else crossval)(sources, out, **options)
    _print_crossval_table(result)
    _print_trained_and_written(result)
    if result.missing:
        console.print(f"missing (not finished, left out): {', '.join(result.missing)}")
    if (postprocess or ensemble_seeds or score_tta) and result.missing:
        console.print("post-processing scoring skipped: it needs every run finished", highlight=False)
    elif postprocess or ensemble_seeds or score_tta:
        scored = score_crossval(out, settings, models=result.models, seeds=len(result.seeds),
                                ensemble=ensemble_seeds, tta=score_tta,
                                log=lambda line: console.print(line, highlight=False))
        console.print(f"scored {len(scored.settings)} post-processing setting(s); written to {out}:", highlight=False)
        for key, path in scored.paths.items():
            console.print(f"  {key:<8} {path}", highlight=False, soft_wrap=True)


def _print_crossval_table(result) -> None:
    """`crossval`: per model, the means over folds and seeds (Dice, pooled Dice, lesion recall, false positives)."""
    from rich.table import Table

    table = Table(title=f"crossval: {len(result.folds)} folds x {len(result.seeds)} seeds (means)")
    for col in ("model", "dice (%)", "dice global (%)", "recall IoU>0.5 (%)", "recall any (%)", "FP lesions",
                "FP slice rate (%)"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name in result.models:
        rows = [r for r in result.rows if r["model"] == name]

        def mean(key: str, scale: float = 100.0, rows=rows) -> str:
            values = [r[key] for r in rows if r[key] == r[key]]  # NaN != NaN: skip undefined recalls
            return f"{scale * sum(values) / len(values):.2f}" if values else "-"

        pooled = result.dice_global[name]
        table.add_row(name, mean("dice"), f"{100 * sum(pooled) / len(pooled):.2f}", mean("recall_iou"),
                      mean("recall_any"), mean("fp_lesions", 1.0), mean("fp_slice_rate"))
    console.print(table)


# [cli:inference]


# --- demo -----------------------------------------------------------------------------------
@app.command("demo")
@user_errors
def demo_command(
    out: Annotated[
        Path, out_option("Demo folder (new, empty, or an earlier demo's, which is replaced).")
    ] = Path("demo_out"),
    minutes: Annotated[float, typer.Option(help="Time budget: 40 % for each network's training.")] = 5.0,
    sample_dir: Annotated[
        Optional[Path], typer.Option(help="Existing copy of img_117.mrc + lab_117.mrc (skips the download).")
    ] = None,
    size: Annotated[int, typer.Option(help="Slice size in pixels.")] = 128,
    width: WidthOption = 8,
    progress: ProgressOption = True,
) -> None:
    """The whole product on LiTS-117: prepare (DEMO z-split), train MFCNet and U-Net, evaluate, predict,
    explain, and write a self-contained OUT/report.html."""
    from rich.table import Table

    from hepaseg.evaluation import TABLE1_COLUMNS
    from hepaseg.experiments.demo import run_demo  # imports torch: keep `hepaseg --help` fast

    result = run_demo(
        out, minutes=minutes, sample_dir=sample_dir, size=size, width=width, progress=progress, console=console
    )
    from rich import box

    table = Table(title="Table 1, test z-block (DEMO single-patient split)", box=box.SIMPLE_HEAD)
    table.add_column("Method", style="bold", no_wrap=True)
    short = {
        "dice": "Dice %",
        "hausdorff": "HD px",
        "jaccard": "Jacc %",
        "precision": "Prec %",
        "recall": "Rec %",
        "specificity": "Spec %",
        "f1": "F1 %",
    }  # so the table fits 80 columns
    for _, key, _ in TABLE1_COLUMNS:
        table.add_column(short.get(key, key), justify="right", no_wrap=True)
    table.add_column("ms/sl", justify="right", no_wrap=True)
    for model, summary in result.table1.items():
        table.add_row(
            model,
            *(f"{float(summary[key]) * scale:.1f}" for _, key, scale in TABLE1_COLUMNS),
            f"{result.ms_per_slice[model]:.0f}",
        )
    console.print(table)
    if result.volume_metrics is not None:
        m = result.volume_metrics
        console.print(
            f"held-out block predicted by {result.chosen_model}: dice {m['dice']:.3f}, "
            f"hd95 {m['hd95']:.1f} mm, {len(result.lesions)} lesion(s)",
            highlight=False,
        )
    console.print("Params, 2-decimal values, figures and the commands of each step are in the report.")
    console.print(f"demo took {result.timings['total']:.0f} s; report: [bold]{result.report}[/]", soft_wrap=True)


# [cli:demo]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
