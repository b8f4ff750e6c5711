"""``train(config) -> TrainResult``: the one function ``hepaseg train`` calls.

It owns the run directory (refuse / overwrite / resume), resolves hardware
defaults (precision, memory format), wires the network, loss, DataModule,
callbacks and loggers into a Lightning ``Trainer``, and reports what happened.

Run directory layout::

    RUN/.hepaseg-output.json     marker: a hepaseg run folder (only such a folder is replaced by --overwrite)
    RUN/config.json              resolved TrainConfig (written atomically at start)
    RUN/best.ckpt, RUN/last.ckpt best val_dice / latest epoch (atomic writes); last.ckpt only when
                                 the data has no validation slices (`prepare --split 1,0,0`)
    RUN/result.json              TrainResult of the last invocation
    RUN/logs/csv/version_N/metrics.csv, RUN/logs/tensorboard/version_N/  one version per invocation

The same call runs single-process or as one rank of DDP (torchrun, SLURM
``srun``, or Lightning's own launcher, which re-executes the command line
per device): only global rank 0 touches the run directory.

Nothing is lost and nothing half-made is left:

* ``--overwrite`` replaces only a folder with hepaseg's run marker; the earlier run is set
  aside, and put back if the new run fails before its first checkpoint.
* A run that fails before its first checkpoint (a NaN loss at step 0, a bad option found
  late, SIGTERM during set-up) removes what it wrote, so the same command can simply be rerun.
* SIGTERM during training (SLURM preemption, ``timeout``, ``docker stop``) finishes the
  current step, saves ``RUN/last.ckpt`` and raises :class:`hepaseg.errors.Terminated`;
  the same command with ``--resume`` continues from there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    Timer,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hepaseg.data.prepare import read_manifest
from hepaseg.errors import HepasegError, Terminated
from hepaseg.io.atomic import write_json_atomic
from hepaseg.io.outputs import check_apart_from_inputs, check_output_dir, read_output_marker, write_output_marker
from hepaseg.training.checkpoint import AtomicCheckpointIO, checkpoint_model_options, read_checkpoint
from hepaseg.training.config import TrainConfig
from hepaseg.training.datamodule import DatasetEpoch, SliceDataModule
from hepaseg.training.losses import build_loss
from hepaseg.training.module import SegmentationModule

__all__ = ["TrainResult", "resolve_config", "train"]

CONFIG_FORMAT = "hepaseg-train/1"


class _QuietLightning(logging.Filter):
    """Drop Lightning's console lines that tell a hepaseg user nothing; keep the rest.

    Dropped: the "Tip: ... install litlogger" advertisement; "GPU available: False" / "TPU available: False"
    (no accelerator on this machine: nothing to act on -- the lines stay when one exists); "Loading
    `train_dataloader` to estimate number of stepping batches" (an internal step); "`Trainer.fit` stopped:
    `max_epochs=N` reached" (the summary table already gives the epochs). hepaseg's own ``rank_zero_info``
    lines ("hepaseg: ...") go through the same logger and are kept.
    """

    _DROP = re.compile(
        r"litlogger|^(GPU|TPU) available: False\b|^Loading `train_dataloader` to estimate number of stepping batches"
        r"|^`Trainer\.fit` stopped: `max_epochs=\d+` reached"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return self._DROP.search(record.getMessage()) is None


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_QuietLightning())
_RUN_FILES = ("config.json", "last.ckpt", "best.ckpt")
_CHECKPOINTS = ("last.ckpt", "best.ckpt")


@dataclass
class TrainResult:
    """What one :func:`train` call did (times are this invocation's, not the whole run's)."""

    run_dir: Path
    best_checkpoint: Path | None  # RUN/best.ckpt (None if no validation finished)
    last_checkpoint: Path | None  # RUN/last.ckpt
    best_val_dice: float | None
    epochs: int  # epochs completed in the run so far (resumed ones included)
    steps: int  # optimizer steps so far (global_step)
    wall_seconds: float  # this invocation, set-up included
    seconds_per_epoch: float | None  # mean over the epochs completed in this invocation
    stopped_by_time: bool = False  # --max-minutes ran out
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch of this invocation (train + val)
    steps_per_second: float | None = None  # optimizer steps of this invocation / its epoch seconds (val included)
    peak_gpu_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated of this process (rank 0 on DDP)
    warnings: list[str] = field(default_factory=list)  # e.g. trained without validation
    first_step_seconds: float | None = None  # the first training step of this invocation (with --compile: the
    # compilation of forward and backward, the first-call cost, is in it)
    median_step_seconds: float | None = None  # median of the other training steps (data loading excluded)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _is_global_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (before DDP is set up).

    torchrun sets RANK; Lightning's launcher sets LOCAL_RANK/NODE_RANK in the
    processes it starts; srun sets SLURM_PROCID (checked after LOCAL_RANK because
    it is inherited by processes Lightning starts inside a one-task job).
    """
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("LOCAL_RANK", 0)) != 0 or int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))) != 0:
        return False
    return int(env.get("SLURM_PROCID", 0)) == 0


