"""Networks: MFCNet (the paper's) and the nine baselines of its Table 1.

Importing this package imports every model file, which registers it.
"""

from hepaseg.models.registry import build_model, count_parameters, list_models, model_info, register_model

# One import per model file, in the order of the paper's Table 1 (mfcnet first).
from hepaseg.models import mfcnet, unet  # noqa: F401
from hepaseg.models import attention_unet, r2unet, nested_unet, se_unet  # noqa: F401
from hepaseg.models import cenet, nonlocal_unet, danet, csnet  # noqa: F401
# [models:imports]

__all__ = ["build_model", "count_parameters", "list_models", "model_info", "register_model"]
