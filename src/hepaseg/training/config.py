"""The training configuration: one flat, typed dataclass.

:class:`TrainConfig` is what ``hepaseg train`` fills from its options and what
``RUN/config.json`` and every checkpoint store (as a plain dict, see
:meth:`TrainConfig.to_dict`), so a run can be rebuilt from its checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from hepaseg.errors import HepasegError

__all__ = ["PRECISIONS", "SCHEDULES", "TrainConfig", "parse_key_values"]

SCHEDULES = ("cosine", "poly")
# User spellings -> Lightning precision strings.
PRECISIONS = {
    "32": "32-true", "32-true": "32-true",
    "16": "16-mixed", "16-mixed": "16-mixed",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
}


@dataclass
class TrainConfig:
    """Everything one training run depends on (flat on purpose: one place to read).

    ``None`` means "choose from the hardware" and is resolved by
    :func:`hepaseg.training.train` before the run starts; ``RUN/config.json``
    holds the resolved values.
    """

    # --- what to train, where -------------------------------------------------------------
    data: str  # prepared dataset directory (hepaseg prepare output, holds manifest.json)
    model: str  # registry name, see `hepaseg models`
    out: str  # run directory: config.json, best.ckpt, last.ckpt, logs/
    width: int = 64  # base_width: channels of the first level (64 as in the papers)
    model_options: dict[str, Any] = field(default_factory=dict)  # architecture options of that model
    target: str | None = None  # tumor | liver: the binary mask trained; None: the dataset's prepared target

    # --- optimisation ---------------------------------------------------------------------
    loss: str = "dice_bce"  # dice_bce | focal | tversky | dice_topk (see training.losses)
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    schedule: str = "cosine"  # cosine | poly (power 0.9), per optimizer step, after warm-up
    warmup_fraction: float = 0.05  # share of all optimizer steps spent in linear warm-up from 0
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr (cosine and poly)
    batch_size: int = 8  # slices per optimizer step and per device
    max_epochs: int = 50
    max_minutes: float | None = None  # wall-clock budget; ends training cleanly and saves last.ckpt
    early_stopping_patience: int | None = None  # epochs without a val_dice gain; None = off

    # --- data loading ---------------------------------------------------------------------
    augment: bool | str = True  # augmentation preset (never on validation): True = "basic", False = "none",
    # or "nnunet" (data.augment); "basic"/"none" are stored as True/False
    aug_off: list[str] = field(default_factory=list)  # augmentation families left out (ablations)
    synthetic_tumors: float = 0.0  # probability per training item of painting synthetic tumours
    synthetic_contrast_hu: list[float] | None = None  # darkening range [lo, hi] HU; None: calibrated at
    # train start from the train split (data.synthetic.synthetic_calibration), then stored here
    synthetic_families: list[str] = field(default_factory=lambda: ["hypo"])  # lesion families drawn from,
    # data.synthetic.FAMILIES: hypo | iso | hyper | rim | deposit ("hypo" only = Hu et al.; runs before it existed)
    liver_enhancement: float = 0.0  # probability per training item of shifting the liver's HU (data.augment)
    liver_enhancement_hu: list[float] = field(default_factory=lambda: [-60.0, 20.0])  # that shift's range, HU
    crop: int | None = None  # training crop size in prepared pixels; None = whole slices
    tumor_crop_fraction: float = 0.0  # share of training crops centred on a random tumour pixel
    num_workers: int = 0  # DataLoader worker processes per device

    # --- numerics and reproducibility -----------------------------------------------------
    precision: str | None = None  # 32-true | 16-mixed | bf16-mixed; None: bf16-mixed on CPUs with
    # native bf16, else 32-true; 16-mixed on CUDA
    channels_last: bool | None = None  # NHWC memory format; None: on for CPU bf16-mixed (faster oneDNN)
    seed: int = 0  # seeds python/numpy/torch and the DataLoader workers
    deterministic: bool = True  # deterministic algorithms (CPU runs repeat bit for bit)
    compile: bool = False  # torch.compile the network; the first step pays the compilation (result.json says
    # how long as first_step_seconds against median_step_seconds)

    # --- scale-out (passed to the Lightning Trainer) ---------------------------------------
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: str | int = "auto"  # number of devices per node, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ... (Lightning strategy names)

    # --- run directory --------------------------------------------------------------------
    resume: bool = False  # continue from out/last.ckpt
    overwrite: bool = False  # clear an existing run in out first
    progress_bar: bool = True  # rich progress bar (only when stdout is a terminal)

    def __post_init__(self) -> None:
        checks = [
            ("--width", self.width, isinstance(self.width, int) and self.width > 0, "a positive integer"),
            ("--lr", self.lr, self.lr > 0, "a positive number"),
            ("--weight-decay", self.weight_decay, self.weight_decay >= 0, "a number >= 0"),
            ("--schedule", self.schedule, self.schedule in SCHEDULES, " or ".join(SCHEDULES)),
            ("warmup_fraction", self.warmup_fraction, 0 <= self.warmup_fraction < 1, "in [0, 1)"),
            ("min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("--batch-size", self.batch_size, self.batch_size > 0, "a positive integer"),
            ("--max-epochs", self.max_epochs, self.max_epochs > 0, "a positive integer"),
            ("--max-minutes", self.max_minutes, self.max_minutes is None or self.max_minutes > 0,
             "a positive number"),
            ("--early-stopping-patience", self.early_stopping_patience,
             self.early_stopping_patience is None or self.early_stopping_patience > 0, "a positive integer"),
            ("--num-workers", self.num_workers, self.num_workers >= 0, "an integer >= 0"),
            ("--precision", self.precision, self.precision is None or self.precision in PRECISIONS,
             ", ".join(PRECISIONS)),
            ("--num-nodes", self.num_nodes, self.num_nodes > 0, "a positive integer"),
            ("target", self.target, self.target in (None, "tumor", "liver"), "tumor or liver"),
        ]
        checks += [
            ("--synthetic-tumors", self.synthetic_tumors, 0 <= self.synthetic_tumors <= 1, "a probability in [0, 1]"),
            ("--liver-enhancement", self.liver_enhancement, 0 <= self.liver_enhancement <= 1,
             "a probability in [0, 1]"),
            ("--crop", self.crop, self.crop is None or (isinstance(self.crop, int) and self.crop > 0),
             "a positive integer (pixels)"),
            ("--tumor-crop-fraction", self.tumor_crop_fraction, 0 <= self.tumor_crop_fraction <= 1,
             "a fraction in [0, 1]"),
        ]
        for option, value, ok, expected in checks:
            if not ok:
                raise HepasegError(f"{option}: invalid value: expected {expected}, got {value!r}")
        self._check_augmentation()
        if self.precision is not None:
            self.precision = PRECISIONS[self.precision]
        if isinstance(self.devices, str) and self.devices.isdigit():
            self.devices = int(self.devices)
        if self.resume and self.overwrite:
            raise HepasegError("--resume and --overwrite: both given: expected at most one. "
                               "Resume continues RUN/last.ckpt, overwrite deletes the run")

    def _check_augmentation(self) -> None:
        from hepaseg.data.augment import AUGMENT_FAMILIES, normalize_augment

        try:
            preset = normalize_augment(self.augment)
        except ValueError:
            raise HepasegError(
                f"--augment: invalid value: expected basic, nnunet or none, got {self.augment!r}"
            ) from None
        # basic/none stay booleans, as in configs written before presets existed.
        self.augment = {"basic": True, "none": False}.get(preset, preset)
        self.aug_off = list(self.aug_off or [])
        bad = [f for f in self.aug_off if f not in AUGMENT_FAMILIES]
        if bad:
            raise HepasegError(f"--no-aug: unknown augmentation family {bad[0]!r}: expected one of "
                               f"{', '.join(AUGMENT_FAMILIES)}")
        if self.tumor_crop_fraction and self.crop is None:
            raise HepasegError(f"--tumor-crop-fraction: {self.tumor_crop_fraction} needs --crop: expected a crop "
                               "size in pixels, got none. Add --crop N (e.g. 160)")
        if self.synthetic_contrast_hu is not None:
            values = list(self.synthetic_contrast_hu)
            if len(values) != 2 or not 0 <= values[0] <= values[1]:
                raise HepasegError(f"synthetic_contrast_hu: expected [lo, hi] HU with 0 <= lo <= hi, got {values!r}")
            self.synthetic_contrast_hu = [float(v) for v in values]
        self._check_lesion_options()

    def _check_lesion_options(self) -> None:
        from hepaseg.data.synthetic import FAMILIES

        families = [str(f).strip().lower() for f in (self.synthetic_families or [])]
        bad = [f for f in families if f not in FAMILIES]
        if not families or bad or len(set(families)) != len(families):
            shown = bad[0] if bad else families
            raise HepasegError(f"--synthetic-family: invalid value {shown!r}: expected one or more of "
                               f"{', '.join(FAMILIES)} (each once), or all")
        self.synthetic_families = families
        values = list(self.liver_enhancement_hu)
        if len(values) != 2 or not values[0] <= values[1]:
            raise HepasegError(f"liver_enhancement_hu: expected [lo, hi] HU with lo <= hi, got {values!r}")
        self.liver_enhancement_hu = [float(v) for v in values]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what config.json and checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from a newer version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def parse_key_values(items: list[str], *, option: str = "--model-option") -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are JSON when they parse (``3``, ``0.5``, ``true``,
    ``[1, 2]``, ``null``), otherwise kept as strings (``mode=add``).

    >>> parse_key_values(["depth=4", "attention=true", "mode=add", "scales=[1,2]"])
    {'depth': 4, 'attention': True, 'mode': 'add', 'scales': [1, 2]}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise HepasegError(f"{option}: cannot parse {item!r}: expected KEY=VALUE with KEY a Python "
                               "identifier, e.g. depth=4")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