def _cpu_has_native_bf16() -> bool:
    # AVX512-BF16 or AMX: without them bf16 autocast is emulated and slower than fp32.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the hardware-dependent ``None`` defaults (precision, channels_last) of ``config``."""
    accelerator = config.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    precision = config.precision
    if precision is None:
        precision = "16-mixed" if on_gpu else ("bf16-mixed" if on_cpu and _cpu_has_native_bf16() else "32-true")
    channels_last = config.channels_last
    if channels_last is None:
        channels_last = on_cpu and precision == "bf16-mixed"
    target = config.target
    if target is None and (Path(config.data) / "manifest.json").is_file():
        # The prepared target: a `prepare --target liver` dataset trains a liver stage. (Without a
        # manifest the data module raises the clear error; callers probing precision get None.)
        target = read_manifest(config.data).get("options", {}).get("target") or "tumor"
    return TrainConfig.from_dict(
        {**config.to_dict(), "precision": precision, "channels_last": channels_last, "target": target}
    )


@dataclass
class _RunDir:
    """What :func:`_prepare_run_dir` did, so that a failed start can be undone."""

    resume_from: Path | None = None  # RUN/last.ckpt with --resume
    fresh: bool = False  # a new run was started in the folder (not a resume)
    created: bool = False  # the folder did not exist before (else it was empty, or an overwritten run)
    aside: Path | None = None  # --overwrite: the earlier run, kept until the new one has a checkpoint


def _prepare_run_dir(config: TrainConfig) -> _RunDir:
    """Check (and on rank 0 create, or set aside for --overwrite) the run directory."""
    run = Path(config.out)
    last = run / "last.ckpt"
    if not _is_global_zero():
        # Other ranks start once rank 0 has checked (and written config.json): they would see a run.
        return _RunDir(resume_from=last if config.resume else None)
    if config.resume:
        if not last.is_file():
            raise HepasegError(
                f"{last}: not found: --resume needs the last.ckpt of an earlier run in --out. "
                "Drop --resume to start a new run"
            )
        if read_output_marker(run) is None:  # a run from before the marker: continued in place, then marked
            check_apart_from_inputs(run, "--out", [config.data])
            write_output_marker(run, "train")
        else:
            check_output_dir(run, command="train", inputs=[config.data], reuse=True)
        return _RunDir(resume_from=last)
    marker = read_output_marker(run) if run.is_dir() else None
    if marker is not None and marker["command"] == "train" and not config.overwrite:
        present = [name for name in _RUN_FILES if (run / name).exists()]
        raise HepasegError(
            f"{run}: already holds a run ({', '.join(present) or 'started, no checkpoint'}): expected a new or "
            "empty directory. Pass --resume to continue it or --overwrite to replace it"
        )
    # Only hepaseg's own run folder is replaced (--overwrite); never one holding or inside --data.
    state = check_output_dir(run, command="train", inputs=[config.data], overwrite=config.overwrite)
    created = not run.exists()
    aside = None
    if state == "own":
        aside = Path(tempfile.mkdtemp(prefix=f".{run.name}.", suffix=".old", dir=run.parent))
        aside.rmdir()
        os.replace(run, aside)
        created = True
    run.mkdir(parents=True, exist_ok=True)
    write_output_marker(run, "train")
    return _RunDir(fresh=True, created=created, aside=aside)


