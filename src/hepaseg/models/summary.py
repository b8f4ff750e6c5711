"""One row per registered network: what ``hepaseg models`` prints."""

from __future__ import annotations

from hepaseg.errors import HepasegError
from hepaseg.models.registry import build_model, count_parameters, list_models, model_info

__all__ = ["model_summaries"]


def model_summaries(width: int = 64, in_channels: int = 1, num_classes: int = 1) -> list[dict]:
    """Build every registered model once and describe it.

    Args:
        width: ``base_width`` to build with (default 64, the papers' width); must be >= 1.
        in_channels: input channels (default 1).
        num_classes: output channels (default 1).

    Returns:
        In registry order (mfcnet first), dicts with ``name`` (str), ``params``
        (int, trainable parameters), ``paper`` ("Author et al., Venue Year") and
        ``module`` (one line on the defining module).

    Raises:
        HepasegError: a width or channel count that is not a positive integer.
    """
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise HepasegError(f"width must be a positive integer (every network's base_width), got {width!r}")
    rows = []
    for name in list_models():
        info = model_info(name)
        model = build_model(name, in_channels=in_channels, num_classes=num_classes, base_width=width)
        params = count_parameters(model)
        rows.append({"name": name, "params": params, "paper": info.paper, "module": info.module})
    return rows
