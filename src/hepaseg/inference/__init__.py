"""Inference: whole-volume prediction, lesion report, overlay montage, ONNX export and engine.

``predict_case`` is what ``hepaseg predict`` runs: read a CT case, rebuild the
network and its preprocessing from a checkpoint (or an exported ONNX file),
predict the tumour at the scan's resolution and write the mask, a lesion table,
an overlay PNG and (for labelled inputs) metrics, atomically.
"""

from hepaseg.inference.batch import SUMMARY_COLUMNS, BatchResult, predict_batch
from hepaseg.inference.lesions import LESION_CSV_COLUMNS, axial_feret_diameter, lesion_table, lesions_to_csv
from hepaseg.inference.onnx_engine import OnnxModel, export_onnx, read_onnx_metadata
from hepaseg.inference.overlay import draw_overlay
from hepaseg.inference.pipeline import (
    OUTPUT_FORMATS,
    LoadedModels,
    PredictResult,
    check_ct_image,
    export_checkpoint,
    load_models,
    predict_case,
)
from hepaseg.inference.predictor import check_volume_for_model, predict_volume
from hepaseg.inference.preprocess import DataOptions, parse_data_options, preprocess_slices

__all__ = [
    "LESION_CSV_COLUMNS",
    "OUTPUT_FORMATS",
    "SUMMARY_COLUMNS",
    "BatchResult",
    "LoadedModels",
    "DataOptions",
    "OnnxModel",
    "PredictResult",
    "axial_feret_diameter",
    "check_ct_image",
    "check_volume_for_model",
    "draw_overlay",
    "export_checkpoint",
    "export_onnx",
    "lesion_table",
    "lesions_to_csv",
    "load_models",
    "parse_data_options",
    "predict_batch",
    "predict_case",
    "predict_volume",
    "preprocess_slices",
    "read_onnx_metadata",
]