def _settle_run_dir(run_dir: _RunDir, run: Path, failed: bool) -> None:
    """After train: a failed fresh start without any checkpoint is removed (an overwritten run put
    back), so the same command can be rerun; otherwise an overwritten run is deleted now."""
    if failed and run_dir.fresh and not any((run / name).is_file() for name in _CHECKPOINTS):
        if run_dir.created:
            shutil.rmtree(run, ignore_errors=True)
        else:  # the user's empty folder: empty it again
            for child in run.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        if run_dir.aside is not None:
            os.replace(run_dir.aside, run)
        return
    if run_dir.aside is not None:
        shutil.rmtree(run_dir.aside, ignore_errors=True)


class _StopOnSigterm(Callback):
    """SIGTERM: stop after the current step and save ``RUN/last.ckpt`` so that ``--resume`` continues.

    Lightning's own SIGTERM handler raises ``SIGTERMException`` at the next step boundary; this
    callback saves the checkpoint then (``on_exception``). A SIGTERM that arrives before Lightning
    installs its handler sets :attr:`event` (see :func:`_sigterm_sets`), and the next step
    boundary stops the fit instead (``should_stop``); :func:`train` saves after it.
    """

    def __init__(self, last: Path) -> None:
        self.event = threading.Event()
        self.last = last
        self.saved = False

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.event.is_set():
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.event.set()
            trainer.save_checkpoint(self.last, weights_only=False)  # full state: --resume needs it
            self.saved = True


@contextlib.contextmanager
def _sigterm_sets(event: threading.Event) -> Iterator[None]:
    """While training, SIGTERM only sets ``event`` (Lightning adds its own handler on top, and runs
    this one too): stopping then happens at a step boundary, never inside an optimizer step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _resolved_model_options(net: Any, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with every architecture default of ``net`` filled in (what checkpoints record)."""
    defaults = net.architecture_options() if hasattr(net, "architecture_options") else {}
    return {**defaults, **given}


def _check_resume_matches(path: Path, config: TrainConfig, net: Any) -> dict[str, Any]:
    meta = read_checkpoint(path)["hepaseg"]
    options = _resolved_model_options(net, config.model_options)
    then_options = meta.get("model_options")
    if set(then_options or {}) != set(options):
        # A checkpoint from before options were recorded resolved: compare what it names, plus the
        # defaults of its time where today's differ (legacy_options), with what this run builds.
        then_options = checkpoint_model_options(meta)
        options = {k: options.get(k) for k in then_options}
    for key, then, now in (("model", meta.get("model"), config.model),
                           ("base_width", meta.get("base_width"), config.width),
                           ("model_options", then_options, options)):
        if then != now:
            raise HepasegError(
                f"{path}: --resume with a different {key}: expected {then!r} "
                f"(the checkpoint's), got {now!r}. Resume with the same model options"
            )
    return meta


