"""Slice datasets: prepare CT volumes into 2D slices, load them for training, phantoms and the sample case."""

from hepaseg.data.augment import AUGMENT_FAMILIES, AUGMENT_PRESETS
from hepaseg.data.dataset import TARGETS, SliceDataset, build_augmentation
from hepaseg.data.phantom import PHANTOM_HU, make_phantom, write_phantom_dataset
from hepaseg.data.prepare import (
    FORMAT,
    SLICE_MODES,
    SPLITS,
    is_prepared_dir,
    prepare,
    preprocess_image,
    read_manifest,
    resize_label,
    select_slices,
    split_cases,
    stack_context,
    summary_table,
)
from hepaseg.data.sample import LITS117_SHA256, SAMPLES, default_cache_dir, fetch_lits117
from hepaseg.data.synthetic import SyntheticTumors, measure_tumor_contrast, synthetic_calibration

__all__ = [
    "AUGMENT_FAMILIES",
    "AUGMENT_PRESETS",
    "FORMAT",
    "LITS117_SHA256",
    "PHANTOM_HU",
    "SAMPLES",
    "SLICE_MODES",
    "SPLITS",
    "TARGETS",
    "SliceDataset",
    "SyntheticTumors",
    "build_augmentation",
    "default_cache_dir",
    "fetch_lits117",
    "is_prepared_dir",
    "make_phantom",
    "measure_tumor_contrast",
    "prepare",
    "preprocess_image",
    "read_manifest",
    "resize_label",
    "select_slices",
    "split_cases",
    "stack_context",
    "summary_table",
    "synthetic_calibration",
    "write_phantom_dataset",
]
