"""Evaluation: per-slice and per-case segmentation metrics and the paper's Table 1.

``metrics`` computes Dice, Jaccard, precision, recall, specificity, Hausdorff and HD95 per
2D slice (pixels) and Dice, Jaccard, RVD, ASSD, HD95, Hausdorff per 3D case (mm), with an
explicit empty-mask policy; ``report`` aggregates slices (means, sd, the paper's F1 of the
mean precision and recall), renders Table 1 as Markdown and writes per-slice CSVs.
``detection`` scores lesion-wise detection (recall by diameter bin, false-positive lesions and
slices). ``evaluate`` scores a checkpoint on a prepared split (``hepaseg evaluate``). The protocols
that train and score many runs (``hepaseg compare``, ``crossval``) live in :mod:`hepaseg.experiments`.
"""

from hepaseg.evaluation.detection import (
    DIAMETER_BINS,
    fp_slice_rate,
    lesion_detection,
)
from hepaseg.evaluation.evaluate import (
    EvaluationResult,
    check_data_options,
    check_threshold,
    evaluate_checkpoint,
    predict_slices,
)
from hepaseg.evaluation.metrics import (
    SLICE_METRICS,
    VOLUME_METRICS,
    global_dice,
    slice_metrics,
    surface_distances,
    volume_metrics,
)
from hepaseg.evaluation.report import (
    TABLE1_COLUMNS,
    f1_from_means,
    summarize_slices,
    table1_markdown,
    write_slice_csv,
)

__all__ = [
    "DIAMETER_BINS",
    "SLICE_METRICS",
    "TABLE1_COLUMNS",
    "VOLUME_METRICS",
    "EvaluationResult",
    "check_data_options",
    "check_threshold",
    "evaluate_checkpoint",
    "f1_from_means",
    "fp_slice_rate",
    "global_dice",
    "lesion_detection",
    "predict_slices",
    "slice_metrics",
    "summarize_slices",
    "surface_distances",
    "table1_markdown",
    "volume_metrics",
    "write_slice_csv",
]