def _calibrate_synthetic(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Fill ``synthetic_contrast_hu`` from the train split when synthetic tumours are on and it is unset.

    The tumour-to-liver contrast of the train cases sets the darkening range
    (:func:`hepaseg.data.synthetic.synthetic_calibration`); without tumour labels (label-free
    training on cases prepared with ``--slices liver``) it is the paper's 65-145 HU.
    Returns the config (with the range stored) and the calibration record (None when off or given).
    """
    from hepaseg.data.prepare import read_manifest
    from hepaseg.data.synthetic import synthetic_calibration

    if config.crop is not None:
        size = int(read_manifest(config.data)["options"]["size"])
        if config.crop > size:
            raise HepasegError(f"--crop: {config.crop} pixels is larger than the prepared slices: expected at most "
                               f"{size} (the --size of `hepaseg prepare`). Use a smaller --crop")
    if not config.synthetic_tumors or config.synthetic_contrast_hu is not None:
        return config, None
    calibration = synthetic_calibration(config.data, split="train")
    contrast = calibration["contrast_hu"]
    rank_zero_info(
        f"hepaseg: synthetic tumours darken by {calibration['darkening_hu'][0]:.0f}-"
        f"{calibration['darkening_hu'][1]:.0f} HU ({calibration['source']}; tumour-to-liver contrast "
        f"{'n/a' if contrast is None else f'{contrast:.1f}'} HU)"
    )
    values = {**config.to_dict(), "synthetic_contrast_hu": [float(v) for v in calibration["darkening_hu"]]}
    return TrainConfig.from_dict(values), calibration


def _train_options(config: TrainConfig) -> dict[str, Any]:
    """The training-only SliceDataset options of ``config``."""
    options: dict[str, Any] = {
        "aug_off": tuple(config.aug_off),
        "crop": config.crop,
        "tumor_crop_fraction": config.tumor_crop_fraction,
    }
    if config.synthetic_tumors:
        options["synthetic_tumors"] = config.synthetic_tumors
        options["synthetic_contrast_hu"] = tuple(config.synthetic_contrast_hu)
        options["synthetic_families"] = tuple(config.synthetic_families)
    if config.liver_enhancement:
        options["liver_enhancement"] = config.liver_enhancement
        options["liver_enhancement_hu"] = tuple(config.liver_enhancement_hu)
    return options


def _validation_warnings(config: TrainConfig, datamodule: SliceDataModule) -> list[str]:
    """Check the validation set against the config; return the warnings of a run without one.

    Raises:
        HepasegError: early stopping asked for on data without validation slices (it watches
            val_dice). Raised before the run directory is touched.
    """
    from hepaseg.data.zval import val_note

    manifest_path = Path(config.data) / "manifest.json"
    if datamodule.has_val:
        note = val_note(datamodule.manifest)
        if note is not None:
            rank_zero_info(f"hepaseg: {note}; best.ckpt is chosen on it")
        return []
    if config.early_stopping_patience:
        raise HepasegError(
            f"--early-stopping-patience: {manifest_path} has no validation slices: expected a val split to watch "
            "(early stopping stops when val_dice stops improving). Drop --early-stopping-patience and set "
            "--max-epochs / --max-minutes, or prepare with --val-fraction 0.15 (the last z-block of each training "
            "patient) or a val patient"
        )
    message = (f"{manifest_path} has no validation slices: training on every slice without validation "
               "(nnU-Net's fold 'all'); writing last.ckpt only (no best.ckpt, no val_dice). Use last.ckpt")
    rank_zero_warn(f"hepaseg: {message}")
    return [message]


class _EpochTimer(Callback):
    """Wall time of each training epoch (train + validation), of each training step, and the steps of this
    invocation."""

    def __init__(self, *, validates: bool = True) -> None:
        self.durations: list[float] = []
        self.step_seconds: list[float] = []  # each training batch: forward, backward and optimizer step
        self._start = 0.0
        self._step_start = 0.0
        self.first_step: int | None = None  # global_step when this invocation started (resume: > 0)
        self.validates = validates  # without validation, an epoch ends at on_train_epoch_end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = int(trainer.global_step)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.validates and not trainer.sanity_checking:
            self.durations.append(time.perf_counter() - self._start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.validates:
            self.durations.append(time.perf_counter() - self._start)


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on the prepared data in ``config.data``; write checkpoints to ``config.out``.

    Raises HepasegError for unusable input (data directory, model name or
    options, an existing run without --resume/--overwrite) and when the loss
    becomes NaN/inf (naming the step).
    """
    from hepaseg.models import build_model  # models is the stage above training

    t0 = time.perf_counter()
    config = resolve_config(config)
    run = Path(config.out)
    # Validate everything (data, loss, model and its options) before touching the run directory.
    config, calibration = _calibrate_synthetic(config)
    datamodule = SliceDataModule(
        config.data,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        augment=config.augment,
        target=config.target,
        seed=config.seed,
        train_options=_train_options(config),
    )
    run_warnings = _validation_warnings(config, datamodule)
    loss = build_loss(config.loss)
    L.seed_everything(config.seed, workers=True, verbose=False)  # before the network draws its weights
    datamodule.setup("fit")
    net = build_model(
        config.model, in_channels=datamodule.in_channels, num_classes=1, base_width=config.width, **config.model_options
    )
    run_dir = _prepare_run_dir(config)
    try:
        result = _fit(config, run, run_dir.resume_from, datamodule, loss, net, calibration, t0, run_warnings)
    except BaseException:
        if _is_global_zero():
            _settle_run_dir(run_dir, run, failed=True)
        raise
    if _is_global_zero():
        _settle_run_dir(run_dir, run, failed=False)
    return result


def _fit(config: TrainConfig, run: Path, resume_from: Path | None, datamodule: SliceDataModule, loss, net,
         calibration: dict[str, Any] | None, t0: float, run_warnings: list[str]) -> TrainResult:
    """The Lightning part of :func:`train`, in a prepared run directory."""
    if resume_from is not None:
        meta = _check_resume_matches(resume_from, config, net)["metrics"]
        rank_zero_info(
            f"hepaseg: resuming {resume_from} (saved after epoch {meta['epoch']}, "
            f"step {meta['step']}); continuing at epoch {meta['epoch'] + 1}"
        )
    meta = _checkpoint_meta(config, datamodule, net, calibration)
    if _is_global_zero():
        write_json_atomic(run / "config.json", {"format": CONFIG_FORMAT, **meta})
    module = SegmentationModule(
        net,
        loss,
        lr=config.lr,
        weight_decay=config.weight_decay,
        schedule=config.schedule,
        warmup_fraction=config.warmup_fraction,
        min_lr_ratio=config.min_lr_ratio,
        channels_last=config.channels_last,
        compile=config.compile,
        meta=meta,
    )
    callbacks = _Callbacks.for_run(config, run, validates=datamodule.has_val)
    trainer = _build_trainer(config, run, datamodule, callbacks)
    _fit_until_done_or_sigterm(trainer, module, datamodule, resume_from, callbacks.sigterm, run)
    stopped_by_time = callbacks.timer is not None and callbacks.timer.time_remaining("train") <= 0
    if stopped_by_time:
        # The budget can end mid-epoch, after the last end-of-epoch save: save the state reached.
        trainer.save_checkpoint(run / "last.ckpt", weights_only=False)
        rank_zero_info(f"hepaseg: --max-minutes {config.max_minutes} reached; saved {run / 'last.ckpt'}")
    result = _train_result(config, run, trainer, callbacks, stopped_by_time=stopped_by_time, t0=t0,
                           run_warnings=run_warnings)
    if trainer.is_global_zero:
        write_json_atomic(run / "result.json", result.to_dict())
    return result


def _on_gpu(config: TrainConfig) -> bool:
    return config.accelerator in ("gpu", "cuda") or (config.accelerator == "auto" and torch.cuda.is_available())


def _checkpoint_meta(config: TrainConfig, datamodule: SliceDataModule, net,
                     calibration: dict[str, Any] | None) -> dict[str, Any]:
    """What every checkpoint (and RUN/config.json) records: enough to rebuild the network and its data."""
    meta = {
        "model": config.model,
        "model_options": _resolved_model_options(net, config.model_options),
        "in_channels": datamodule.in_channels,
        "num_classes": 1,
        "base_width": config.width,
        "data_options": datamodule.data_options,
        "config": config.to_dict(),
    }
    if calibration is not None:
        meta["synthetic_calibration"] = calibration
    return meta


@dataclass
class _Callbacks:
    """The callbacks of one fit, by role (``all`` in the order Lightning runs them)."""

    sigterm: _StopOnSigterm
    checkpointer: ModelCheckpoint | None  # RUN/best.ckpt by val_dice (None without validation slices)
    epoch_timer: _EpochTimer
    timer: Timer | None  # --max-minutes
    all: list[Callback]
    show_progress: bool

    @classmethod
    def for_run(cls, config: TrainConfig, run: Path, *, validates: bool) -> _Callbacks:
        # Two checkpointers: Lightning's save_last only writes when the monitored metric improves, but
        # --resume needs the latest epoch every epoch. Without validation slices there is no "best".
        checkpointer = ModelCheckpoint(
            dirpath=run,
            filename="best",
            monitor="val_dice",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        ) if validates else None
        last_checkpointer = ModelCheckpoint(
            dirpath=run,
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )
        epoch_timer = _EpochTimer(validates=validates)
        sigterm = _StopOnSigterm(run / "last.ckpt")
        callbacks: list[Callback] = [
            sigterm,
            *([checkpointer] if checkpointer is not None else []),
            last_checkpointer,
            epoch_timer,
            DatasetEpoch(),
            LearningRateMonitor(logging_interval="step"),
        ]
        if config.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor="val_dice", mode="max", patience=config.early_stopping_patience))
        timer = None
        if config.max_minutes:
            timer = Timer(duration={"seconds": config.max_minutes * 60}, interval="step")
            callbacks.append(timer)
        show_progress = config.progress_bar and sys.stdout.isatty()
        if show_progress:
            callbacks.append(RichProgressBar())
        return cls(sigterm=sigterm, checkpointer=checkpointer, epoch_timer=epoch_timer, timer=timer, all=callbacks,
                   show_progress=show_progress)


