"""Model registry (after timm's ``_registry.py``).

Each model file ends with a small factory decorated with :func:`register_model`;
the registry is keyed by that factory's name. All factories share the leading
keyword-only arguments ``in_channels``, ``num_classes`` and ``base_width``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from hepaseg.errors import HepasegError

__all__ = ["ModelInfo", "register_model", "build_model", "list_models", "model_info", "count_parameters"]


@dataclass(frozen=True)
class ModelInfo:
    """What ``hepaseg models`` shows for one registry entry."""

    name: str
    factory: Callable[..., nn.Module]
    paper: str  # "Author et al., Venue Year"
    module: str  # one line on the defining module
    # Options a checkpoint from before hepaseg recorded resolved options was built with, where today's
    # default differs (applied by load_checkpoint to options such a checkpoint does not name).
    legacy_options: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    *, paper: str, module: str, legacy_options: Mapping[str, Any] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory under its function name.

    ``legacy_options``: when a default changes, the value the old default had, so that
    checkpoints written before options were recorded resolved still rebuild as trained.

    Example::

        @register_model(paper="Ronneberger et al., MICCAI 2015", module="...")
        def unet(*, in_channels=1, num_classes=1, base_width=64, **options) -> UNet: ...
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name=name, factory=factory, paper=paper, module=module,
                                    legacy_options=dict(legacy_options or {}))
        return factory

    return decorator


def _ensure_loaded() -> None:
    # Importing the package imports every model file, which fills the registry.
    import hepaseg.models  # noqa: F401


def list_models() -> list[str]:
    """Registered model names, in registration order (mfcnet first)."""
    _ensure_loaded()
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; unknown names raise listing the valid ones."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise HepasegError(f"unknown model {name!r}: expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options
) -> nn.Module:
    """Build a registered network returning logits ``(N, num_classes, H, W)``.

    Args:
        name: registry name (see :func:`list_models`).
        in_channels: input channels (1, or 2K+1 with K context slices).
        num_classes: output channels (1 for a binary tumour mask).
        base_width: channels of the first level; deeper levels scale from it.
        **options: architecture options of that model (see its docstring).
    """
    info = model_info(name)
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("base_width", base_width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise HepasegError(f"{arg} must be a positive integer, got {value!r}")
    try:
        return info.factory(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
    except TypeError as exc:  # an option the factory does not take
        raise HepasegError(f"model {name!r}: {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
