"""Reading and writing CT volumes (LiTS, MSD Task03, 3D-IRCADb, NIfTI, DICOM, MRC)."""

from hepaseg.io.atomic import atomic_dir, atomic_path, write_json_atomic, write_text_atomic
from hepaseg.io.volume import LABEL_BACKGROUND, LABEL_LIVER, LABEL_TUMOR, Volume

# [io:exports]

__all__ = [
    "LABEL_BACKGROUND",
    "LABEL_LIVER",
    "LABEL_TUMOR",
    "Volume",
    "atomic_dir",
    "atomic_path",
    "write_json_atomic",
    "write_text_atomic",
]
