"""Experiments: the protocols that train and score many runs, above every stage they wire together.

``compare`` trains and evaluates several networks under one protocol (``hepaseg compare``);
``crossval`` runs leave-one-patient-out cross-validation on whole held-out CT volumes and
``crossval_scoring`` chooses the post-processing on its folds (``hepaseg crossval``); ``benchmark``
measures what the networks and the pipeline cost on this machine (``hepaseg benchmark``); ``demo``
runs the whole product on one real CT case (``hepaseg demo``).

They import from every stage below them (io ... inference, viz), so they sit between ``viz`` and
``cli``: ``evaluation`` keeps metrics and scoring, ``inference`` keeps prediction.
"""

from hepaseg.experiments.benchmark import benchmark_tables, run_benchmark
from hepaseg.experiments.compare import (
    CompareResult,
    check_sizes,
    compare,
    compare_collect,
    compare_plan,
    compare_run,
    cpu_ms_per_slice,
    parse_models,
    run_index_from_env,
    wilcoxon_vs,
)
from hepaseg.experiments.crossval import (
    CrossvalResult,
    case_metrics,
    crossval,
    crossval_collect,
    crossval_plan,
    crossval_run,
    make_fold_data,
)
from hepaseg.experiments.crossval_scoring import parse_settings, score_crossval
from hepaseg.experiments.demo import run_demo

__all__ = [
    "CompareResult",
    "CrossvalResult",
    "benchmark_tables",
    "case_metrics",
    "check_sizes",
    "compare",
    "compare_collect",
    "compare_plan",
    "compare_run",
    "cpu_ms_per_slice",
    "crossval",
    "crossval_collect",
    "crossval_plan",
    "crossval_run",
    "make_fold_data",
    "parse_models",
    "parse_settings",
    "run_benchmark",
    "run_demo",
    "run_index_from_env",
    "score_crossval",
    "wilcoxon_vs",
]
