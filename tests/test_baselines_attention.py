"""Model-specific tests of CE-Net, non-local U-Net, DANet and CS-Net.

The shared contract (shapes, gradients, determinism, ...) is tested over
``list_models()`` in ``test_models.py``; here each network's defining module is
compared with a naive re-implementation of the reference code, and parameter
counts with hand-computed ones. Tiny widths and 16-64 px inputs keep it fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hepaseg.errors import HepasegError
from hepaseg.models import build_model, count_parameters
from hepaseg.models.cenet import DACBlock, RMPBlock, cenet
from hepaseg.models.csnet import AffinityAttention, SpatialAttention, csnet
from hepaseg.models.csnet import ChannelAttention as CSChannelAttention
from hepaseg.models.danet import ChannelAttention, PositionAttention, danet
from hepaseg.models.nonlocal_unet import NonLocalBlock, nonlocal_unet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _meta_count(factory, **kwargs) -> int:
    # Parameter counts of full-width models without allocating their weights.
    with torch.device("meta"):
        return count_parameters(factory(**kwargs))


# ----------------------------------------------------------------------------- CE-Net
def test_dac_matches_reference_formula_and_keeps_shape():
    dac = DACBlock(6)
    for conv in (dac.dilate1, dac.dilate3, dac.dilate5, dac.conv1x1):
        nn.init.normal_(conv.bias)  # non-zero biases so a wrong branch order shows
    x = torch.randn(2, 6, 11, 13)
    # The reference's forward, recomputing the shared dilate1 as it does.
    d1, d3, d5, p = dac.dilate1, dac.dilate3, dac.dilate5, dac.conv1x1
    expected = x + F.relu(d1(x)) + F.relu(p(d3(x))) + F.relu(p(d3(d1(x)))) + F.relu(p(d5(d3(d1(x)))))
    out = dac(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)
    assert [c.dilation for c in (d1, d3, d5)] == [(1, 1), (3, 3), (5, 5)]


def test_rmp_adds_four_channels_and_pools_by_kernel():
    rmp = RMPBlock(5)
    x = torch.randn(2, 5, 12, 12)
    out = rmp(x)
    assert out.shape == (2, 5 + 4, 12, 12)
    torch.testing.assert_close(out[:, 4:], x)  # the input is passed through after the 4 maps
    # Level 1: kernel = stride = 2 max-pool by reshaping, 1x1 conv, bilinear upsampling.
    pooled = x.reshape(2, 5, 6, 2, 6, 2).amax(dim=(3, 5))
    level1 = F.interpolate(rmp.conv(pooled), size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, :1], level1)
    # Level 4: kernel 6 on a 12x12 map -> a 2x2 grid of maxima.
    pooled6 = x.reshape(2, 5, 2, 6, 2, 6).amax(dim=(3, 5))
    torch.testing.assert_close(
        out[:, 3:4], F.interpolate(rmp.conv(pooled6), size=(12, 12), mode="bilinear", align_corners=False)
    )


def test_rmp_on_a_map_smaller_than_the_kernel_uses_global_max():
    rmp = RMPBlock(3)
    x = torch.randn(1, 3, 2, 3)  # the 1/32 map of a 64 x 96 input
    out = rmp(x)
    assert out.shape == (1, 7, 2, 3)
    global_level = rmp.conv(x.amax(dim=(2, 3), keepdim=True)).expand(1, 1, 2, 3)
    for level in (1, 2, 3):  # kernels 3, 5, 6 are all clipped to the whole map (3 to 2x3)
        torch.testing.assert_close(out[:, level : level + 1], global_level)


def _torchvision_like_state(model) -> dict[str, torch.Tensor]:
    # The encoder uses torchvision's names; add a classifier as a real resnet34 file has.
    state = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    state["fc.weight"] = torch.randn(10, model.encoder.layer4[-1].conv2.out_channels)
    state["fc.bias"] = torch.randn(10)
    return state


def test_cenet_loads_a_torchvision_style_state_dict(tmp_path):
    source = cenet(in_channels=3, base_width=4)
    for p in source.encoder.parameters():
        nn.init.normal_(p)  # differ from a fresh model's init
    path = tmp_path / "resnet34.pth"
    torch.save(_torchvision_like_state(source), path)

    loaded = cenet(in_channels=3, base_width=4, pretrained_state_dict=str(path))
    for (name, a), b in zip(source.encoder.state_dict().items(), loaded.encoder.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(loaded.dac.dilate1.weight, source.dac.dilate1.weight)  # only the encoder loads

    # Fewer channels: RGB stem averaged and scaled by 3 / in_channels (sum for one channel).
    rgb = source.encoder.conv1.weight  # (w, 3, 7, 7)
    one = cenet(in_channels=1, base_width=4, pretrained_state_dict=path)
    torch.testing.assert_close(one.encoder.conv1.weight, rgb.sum(dim=1, keepdim=True))
    five = build_model("cenet", in_channels=5, base_width=4, pretrained_state_dict=path)
    torch.testing.assert_close(
        five.encoder.conv1.weight, rgb.sum(dim=1, keepdim=True).expand(-1, 5, -1, -1) / 5
    )
    torch.testing.assert_close(
        five.encoder.layer3[2].bn1.running_mean, source.encoder.layer3[2].bn1.running_mean
    )


def test_cenet_state_dict_errors_are_clear(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(HepasegError, match=r"pretrained_state_dict .*nope\.pth.*file not found"):
        cenet(base_width=4, pretrained_state_dict=str(missing))

    path = tmp_path / "w8.pth"
    torch.save(_torchvision_like_state(cenet(in_channels=3, base_width=8)), path)
    with pytest.raises(HepasegError, match="base_width=64"):
        cenet(in_channels=3, base_width=4, pretrained_state_dict=path)

    state = _torchvision_like_state(cenet(in_channels=3, base_width=4))
    del state["layer2.0.downsample.0.weight"]
    torch.save(state, path)
    with pytest.raises(HepasegError, match=r"missing \['layer2\.0\.downsample\.0\.weight'\]"):
        cenet(in_channels=3, base_width=4, pretrained_state_dict=path)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(HepasegError, match="cannot be read"):
        cenet(base_width=4, pretrained_state_dict=garbage)

    with pytest.raises(ValueError, match="pretrained_state_dict"):
        cenet(base_width=4, pretrained_state_dict=3)


def test_cenet_parameter_count_equals_reference_code():
    # Hand count of CE_Net_ (Guzaiwang/CE-Net) with num_channels=3, num_classes=1:
    # resnet34 without fc 21,284,672 + DAC 3 * (512*512*9 + 512) + (512*512 + 512) = 7,342,080
    # + RMP 1x1 513 + decoders 250,899 + 62,208 + 15,744 + 4,640 + final 32,800 + 9,248 + 289.
    reference = 21_284_672 + 7_342_080 + 513 + 250_899 + 62_208 + 15_744 + 4_640 + 32_800 + 9_248 + 289
    assert reference == 29_003_093
    assert _meta_count(cenet, in_channels=3) == reference
    assert _meta_count(cenet) == reference - 64 * 2 * 49  # one input channel instead of three


# ------------------------------------------------------------------ non-local U-Net
def test_non_local_block_is_identity_at_init():
    block = NonLocalBlock(8)
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)  # train mode
    torch.testing.assert_close(block.eval()(x), x, rtol=0, atol=0)


def test_non_local_sdpa_equals_naive_embedded_gaussian():
    block = NonLocalBlock(8).eval()
    nn.init.normal_(block.out[1].weight)  # leave the identity so the output depends on the attention
    x = torch.randn(2, 8, 5, 7)
    theta = block.theta(x).flatten(2)  # (N, 4, HW)
    phi = block.phi(x).flatten(2)
    g = block.g(x).flatten(2)
    f = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (N, HW, HW), no 1/sqrt(d)
    y = (f @ g.transpose(1, 2)).transpose(1, 2).reshape(2, 4, 5, 7)  # (N, C/2, H, W)
    torch.testing.assert_close(block.attend(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(x), x + block.out(y), atol=1e-5, rtol=1e-5)
    assert (block(x) - x).abs().max() > 1e-3


def test_nonlocal_unet_places_block_on_bottleneck_and_counts():
    model = nonlocal_unet(base_width=4)
    seen = []
    model.non_local.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    model(torch.randn(1, 1, 48, 32))
    assert seen == [(1, 64, 3, 2)]  # 16w channels at 1/16
    c = 1024  # bottleneck width at base_width=64
    block = 3 * (c * c // 2 + c // 2) + (c // 2 * c + c) + 2 * c
    with torch.device("meta"):
        full = nonlocal_unet(base_width=64)
    assert count_parameters(full.non_local) == block == 2_101_760
    assert count_parameters(full) == 33_138_241


# ----------------------------------------------------------------------------- DANet
def test_pam_rows_sum_to_one_identity_at_init_and_matches_reference():
    pam = PositionAttention(16)
    x = torch.randn(2, 16, 4, 6)
    s = pam.attention(x)
    assert s.shape == (2, 24, 24) and pam.query.out_channels == 2
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 24))
    torch.testing.assert_close(pam(x), x, rtol=0, atol=0)  # gamma = 0
    with torch.no_grad():
        pam.gamma.fill_(0.7)
    # Reference: out = bmm(V (C, N), S^T); E = gamma * out + x.
    v = pam.value(x).flatten(2)
    expected = 0.7 * torch.bmm(v, s.transpose(1, 2)).reshape(x.shape) + x
    torch.testing.assert_close(pam(x), expected, atol=1e-5, rtol=1e-5)


def test_cam_rows_sum_to_one_identity_at_init_and_matches_reference():
    cam = ChannelAttention()
    x = torch.randn(2, 6, 4, 5)
    a = x.reshape(2, 6, -1)
    energy = torch.bmm(a, a.transpose(1, 2))
    expected_att = torch.softmax(energy.max(-1, keepdim=True)[0].expand_as(energy) - energy, dim=-1)
    torch.testing.assert_close(cam.attention(x), expected_att)
    torch.testing.assert_close(cam.attention(x).sum(-1), torch.ones(2, 6))
    torch.testing.assert_close(cam(x), x, rtol=0, atol=0)
    with torch.no_grad():
        cam.gamma.fill_(-0.3)
    torch.testing.assert_close(cam(x), -0.3 * torch.bmm(expected_att, a).reshape(x.shape) + x)


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 1, 40, 56)])
def test_danet_output_stride_is_8(shape):
    model = danet(base_width=4).eval()
    seen = []
    # The encoder returns its four stage outputs; the last one feeds the attention head.
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(tuple(o[-1].shape[-2:])))
    model.head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    out = model(torch.randn(shape))
    h, w = shape[-2:]
    assert seen == [(h // 8, w // 8)] * 2
    assert out.shape == (shape[0], 1, h, w)
    dilations = [
        blk.conv2.dilation[0] for layer in (model.encoder.layer3, model.encoder.layer4) for blk in layer
    ]
    # The first block of a stage keeps the previous dilation (torchvision's replace_stride_with_dilation).
    assert dilations == [1] + [2] * 5 + [2] + [4] * 2


def test_danet_options_and_counts():
    with pytest.raises(ValueError, match="dropout"):
        danet(base_width=4, dropout=1.0)
    with pytest.raises(HepasegError, match="danet"):
        build_model("danet", base_width=4, dropuot=0.2)
    with torch.device("meta"):
        full = danet(base_width=64)
    # Dilation does not change counts: the encoder is resnet34 without fc, minus 2 of 3 stem channels.
    assert count_parameters(full.encoder) == 21_284_672 - 64 * 2 * 49
    assert count_parameters(full) == 22_774_755


# ---------------------------------------------------------------------------- CS-Net
def test_csnet_spatial_attention_uses_1x3_and_3x1_kernels():
    sab = SpatialAttention(16)
    query_convs = [m for m in sab.query.modules() if isinstance(m, nn.Conv2d)]
    key_convs = [m for m in sab.key.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in query_convs] == [(1, 3)]
    assert [c.kernel_size for c in key_convs] == [(3, 1)]
    assert sab.value.kernel_size == (1, 1) and query_convs[0].out_channels == 2
    model = csnet(base_width=4)
    kernels = {m.kernel_size for m in model.attention.spatial.modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(1, 3), (3, 1), (1, 1)}


def test_csnet_attention_identity_at_init_and_matches_reference():
    aff = AffinityAttention(16).eval()
    x = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(aff.spatial(x), x, rtol=0, atol=0)
    torch.testing.assert_close(aff.channel(x), x, rtol=0, atol=0)
    torch.testing.assert_close(aff(x), 2 * x, rtol=0, atol=0)
    s = aff.spatial.attention(x)
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 15))
    with torch.no_grad():
        aff.spatial.gamma.fill_(0.5)
    # Reference: weights = matmul(V (C, N), affinity^T); out = gamma * weights + x.
    v = aff.spatial.value(x).flatten(2)
    expected = 0.5 * (v @ s.transpose(1, 2)).reshape(x.shape) + x
    torch.testing.assert_close(aff.spatial(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(aff.channel, CSChannelAttention)


def test_csnet_parameter_count_at_paper_width():
    # Hand count of the reference CSNet(classes=1, channels=1): encoders 4,890,720, attention
    # 459,650, decoders 2,352,960, deconvs 696,800, final 33, plus the unused attention_fuse
    # conv 524,800 that we leave out.
    reference = 4_890_720 + 459_650 + 2_352_960 + 696_800 + 33 + 524_800
    assert reference == 8_924_963  # the paper's ~8.9M
    ours = _meta_count(csnet, base_width=32)
    assert ours == reference - 524_800 == 8_400_163
    assert abs(ours - 8.9e6) / 8.9e6 < 0.15


@pytest.mark.parametrize("factory", [cenet, nonlocal_unet, danet, csnet])
def test_bad_base_width_names_the_argument(factory):
    with pytest.raises(ValueError, match="base_width"):
        factory(base_width=0)
