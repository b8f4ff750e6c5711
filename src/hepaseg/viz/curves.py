"""Training curves (train loss and validation Dice per epoch) from the runs' Lightning CSV logs,
and the test Dice of each slice along z.

:func:`hepaseg.training.train` logs through Lightning's ``CSVLogger`` into
``RUN/logs/csv/version_N/metrics.csv``, one version per invocation (a resumed run
adds a version). Each row holds the metrics logged at one step; the columns used
here are ``epoch``, ``train_loss_epoch`` (mean training loss of the epoch) and
``val_dice`` (mean per-slice Dice on the validation slices). Versions are read in
order and a later value of the same epoch wins, so a resumed run reads as one
curve. The figure is drawn with matplotlib's object API on an Agg canvas (no
pyplot state, no display) and written atomically.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hepaseg.errors import HepasegError
from hepaseg.io.atomic import atomic_path

__all__ = ["TrainingLog", "plot_slice_dice", "plot_training_curves", "read_training_log"]


@dataclass
class TrainingLog:
    """Per-epoch metrics of one run, sorted by epoch (0-based, as Lightning counts).

    Attributes:
        train_loss: ``{epoch: mean training loss}`` (epochs that finished training).
        val_dice: ``{epoch: mean per-slice validation Dice in [0, 1]}``.
    """

    train_loss: dict[int, float] = field(default_factory=dict)
    val_dice: dict[int, float] = field(default_factory=dict)


def _version_number(path: Path) -> int:
    m = re.fullmatch(r"version_(\d+)", path.parent.name)
    return int(m.group(1)) if m else -1


def read_training_log(run_dir: str | os.PathLike) -> TrainingLog:
    """Read ``RUN/logs/csv/version_*/metrics.csv`` of one ``hepaseg train`` run.

    Args:
        run_dir: the run directory (``hepaseg train --out``).

    Returns:
        :class:`TrainingLog`; empty dicts when no epoch finished (e.g. a tiny time budget).

    Raises:
        HepasegError: when the run has no CSV log at all.
    """
    run = Path(run_dir)
    files = sorted((run / "logs" / "csv").glob("version_*/metrics.csv"), key=_version_number)
    if not files:
        raise HepasegError(
            f"{run}: no training log: expected logs/csv/version_N/metrics.csv written by `hepaseg train`. "
            "Pass the run directory of a finished (or started) training run."
        )
    log = TrainingLog()
    for file in files:
        with open(file, newline="") as fh:
            for row in csv.DictReader(fh):
                epoch = _number(row.get("epoch"))
                if epoch is None:
                    continue  # rows of step-wise metrics logged outside an epoch (e.g. the learning rate)
                for key, target in (("train_loss_epoch", log.train_loss), ("val_dice", log.val_dice)):
                    value = _number(row.get(key))
                    if value is not None:
                        target[int(epoch)] = value
    log.train_loss = dict(sorted(log.train_loss.items()))
    log.val_dice = dict(sorted(log.val_dice.items()))
    return log


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def plot_training_curves(
    runs: Mapping[str, str | os.PathLike | TrainingLog],
    out: str | os.PathLike,
    *,
    title: str = "Training curves",
    dpi: int = 110,
) -> Path:
    """Draw train loss and validation Dice per epoch for several runs into one PNG.

    Args:
        runs: ``{label: run directory or TrainingLog}`` in legend order (e.g. ``{"mfcnet": ...,
            "unet": ...}``).
        out: destination ``.png`` (written atomically).
        title: figure title.
        dpi: resolution; the figure is 9 x 3.6 inches.

    Returns:
        ``Path(out)``. Epochs are shown 1-based (epoch 1 = the first epoch). A run without a
        finished epoch gets a "no finished epoch" note instead of a line.

    Raises:
        ValueError: if ``runs`` is empty.
        HepasegError: a run directory without a CSV log.
    """
    if not runs:
        raise ValueError("`runs` is empty: expected {label: run directory} with at least one run.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logs = {label: r if isinstance(r, TrainingLog) else read_training_log(r) for label, r in runs.items()}
    fig = Figure(figsize=(9.0, 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    missing = []
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for i, (label, log) in enumerate(logs.items()):
        color = f"C{i}"
        # Markers (a short budget may give one or two epochs) and line styles differ per run, so
        # runs with equal values (e.g. the first epoch of two similar networks) stay visible.
        marker, line = styles[i % len(styles)]
        for ax, series in ((ax_loss, log.train_loss), (ax_dice, log.val_dice)):
            if series:
                epochs = [e + 1 for e in series]
                ax.plot(epochs, list(series.values()), marker=marker, markersize=7 - 2 * (i % 2), linestyle=line,
                        color=color, label=label, zorder=3 + len(logs) - i)  # the first run on top
        if not log.train_loss and not log.val_dice:
            missing.append(label)
    ax_loss.set(title="train loss (epoch mean)", xlabel="epoch", ylabel="loss")
    ax_dice.set(title="validation Dice (per-slice mean)", xlabel="epoch", ylabel="Dice", ylim=(0.0, 1.0))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if missing:
        fig.text(0.5, 0.01, "no finished epoch: " + ", ".join(missing), ha="center", fontsize=8, color="0.4")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def plot_slice_dice(
    rows: Mapping[str, Sequence[Mapping[str, object]]],
    out: str | os.PathLike,
    *,
    title: str = "Dice per test slice",
    dpi: int = 110,
) -> Path:
    """Draw each method's per-slice Dice against the slice's original z index into one PNG.

    Args:
        rows: ``{label: per-slice rows}``, each row with ``slice`` (original z index) and ``dice``
            (a fraction), e.g. :attr:`hepaseg.evaluation.evaluate.EvaluationResult.rows`.
        out: destination ``.png`` (written atomically).
        title: figure title.
        dpi: resolution; the figure is 9 x 3 inches.

    Returns:
        ``Path(out)``.

    Raises:
        ValueError: if ``rows`` is empty or a row lacks ``slice`` or ``dice``.
    """
    if not rows:
        raise ValueError("`rows` is empty: expected {label: per-slice rows} with at least one method.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (label, items) in enumerate(rows.items()):
        try:
            points = sorted((int(r["slice"]), float(r["dice"])) for r in items)  # type: ignore[arg-type]
        except KeyError as exc:
            raise ValueError(f"`rows[{label!r}]`: a row lacks {exc}: expected 'slice' and 'dice'.") from None
        if points:
            z, dice = zip(*points)
            ax.plot(z, dice, marker="o", markersize=3, color=f"C{i}", label=label)
    ax.set(title=title, xlabel="slice (original z index)", ylabel="Dice", ylim=(0.0, 1.0))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
