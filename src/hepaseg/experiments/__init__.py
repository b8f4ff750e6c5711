"""Experiments: the protocols that train and score many runs, above every stage they wire together.

``compare`` trains and evaluates several networks under one protocol (``hepaseg compare``);
``crossval`` runs leave-one-patient-out cross-validation on whole held-out CT volumes and
``crossval_scoring`` chooses the post-processing on its folds (``hepaseg crossval``); ``benchmark``
measures what the networks and the pipeline cost on this machine (``hepaseg benchmark``); ``demo``
runs the whole product on one real CT case (``hepaseg demo``).

They import from every stage below them (io ... inference, viz), so they sit between ``viz`` and
``cli``: ``evaluation`` keeps metrics and scoring, ``inference`` keeps prediction.

The package re-exports compare's API (``hepaseg.experiments.compare`` is the function here, as it was in
``hepaseg.evaluation``), ``run_benchmark`` and ``run_demo``. Crossval is imported from its modules
(``hepaseg.experiments.crossval``, ``.crossval_scoring``): a re-exported ``crossval`` function would hide
the module of the same name from ``import hepaseg.experiments.crossval as m``.
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
from hepaseg.experiments.demo import run_demo

__all__ = [
    "CompareResult",
    "benchmark_tables",
    "check_sizes",
    "compare",
    "compare_collect",
    "compare_plan",
    "compare_run",
    "cpu_ms_per_slice",
    "parse_models",
    "run_benchmark",
    "run_demo",
    "run_index_from_env",
    "wilcoxon_vs",
]
