"""Model-specific tests for the U-Net-family baselines: Attention U-Net, R2U-Net, UNet++, SE U-Net.

Shape / gradient / determinism / dtype tests shared by every network live in
``tests/test_models.py``; here each network's defining module is checked against a
hand-written reference, plus its options and parameter count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hepaseg.errors import HepasegError
from hepaseg.models import build_model, count_parameters
from hepaseg.models.attention_unet import AttentionGate, AttentionUNet
from hepaseg.models.nested_unet import NestedUNet
from hepaseg.models.r2unet import R2UNet, RecurrentConv, RRCNNBlock
from hepaseg.models.se_unet import SEUNet, SqueezeExcitation


def _seeded_input(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def _bn_eval(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ---------------------------------------------------------------- options and shapes


@pytest.mark.parametrize(
    ("name", "kwargs", "input_shape", "expected_shape"),
    [
        ("attention_unet", {"in_channels": 3, "num_classes": 2}, (2, 3, 64, 48), (2, 2, 64, 48)),
        ("r2unet", {"t": 1}, (1, 1, 50, 37), (1, 1, 50, 37)),
        ("r2unet", {"t": 3, "num_classes": 3}, (1, 1, 48, 48), (1, 3, 48, 48)),
        ("nested_unet", {"deep_supervision": True, "num_classes": 2}, (2, 1, 50, 37), (2, 2, 50, 37)),
        ("nested_unet", {"deep_supervision": False}, (2, 1, 64, 64), (2, 1, 64, 64)),
        ("se_unet", {"reduction": 2, "in_channels": 5}, (1, 5, 48, 56), (1, 1, 48, 56)),
    ],
)
def test_options_give_logits_of_input_size(name, kwargs, input_shape, expected_shape):
    model = build_model(name, base_width=4, **kwargs).eval()
    with torch.no_grad():
        assert model(_seeded_input(*input_shape)).shape == expected_shape


@pytest.mark.parametrize(
    ("cls", "kwargs", "argument"),
    [
        (R2UNet, {"t": 0}, "t"),
        (R2UNet, {"t": -2}, "t"),
        (R2UNet, {"t": 1.5}, "t"),
        (R2UNet, {"t": True}, "t"),
        (SEUNet, {"reduction": 0}, "reduction"),
        (SEUNet, {"reduction": 2.0}, "reduction"),
        (NestedUNet, {"deep_supervision": "yes"}, "deep_supervision"),
        (NestedUNet, {"deep_supervision": 1}, "deep_supervision"),
        (AttentionUNet, {"base_width": 1}, "base_width"),
        (NestedUNet, {"in_channels": 0}, "in_channels"),
        (SEUNet, {"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(cls, kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be"):
        cls(**{"base_width": 4, **kwargs})


@pytest.mark.parametrize(
    ("name", "option"), [("attention_unet", "t"), ("r2unet", "reduction"), ("se_unet", "deep_supervision")]
)
def test_unknown_option_is_a_user_error(name, option):
    with pytest.raises(HepasegError, match=rf"model '{name}'.*{option}"):
        build_model(name, base_width=4, **{option: 1})


# ---------------------------------------------------------------- Attention U-Net


def test_attention_gates_multiply_each_skip_by_coefficients_in_0_1():
    torch.manual_seed(0)
    model = AttentionUNet(base_width=4)
    _randomise_bn(model)
    model.eval()
    calls, alphas, decoder_inputs = [], [], []
    for gate, decoder in zip(model.gates, model.decoders):
        gate.register_forward_hook(lambda m, args, out: calls.append((m, *args, out)))
        gate.psi.register_forward_hook(lambda m, args, out: alphas.append(out))
        decoder.register_forward_hook(lambda m, args, out: decoder_inputs.append(args[0]))
    x = _seeded_input(2, 1, 64, 48)
    with torch.no_grad():
        model(x)

    assert len(calls) == len(alphas) == 4
    for k, ((gate, g, skip, out), alpha, dec_in) in enumerate(zip(calls, alphas, decoder_inputs)):
        level = 3 - k  # gates run coarse to fine
        c, h, w = 4 * 2**level, 64 // 2**level, 48 // 2**level
        assert skip.shape == g.shape == out.shape == (2, c, h, w)
        assert alpha.shape == (2, 1, h, w)
        assert bool(((alpha > 0) & (alpha < 1)).all())
        assert alpha.std() > 0  # the coefficients vary over the image
        torch.testing.assert_close(out, skip * alpha)
        # Independent reference of the gate: sigmoid(BN(psi(ReLU(BN(W_g g) + BN(W_x x))))).
        q = F.relu(
            _bn_eval(F.conv2d(g, gate.w_g[0].weight), gate.w_g[1])
            + _bn_eval(F.conv2d(skip, gate.w_x[0].weight), gate.w_x[1])
        )
        expected_alpha = torch.sigmoid(_bn_eval(F.conv2d(q, gate.psi[0].weight), gate.psi[1]))
        torch.testing.assert_close(alpha, expected_alpha)
        # The decoder sees [gated skip, gating signal]: the gate really sits on the skip.
        torch.testing.assert_close(dec_in, torch.cat([out, g], dim=1))


def test_attention_gate_can_close_a_skip():
    gate = AttentionGate(gate_channels=3, skip_channels=5, inter_channels=2).eval()
    gate.psi[1].bias.data.fill_(-50.0)  # psi BN shift far negative -> alpha ~ 0
    skip = _seeded_input(1, 5, 8, 8)
    with torch.no_grad():
        out = gate(_seeded_input(1, 3, 8, 8), skip)
    assert skip.abs().max() > 0.5
    assert out.abs().max() < 1e-12


# ---------------------------------------------------------------- R2U-Net


@pytest.mark.parametrize("t", [1, 2, 3])
def test_r2unet_recurrent_units_apply_their_shared_conv_t_plus_1_times(t):
    model = R2UNet(base_width=4, t=t).eval()
    rcls = [m for m in model.modules() if isinstance(m, RecurrentConv)]
    assert len(rcls) == 2 * 9  # two RCLs in each of the 5 encoder + 4 decoder units
    counts = {id(r.conv): 0 for r in rcls}

    def count(module, args, out):
        counts[id(module)] += 1

    for r in rcls:
        r.conv.register_forward_hook(count)
    with torch.no_grad():
        model(_seeded_input(1, 1, 32, 32))
    assert set(counts.values()) == {t + 1}


def test_r2unet_parameter_count_does_not_depend_on_t():
    # The recurrence reuses one convolution: more steps, same weights.
    assert count_parameters(R2UNet(base_width=4, t=1)) == count_parameters(R2UNet(base_width=4, t=4))


def test_rrcnn_block_matches_hand_unrolled_recurrence():
    torch.manual_seed(0)
    block = RRCNNBlock(3, 6, t=2)
    _randomise_bn(block)
    block.eval()
    x = _seeded_input(2, 3, 12, 10)

    def f(rcl: RecurrentConv, inp: torch.Tensor) -> torch.Tensor:
        conv, bn = rcl.conv[0], rcl.conv[1]
        return F.relu(_bn_eval(F.conv2d(inp, conv.weight, padding=1), bn))

    p = F.conv2d(x, block.project.weight, block.project.bias)
    r1, r2 = block.rcnn
    h = f(r1, p)  # t = 2: h0 = f(x), h1 = f(x + h0), h2 = f(x + h1)
    h = f(r1, p + h)
    h = f(r1, p + h)
    z = f(r2, h)
    z = f(r2, h + z)
    z = f(r2, h + z)
    with torch.no_grad():
        torch.testing.assert_close(block(x), p + z)


# ---------------------------------------------------------------- UNet++


def test_nested_unet_heads_and_no_unused_parameters():
    x = _seeded_input(2, 1, 48, 48)
    for deep_supervision, n_heads in ((False, 1), (True, 4)):
        torch.manual_seed(0)
        model = NestedUNet(base_width=4, num_classes=2, deep_supervision=deep_supervision).train()
        assert len(model.heads) == n_heads
        out = model(x)
        assert out.shape == (2, 2, 48, 48)
        out.square().mean().backward()
        unused = [name for name, p in model.named_parameters() if p.grad is None]
        assert unused == []
    # Only the three extra 1x1 heads differ: 3 * (4 * 2 weights + 2 biases).
    extra = count_parameters(
        NestedUNet(base_width=4, num_classes=2, deep_supervision=True)
    ) - count_parameters(NestedUNet(base_width=4, num_classes=2))
    assert extra == 3 * (4 * 2 + 2)


def test_nested_unet_dense_skip_inputs():
    # X^{i,j} takes j same-level maps of w*2^i channels plus the upsampled w*2^(i+1) map.
    model = NestedUNet(base_width=4)
    assert [len(col) for col in model.nodes] == [5, 4, 3, 2, 1]
    for i, column in enumerate(model.nodes):
        for j, node in enumerate(column[1:], start=1):
            assert node[0][0].in_channels == j * 4 * 2**i + 4 * 2 ** (i + 1)
            assert node[1][0].out_channels == 4 * 2**i


def test_nested_unet_deep_supervision_averages_the_four_heads():
    torch.manual_seed(0)
    model = NestedUNet(base_width=4, num_classes=2, deep_supervision=True).eval()
    top = {}
    for j in range(1, 5):
        model.nodes[0][j].register_forward_hook(lambda m, a, out, j=j: top.__setitem__(j, out))
    x = _seeded_input(1, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        heads = [head(top[j]) for j, head in zip(range(1, 5), model.heads)]
    assert all(h.shape == (1, 2, 32, 32) for h in heads)
    torch.testing.assert_close(out, (heads[0] + heads[1] + heads[2] + heads[3]) / 4)


# ---------------------------------------------------------------- SE U-Net


def test_se_unet_gates_every_double_conv_with_channel_gates_in_0_1():
    torch.manual_seed(0)
    model = SEUNet(base_width=4, reduction=2).eval()
    blocks = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    assert len(blocks) == 9  # 5 encoder + 4 decoder double convs
    seen = []
    for se in blocks:
        se.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    with torch.no_grad():
        model(_seeded_input(2, 1, 48, 32))
    assert len(seen) == 9
    widths = sorted(x.shape[1] for _, x, _ in seen)
    assert widths == [4, 4, 8, 8, 16, 16, 32, 32, 64]
    for se, x, out in seen:
        n, c = x.shape[:2]
        # Independent reference: mean over H, W -> FC -> ReLU -> FC -> sigmoid.
        fc1, fc2 = se.excite[0], se.excite[2]
        s = x.mean(dim=(2, 3))  # (N, C)
        gate = torch.sigmoid(
            F.linear(F.relu(F.linear(s, fc1.weight.flatten(1), fc1.bias)), fc2.weight.flatten(1), fc2.bias)
        )
        gate = gate[:, :, None, None]
        assert gate.shape == (n, c, 1, 1)
        assert bool(((gate > 0) & (gate < 1)).all())
        with torch.no_grad():
            torch.testing.assert_close(se.excite(se.squeeze(x)), gate)
        torch.testing.assert_close(out, x * gate)


@pytest.mark.parametrize(
    ("channels", "reduction", "hidden"), [(256, 16, 16), (64, 16, 8), (4, 16, 8), (64, 2, 32)]
)
def test_se_bottleneck_width(channels, reduction, hidden):
    se = SqueezeExcitation(channels, reduction=reduction)
    assert se.excite[0].out_channels == hidden and se.excite[2].out_channels == channels


# ---------------------------------------------------------------- parameter counts

# (name, reference-code count at width 64, our exact count at width 64 / 32).
# References: LeeJunHyun/Image_Segmentation AttU_Net and R2U_Net, 4uiiurz1/pytorch-nested-unet
# NestedUNet with filters 64..1024; SE U-Net: U-Net (blocks.py, 31.04 M) + 9 SE blocks.
PARAM_COUNTS = [
    ("attention_unet", 34_878_573, 34_869_609, 8_721_593),
    ("r2unet", 39_091_393, 39_084_417, 9_775_297),
    ("nested_unet", 36_629_763, 36_621_185, 9_159_105),
    ("se_unet", None, 31_258_753, 7_820_369),
]


@pytest.mark.parametrize(("name", "reference", "ours_64", "ours_32"), PARAM_COUNTS)
def test_parameter_counts(name, reference, ours_64, ours_32):
    n64 = count_parameters(build_model(name, base_width=64))
    n32 = count_parameters(build_model(name, base_width=32))
    if reference is not None:
        assert abs(n64 - reference) <= 0.1 * reference
    assert (n64, n32) == (ours_64, ours_32)


def test_se_unet_count_is_hand_computed_unet_plus_se_blocks():
    # Independent hand count at width 64 with 1 input channel and 1 class.
    def double_conv(c_in: int, c_out: int) -> int:  # two bias-free 3x3 convs + two BNs
        return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out

    def se(c: int) -> int:  # FC C->h and h->C with biases, h = max(8, C // 16)
        h = max(8, c // 16)
        return 2 * c * h + h + c

    w = [64, 128, 256, 512, 1024]
    encoder = sum(double_conv(c_in, c_out) + se(c_out) for c_in, c_out in zip([1, *w[:-1]], w))
    # Up: 2x2 transposed conv C -> C/2 (with bias), then a double conv on [skip, up] = C channels.
    decoder = sum(4 * c * (c // 2) + c // 2 + double_conv(c, c // 2) + se(c // 2) for c in w[:0:-1])
    head = 64 + 1
    assert count_parameters(SEUNet(base_width=64)) == encoder + decoder + head
