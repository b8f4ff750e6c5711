"""Reading and writing CT volumes (LiTS, MSD Task03, 3D-IRCADb, NIfTI, DICOM, MRC)."""

from hepaseg.io.atomic import (
    atomic_dir,
    atomic_path,
    replace_dir,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from hepaseg.io.orientation import CANONICAL_AXCODES, CANONICAL_DESCRIPTION, SourceGeometry, to_canonical
from hepaseg.io.volume import LABEL_BACKGROUND, LABEL_LIVER, LABEL_TUMOR, Volume

from hepaseg.io.nifti import write_array_nifti, write_image_nifti, write_label_nifti, write_probability_nifti
from hepaseg.io.readers import DicomOptions, case_id_of, find_cases, read_volume
from hepaseg.io.outputs import OUTPUT_MARKER, check_output_dir, check_output_file, write_output_marker
from hepaseg.io.validate import check_volume

# [io:exports]

__all__ = [
    "CANONICAL_AXCODES",
    "CANONICAL_DESCRIPTION",
    "SourceGeometry",
    "to_canonical",
    "LABEL_BACKGROUND",
    "LABEL_LIVER",
    "LABEL_TUMOR",
    "OUTPUT_MARKER",
    "DicomOptions",
    "Volume",
    "atomic_dir",
    "atomic_path",
    "replace_dir",
    "check_output_dir",
    "check_output_file",
    "check_volume",
    "case_id_of",
    "find_cases",
    "read_volume",
    "write_array_nifti",
    "write_image_nifti",
    "write_csv_atomic",
    "write_json_atomic",
    "write_label_nifti",
    "write_output_marker",
    "write_probability_nifti",
    "write_text_atomic",
]
