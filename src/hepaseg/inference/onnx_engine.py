"""ONNX export of a trained network and an onnxruntime wrapper that predicts like it.

Export (:func:`export_onnx`) uses the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``): it is fast, emits the requested opset
directly, and our networks have no data-dependent control flow. When a torch
release no longer has it, the torch.export-based exporter is used instead.
Only the **batch** axis is dynamic: :class:`hepaseg.models.base.SegmentationModel`
pads ``H, W`` to a multiple of its stride in Python, which tracing records as
constants, so the graph is exported for the training slice size ``S x S`` (the
only size inference feeds it). The preprocessing the network expects
(``data_options``) and the model name are stored in the file's
``metadata_props`` so ``hepaseg predict --engine onnx`` needs no checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hepaseg.errors import HepasegError
from hepaseg.io.atomic import atomic_path

__all__ = ["METADATA_PREFIX", "OnnxModel", "export_onnx", "read_onnx_metadata"]

METADATA_PREFIX = "hepaseg."
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    in_channels: int,
    size: int,
    opset: int = 17,
    metadata: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis, atomically.

    Args:
        model: network ``(N, in_channels, size, size) -> (N, num_classes, size, size)`` logits;
            moved to CPU and set to eval mode (in place).
        path: the ``.onnx`` file to write.
        in_channels: input channels (``2K + 1``).
        size: slice size in pixels (height = width) the graph is exported for.
        opset: ONNX opset (default 17).
        metadata: JSON-serialisable values stored as ``metadata_props`` under
            ``"hepaseg.<key>"`` (e.g. ``data_options``, ``model_name``, ``model_options``).
        verify: run ``onnx.checker`` and compare onnxruntime to torch on a random batch of 3
            (a different batch than the export's, so a batch size frozen by tracing is caught).

    Returns:
        ``path``.

    Raises:
        HepasegError: the exported graph fails the checker or disagrees with torch.
    """
    import onnx

    path = Path(path)
    model = model.to("cpu").eval()
    example = torch.rand(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp:
        _torch_export(model, example, tmp, opset)
        proto = onnx.load(str(tmp))
        props = {"in_channels": in_channels, "size": size, **(metadata or {})}
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key = METADATA_PREFIX + key
            entry.value = json.dumps(value)
        proto.producer_name = "hepaseg"
        if verify:
            try:
                onnx.checker.check_model(proto, full_check=True)
            except onnx.checker.ValidationError as exc:
                raise HepasegError(f"{path}: exported ONNX graph is invalid: {_first_line(exc)}") from None
        onnx.save(proto, str(tmp))
        if verify:
            _verify(model, tmp, in_channels, size, path)
    return path


def _torch_export(model: nn.Module, example: torch.Tensor, out: Path, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings about the (constant) shape checks and the exporter's deprecation notice.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                str(out),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
            )
            return
        except (TypeError, RuntimeError, NotImplementedError, AttributeError):
            pass  # no TorchScript exporter in this torch: use torch.export below
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
        )
        program.save(str(out))


def _verify(model: nn.Module, onnx_path: Path, in_channels: int, size: int, dest: Path) -> None:
    x = torch.rand(3, in_channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = OnnxModel(onnx_path)(x.numpy())
    err = float(np.abs(got - expected).max())
    tol = 1e-3 * max(1.0, float(np.abs(expected).max()))
    if got.shape != expected.shape or not err <= tol:
        raise HepasegError(
            f"{dest}: exported ONNX model disagrees with torch (max |diff| {err:.3g}, shape {got.shape} vs "
            f"{expected.shape}): expected agreement within {tol:.1g}. Report this model as not exportable"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``hepaseg.*`` metadata of an exported file, JSON-decoded, keys without the prefix."""
    return OnnxModel(path).metadata


class OnnxModel:
    """An exported network run by onnxruntime, called like the torch model.

    ``model(x)`` takes ``(N, C, S, S)`` float32 (numpy array or torch tensor) and returns the
    logits ``(N, num_classes, S, S)`` of the same kind, so it can be passed to
    :func:`hepaseg.inference.predict_volume`.

    Attributes:
        path: the ``.onnx`` file.
        metadata: the ``hepaseg.*`` metadata (``data_options``, ``model_name``, ``in_channels``,
            ``size``, ...), JSON-decoded; empty for files not written by hepaseg.
        in_channels: input channels from the graph's input shape.
        size: the exported slice size, or None when the graph's H/W are dynamic.

    Raises:
        HepasegError: the file is missing or is not a loadable ONNX model.
    """

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise HepasegError(
                f"{self.path}: ONNX model not found: expected a file written by `hepaseg export`. Check --model"
            )
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; ORT's warnings are not for users
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise HepasegError(
                f"{self.path}: not a valid ONNX model ({_first_line(exc)}): expected a file written by "
                "`hepaseg export`. Re-export it with `hepaseg export --checkpoint CKPT --onnx FILE`"
            ) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise HepasegError(
                f"{self.path}: ONNX model inputs: expected one (N, C, H, W) input, got "
                f"{[(i.name, i.shape) for i in inputs]}. Export it with `hepaseg export`"
            )
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        self.in_channels = shape[1] if isinstance(shape[1], int) else None
        self.size = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
        raw = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = {}
        for key, value in raw.items():
            if key.startswith(METADATA_PREFIX):
                try:
                    self.metadata[key[len(METADATA_PREFIX) :]] = json.loads(value)
                except json.JSONDecodeError:
                    self.metadata[key[len(METADATA_PREFIX) :]] = value

    @property
    def data_options(self) -> dict | None:
        return self.metadata.get("data_options")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Logits for ``x`` ``(N, C, S, S)``; returns the same type (torch tensors come back on CPU)."""
        is_tensor = isinstance(x, torch.Tensor)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy() if is_tensor else np.asarray(x, np.float32)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(arr)})[0]
        return torch.from_numpy(out) if is_tensor else out

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, model={self.model_name!r}, in_channels={self.in_channels})"
