"""Figures and reports: the explanation figure (``hepaseg explain``: the paper's Fig. 1), training
curves, the self-contained HTML report of ``hepaseg demo`` and the per-case report of
``hepaseg predict --report``."""

from hepaseg.viz.case_report import CaseReport, predict_report, render_case_report, write_case_report
from hepaseg.viz.curves import TrainingLog, plot_slice_dice, plot_training_curves, read_training_log
from hepaseg.viz.explain import ExplainResult, default_queries, explain_slice, map_to_input_grid
from hepaseg.viz.report import ReportContent, ReportFigure, png_data_uri, render_report, write_report

__all__ = [
    "CaseReport",
    "ExplainResult",
    "ReportContent",
    "ReportFigure",
    "TrainingLog",
    "default_queries",
    "explain_slice",
    "map_to_input_grid",
    "plot_slice_dice",
    "plot_training_curves",
    "png_data_uri",
    "predict_report",
    "read_training_log",
    "render_case_report",
    "render_report",
    "write_case_report",
    "write_report",
]
