"""CE-Net (Gu et al., "CE-Net: Context Encoder Network for 2D Medical Image
Segmentation", IEEE TMI 2019) — the paper's "CE-Net" row of Table 1.

Defining module: the *context extractor* between a ResNet-34 encoder and a light
decoder, made of two blocks on the 1/32 feature map ``(N, 8w, H/32, W/32)``:

* **DAC** (dense atrous convolution): four cascaded branches of 3 x 3 atrous
  convolutions, rates ``1``, ``3 -> 1x1``, ``1 -> 3 -> 1x1``, ``1 -> 3 -> 5 -> 1x1``
  (the convolutions of the same rate and the 1 x 1 share weights across branches, as
  in the reference code), each followed by ReLU and summed with the input::

      y = x + relu(a1(x)) + relu(p(a3(x))) + relu(p(a3(a1(x)))) + relu(p(a5(a3(a1(x)))))

* **RMP** (residual multi-kernel pooling): max-pooling with kernels (and strides)
  2, 3, 5, 6, one shared 1 x 1 convolution to one channel after each pool, bilinear
  upsampling back to the map size and concatenation with the input, so ``C -> C + 4``.

Encoder: ResNet-34 (7 x 7 stride-2 stem + 3 x 3 stride-2 max-pool, BasicBlock layers
``[3, 4, 6, 3]`` of widths ``w, 2w, 4w, 8w``; ``base_width=64`` is torchvision's
resnet34). Decoder: four blocks ``1x1 (C -> C/4) -> 3x3 transposed conv stride 2 ->
1x1 (-> C_out)``, each conv with BN-ReLU, with *additive* skips from the encoder, then
a 4 x 4 stride-2 transposed conv to ``w/2`` channels, ReLU, 3 x 3 conv, ReLU, 3 x 3 conv
to the logits. The layout and channel counts follow the authors' code
(``CE_Net_`` in github.com/Guzaiwang/CE-Net); at ``base_width=64`` the network has
28,996,821 parameters with one input channel and 29,003,093 with three, exactly the
reference code's count (``base_width=32``: 7,256,629).

What is left open / what we chose:

* **Pre-training.** CE-Net starts from ImageNet weights; nothing can be downloaded
  here, so the network trains from scratch unless ``pretrained_state_dict`` names a
  local torchvision ``resnet34`` state dict (``torch.save(resnet34(weights=...).state_dict(), p)``).
  It is read with ``torch.load(weights_only=True)``; ``fc.*`` is dropped and the other
  keys map 1:1 onto ``encoder.*`` (our encoder uses torchvision's module names). When
  ``in_channels != 3`` the stem weights are averaged over RGB and scaled by
  ``3 / in_channels`` (summed for one channel), so a slice repeated in every input
  channel gives the response the RGB network gives to the same grey image. Only
  ``base_width=64`` matches torchvision's shapes.
* **Small maps in RMP.** The pools use floor mode like the reference, which fails when
  the 1/32 map is smaller than the kernel (inputs under 192 px). There we clip the
  kernel (and stride) to the map size, i.e. that branch becomes a global max-pool;
  for 512 x 512 slices (16 x 16 maps) nothing changes.
* **Initialisation.** Convolutions in the encoder use He (fan-out) init, BN ``(1, 0)``
  as torchvision's ResNet; DAC biases start at zero as in the reference code.
* The reference applies a sigmoid at the end; we return raw logits (hepaseg rule).
* ``size_multiple = 32`` (five stride-2 steps); other sizes are zero-padded by
  :class:`~hepaseg.models.base.SegmentationModel`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hepaseg.errors import HepasegError
from hepaseg.models.base import SegmentationModel, check_positive
from hepaseg.models.registry import register_model

__all__ = [
    "BasicBlock",
    "CENet",
    "DACBlock",
    "DecoderBlock",
    "RMPBlock",
    "ResNet34Encoder",
    "cenet",
    "load_resnet34_state_dict",
]


# --------------------------------------------------------------------------- encoder
class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), torchvision's module names.

    ``(N, in, H, W) -> (N, out, H/stride, W/stride)``; ``dilation`` keeps the size
    with a wider receptive field (used by DANet's dilated encoder).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet34Encoder(nn.Module):
    """ResNet-34 without the classifier; returns the four stage outputs.

    ``(N, in, H, W) -> [(N, w, H/4, W/4), (N, 2w, H/8, W/8), (N, 4w, H/16, W/16),
    (N, 8w, H/32, W/32)]``. Parameter names equal torchvision's ``resnet34`` so its
    state dict loads 1:1.

    ``dilations`` (per stage, default all 1): a stage with dilation > 1 keeps stride 1
    and dilates its convolutions instead (torchvision's ``replace_stride_with_dilation``);
    ``(1, 1, 2, 4)`` gives DANet's output stride 8, every stage then at ``H/8, W/8``.
    """

    def __init__(self, in_channels: int, base_width: int, *, dilations: tuple[int, ...] = (1, 1, 1, 1)) -> None:
        super().__init__()
        widths = [base_width * 2**i for i in range(4)]  # w, 2w, 4w, 8w
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, prev, prev_dilation = [], widths[0], 1
        for i, (width, depth, dilation) in enumerate(zip(widths, (3, 4, 6, 3), dilations, strict=True)):
            stride = 1 if i == 0 or dilation > 1 else 2
            blocks = [BasicBlock(prev, width, stride=stride, dilation=prev_dilation)]
            blocks += [BasicBlock(width, width, dilation=dilation) for _ in range(depth - 1)]
            layers.append(nn.Sequential(*blocks))
            prev, prev_dilation = width, dilation
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, w, H/4, W/4)
        e1 = self.layer1(x)
        e2 = self.layer2(e1)
        e3 = self.layer3(e2)
        e4 = self.layer4(e3)
        return [e1, e2, e3, e4]


def load_resnet34_state_dict(encoder: ResNet34Encoder, path: str | Path) -> None:
    """Load a torchvision ``resnet34`` state dict from ``path`` into ``encoder``.

    ``fc.*`` keys are ignored; the stem ``conv1.weight (w, 3, 7, 7)`` is adapted to
    ``in_channels`` (mean over RGB times ``3 / in_channels``) when that is not 3.
    Raises :class:`HepasegError` for a missing/unreadable file, missing keys or
    mismatched shapes (only ``base_width=64`` matches torchvision).
    """
    path = Path(path)
    if not path.is_file():
        raise HepasegError(
            f"pretrained_state_dict {str(path)!r}: file not found: expected a torchvision resnet34 state dict "
            "saved with torch.save(model.state_dict(), path). Check the path or pass None to train from scratch"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor content
        raise HepasegError(
            f"pretrained_state_dict {str(path)!r}: cannot be read as a state dict ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict):
        raise HepasegError(
            f"pretrained_state_dict {str(path)!r}: expected a dict of tensors, got {type(state).__name__}"
        )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise HepasegError(
            f"pretrained_state_dict {str(path)!r}: keys do not match resnet34: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}. "
            "Save torchvision's resnet34().state_dict()"
        )
    stem = state["conv1.weight"]
    in_channels = own["conv1.weight"].shape[1]
    if stem.dim() == 4 and stem.shape[1] == 3 and in_channels != 3:
        # Average over RGB; scaling by 3 / in_channels keeps the response to a grey
        # image repeated in every channel equal to the RGB network's.
        stem = stem.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (3.0 / in_channels)
        state["conv1.weight"] = stem
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        key, got, expected = bad[0]
        raise HepasegError(
            f"pretrained_state_dict {str(path)!r}: {key} has shape {got}, expected {expected} "
            f"({len(bad)} mismatched tensors). torchvision's resnet34 needs base_width=64"
        )
    encoder.load_state_dict(state, strict=True)


# ----------------------------------------------------------------- context extractor
class DACBlock(nn.Module):
    """Dense atrous convolution block. ``(N, C, H, W) -> (N, C, H, W)``.

    Four cascaded branches with receptive fields 3, 7, 9, 19; convolutions of equal
    rate and the 1 x 1 are shared across branches (reference code).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dilate1 = nn.Conv2d(channels, channels, 3, padding=1, dilation=1)
        self.dilate3 = nn.Conv2d(channels, channels, 3, padding=3, dilation=3)
        self.dilate5 = nn.Conv2d(channels, channels, 3, padding=5, dilation=5)
        self.conv1x1 = nn.Conv2d(channels, channels, 1)
        for conv in (self.dilate1, self.dilate3, self.dilate5, self.conv1x1):
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.dilate1(x)  # shared by branches 1, 3, 4 (the reference recomputes it)
        a13 = self.dilate3(a1)
        branch1 = F.relu(a1)
        branch2 = F.relu(self.conv1x1(self.dilate3(x)))
        branch3 = F.relu(self.conv1x1(a13))
        branch4 = F.relu(self.conv1x1(self.dilate5(a13)))
        return x + branch1 + branch2 + branch3 + branch4


class RMPBlock(nn.Module):
    """Residual multi-kernel pooling. ``(N, C, H, W) -> (N, C + 4, H, W)``.

    Max-pools with kernel = stride = 2, 3, 5, 6 (clipped to the map size on small
    maps), a shared 1 x 1 conv to one channel, bilinear upsampling to ``(H, W)``;
    the four maps are concatenated in front of the input.
    """

    kernel_sizes = (2, 3, 5, 6)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        levels = []
        for k in self.kernel_sizes:
            kernel = (min(k, h), min(k, w))  # a map smaller than the kernel: global max-pool
            pooled = F.max_pool2d(x, kernel_size=kernel, stride=kernel)
            levels.append(F.interpolate(self.conv(pooled), size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat([*levels, x], dim=1)


# --------------------------------------------------------------------------- decoder
class DecoderBlock(nn.Sequential):
    """1x1 (C -> C/4) -> 3x3 transposed conv stride 2 -> 1x1 (-> out), each with BN-ReLU.

    ``(N, in, H, W) -> (N, out, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        mid = max(1, in_channels // 4)
        super().__init__(
            nn.Conv2d(in_channels, mid, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


# ----------------------------------------------------------------------------- model
class CENet(SegmentationModel):
    """CE-Net: ResNet-34 encoder -> DAC -> RMP -> decoder with additive skips.

    Args:
        in_channels: input channels (default 1).
        num_classes: output channels (default 1).
        base_width: encoder width ``w`` (stages ``w, 2w, 4w, 8w``; default 64 = resnet34).
        pretrained_state_dict: path to a local torchvision resnet34 state dict, or
            ``None`` (default) to train from scratch.

    Input ``(N, in_channels, H, W)``; output logits ``(N, num_classes, H, W)``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 1,
        base_width: int = 64,
        pretrained_state_dict: str | Path | None = None,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes, base_width=base_width)
        if pretrained_state_dict is not None and not isinstance(pretrained_state_dict, (str, Path)):
            raise ValueError(f"pretrained_state_dict must be a path or None, got {pretrained_state_dict!r}")
        self.in_channels, self.num_classes, self.size_multiple = in_channels, num_classes, 32
        w = [base_width * 2**i for i in range(4)]  # w, 2w, 4w, 8w

        self.encoder = ResNet34Encoder(in_channels, base_width)
        self.dac = DACBlock(w[3])
        self.rmp = RMPBlock(w[3])
        self.decoder4 = DecoderBlock(w[3] + 4, w[2])
        self.decoder3 = DecoderBlock(w[2], w[1])
        self.decoder2 = DecoderBlock(w[1], w[0])
        self.decoder1 = DecoderBlock(w[0], w[0])
        final = max(1, base_width // 2)  # 32 at the reference width
        self.head = nn.Sequential(
            nn.ConvTranspose2d(w[0], final, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(final, final, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(final, num_classes, 3, padding=1),
        )
        if pretrained_state_dict is not None:
            load_resnet34_state_dict(self.encoder, pretrained_state_dict)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        e1, e2, e3, e4 = self.encoder(x)  # strides 4, 8, 16, 32
        center = self.rmp(self.dac(e4))  # (N, 8w + 4, H/32, W/32)
        d4 = self.decoder4(center) + e3  # (N, 4w, H/16, W/16)
        d3 = self.decoder3(d4) + e2  # (N, 2w, H/8, W/8)
        d2 = self.decoder2(d3) + e1  # (N, w, H/4, W/4)
        d1 = self.decoder1(d2)  # (N, w, H/2, W/2)
        return self.head(d1)  # (N, num_classes, H, W)


@register_model(
    paper="Gu et al., IEEE TMI 2019",
    module="ResNet-34 encoder + dense atrous convolution (DAC) + residual multi-kernel pooling (RMP)",
)
def cenet(*, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, **options) -> CENet:
    """CE-Net; options: ``pretrained_state_dict`` (local torchvision resnet34 state dict, default None)."""
    return CENet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, **options)