def _build_trainer(config: TrainConfig, run: Path, datamodule: SliceDataModule, callbacks: _Callbacks) -> L.Trainer:
    """The Lightning ``Trainer`` of ``config``, logging CSV and TensorBoard under RUN/logs."""
    logs = run / "logs"
    loggers = [CSVLogger(logs, name="csv"), TensorBoardLogger(logs, name="tensorboard", default_hp_metric=False)]
    steps_per_epoch = max(1, len(datamodule.train_set) // config.batch_size)
    return L.Trainer(
        default_root_dir=run,
        max_epochs=config.max_epochs,
        precision=config.precision,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        # Some CUDA kernels (e.g. bilinear upsampling backward) have no deterministic version: warn there
        # instead of failing; CPU kernels are deterministic, so CPU runs repeat exactly.
        deterministic=("warn" if _on_gpu(config) else True) if config.deterministic else False,
        callbacks=callbacks.all,
        logger=loggers,
        log_every_n_steps=min(50, steps_per_epoch),
        enable_progress_bar=callbacks.show_progress,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        **({} if datamodule.has_val else {"limit_val_batches": 0, "num_sanity_val_steps": 0}),
    )


def _fit_until_done_or_sigterm(trainer: L.Trainer, module: SegmentationModule, datamodule: SliceDataModule,
                               resume_from: Path | None, sigterm: _StopOnSigterm, run: Path) -> None:
    """``trainer.fit``; after a SIGTERM, make sure RUN/last.ckpt holds the state reached and raise Terminated."""
    with warnings.catch_warnings(), _sigterm_sets(sigterm.event):
        # config.json is written first, so Lightning's "checkpoint directory is not empty" is expected.
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        # Lightning's own pytree helper uses torch's deprecated LeafSpec (lightning/pytorch/utilities/_pytree.py):
        # a note for Lightning's developers, nothing a hepaseg user can change.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        except SIGTERMException:  # Lightning's own SIGTERM handling; the callback saved last.ckpt
            sigterm.event.set()
    if sigterm.event.is_set():
        last = run / "last.ckpt"
        if not sigterm.saved:  # stopped by should_stop: save the state reached
            trainer.save_checkpoint(last, weights_only=False)
        raise Terminated(
            f"{run}: training stopped by SIGTERM at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"saved {last}. Continue with the same command and --resume"
        )


def _train_result(config: TrainConfig, run: Path, trainer: L.Trainer, callbacks: _Callbacks, *,
                  stopped_by_time: bool, t0: float, run_warnings: list[str]) -> TrainResult:
    """What the fit did, from the trainer and the timing callbacks."""
    checkpointer, epoch_timer = callbacks.checkpointer, callbacks.epoch_timer
    best_score = checkpointer.best_model_score if checkpointer is not None else None
    best_val = float(best_score) if best_score is not None and math.isfinite(float(best_score)) else None
    best, last = run / "best.ckpt", run / "last.ckpt"
    durations, steps = epoch_timer.durations, epoch_timer.step_seconds
    return TrainResult(
        run_dir=run,
        best_checkpoint=best if best.is_file() else None,
        last_checkpoint=last if last.is_file() else None,
        best_val_dice=best_val,
        epochs=int(trainer.current_epoch),
        steps=int(trainer.global_step),
        wall_seconds=time.perf_counter() - t0,
        seconds_per_epoch=(sum(durations) / len(durations)) if durations else None,
        stopped_by_time=stopped_by_time,
        epoch_seconds=list(durations),
        steps_per_second=(
            (int(trainer.global_step) - epoch_timer.first_step) / sum(durations)
            if durations and epoch_timer.first_step is not None
            else None
        ),
        peak_gpu_memory_bytes=int(torch.cuda.max_memory_allocated()) if _on_gpu(config) else None,
        warnings=run_warnings,
        first_step_seconds=steps[0] if steps else None,
        median_step_seconds=statistics.median(steps[1:]) if steps[1:] else None,
    )
