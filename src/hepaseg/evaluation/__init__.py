"""Evaluation: per-slice and per-case segmentation metrics and the paper's Table 1.

``metrics`` computes Dice, Jaccard, precision, recall, specificity, Hausdorff and HD95 per
2D slice (pixels) and Dice, Jaccard, RVD, ASSD, HD95, Hausdorff per 3D case (mm), with an
explicit empty-mask policy; ``report`` aggregates slices (means, sd, the paper's F1 of the
mean precision and recall), renders Table 1 as Markdown and writes per-slice CSVs.
``detection`` scores lesion-wise detection (recall by diameter bin, false-positive lesions and
slices). ``evaluate`` scores a checkpoint on a prepared split (``hepaseg evaluate``); ``compare``
trains and evaluates several networks under one protocol (``hepaseg compare``).
"""

from hepaseg.evaluation.compare import (
    CompareResult,
    check_sizes,
    compare,
    compare_collect,
    compare_plan,
    compare_run,
    cpu_ms_per_slice,
    parse_models,
    wilcoxon_vs,
)
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
    "CompareResult",
    "EvaluationResult",
    "check_data_options",
    "check_sizes",
    "check_threshold",
    "compare",
    "compare_collect",
    "compare_plan",
    "compare_run",
    "cpu_ms_per_slice",
    "evaluate_checkpoint",
    "f1_from_means",
    "fp_slice_rate",
    "global_dice",
    "lesion_detection",
    "parse_models",
    "predict_slices",
    "slice_metrics",
    "summarize_slices",
    "surface_distances",
    "table1_markdown",
    "volume_metrics",
    "wilcoxon_vs",
    "write_slice_csv",
]
