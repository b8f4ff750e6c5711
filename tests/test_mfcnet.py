"""MFCNet and its context aggregation block: SDPA vs naive vs a hand-written reference,
the initial state, the parameter budget, the capture API and option checks."""

from __future__ import annotations

import pytest
import torch

from hepaseg.models import build_model, count_parameters
from hepaseg.models.context import ContextAggregation
from hepaseg.models.mfcnet import MFCNet
from hepaseg.models.unet import UNet


def random_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every alpha/beta a non-zero value so that the attention actually matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("alpha") or name.endswith("beta"):
                p.copy_(torch.rand(1, generator=generator) * 1.5 - 0.75)


def reference_block(block: ContextAggregation, x: torch.Tensor) -> torch.Tensor:
    """The paper's formulas written out with einsum, independent of the module's code paths."""
    b, c, h, w = x.shape
    f = x.reshape(b, c, h * w)  # (B, C, N)
    q = torch.einsum("oc,bcn->bno", block.spatial.query.weight[:, :, 0, 0], f) + block.spatial.query.bias
    k = torch.einsum("oc,bcn->bno", block.spatial.key.weight[:, :, 0, 0], f)
    if block.spatial.key.bias is not None:
        k = k + block.spatial.key.bias
    m = torch.softmax(torch.einsum("bjd,bid->bji", q, k), dim=-1)  # M[j, i]: position i for position j
    spatial = torch.einsum("bji,bci->bcj", m, f)  # X'_j = sum_i M[j, i] F_i
    a = torch.softmax(torch.einsum("bcn,bdn->bcd", f, f), dim=-1)  # A[c, d]: channel d for channel c
    channel = torch.einsum("bcd,bdn->bcn", a, f)
    x_s = block.spatial.alpha * spatial + f
    x_c = block.channel.beta * channel + f
    return (x_s + x_c).reshape(b, c, h, w)


# C = 16, 24: the query width d = C // 8 divides C; C = 44 (d = 5) exercises the zero-padded head.
# 300 > 256: Q and K padded to 256-wide heads, F split into 2 heads with zero-padded channels.
@pytest.mark.parametrize("channels", [16, 24, 44, 300])
def test_sdpa_equals_naive_outputs_and_gradients(channels):
    torch.manual_seed(0)
    block = ContextAggregation(channels)
    random_weights(block, seed=channels)
    x = torch.randn(2, channels, 7, 9, requires_grad=True)
    weight = torch.randn(2, channels, 7, 9)  # a loss whose gradient differs everywhere
    results = {}
    for impl in ("sdpa", "naive"):
        block.attention_impl = impl
        out = block(x)
        grads = torch.autograd.grad((out * weight).sum(), [x, *block.parameters()])
        results[impl] = (out, *grads)
    names = ["output", "input", *(n for n, _ in block.named_parameters())]
    for name, a, b in zip(names, results["sdpa"], results["naive"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # And both equal the formulas written out by hand.
    with torch.no_grad():
        torch.testing.assert_close(results["naive"][0], reference_block(block, x), rtol=1e-5, atol=1e-5)


def test_sdpa_equals_naive_in_the_whole_network_with_channels_last():
    torch.manual_seed(0)
    model = MFCNet(base_width=4).eval()
    random_weights(model)
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        sdpa = model(x.contiguous(memory_format=torch.channels_last))
        model.set_attention_impl("naive")
        naive = model(x)
    torch.testing.assert_close(sdpa, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "naive"])
def test_fresh_block_returns_exactly_twice_its_input(impl):
    block = ContextAggregation(32, attention_impl=impl)
    assert block.spatial.alpha.item() == 0.0 and block.channel.beta.item() == 0.0
    x = torch.randn(2, 32, 6, 5)
    assert torch.equal(block(x), 2 * x)  # X^s + X^c = X + X


def test_fresh_mfcnet_is_unet_with_doubled_encoder_features_on_the_decoder_path():
    # Pins where the blocks sit: the encoder is U-Net's, only the decoder sees CAB(E_l) = 2 E_l.
    torch.manual_seed(0)
    unet = UNet(base_width=4).eval()
    model = MFCNet(base_width=4, context_stages=(2, 5)).eval()
    missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
    assert all(k.startswith("context.") for k in missing) and not unexpected
    x = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        features = unet.encode(x)
        features[1], features[4] = 2 * features[1], 2 * features[4]
        expected = unet.decode(features)
        plain = unet(x)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert (out - plain).abs().max() > 1e-5  # the doubling is visible (10x the tolerance above)


def _block_parameters(channels: int, r: int = 8) -> int:
    d = max(1, channels // r)
    return 2 * channels * d + d + 2  # query conv (+ bias), key conv (no bias), alpha, beta


@pytest.mark.parametrize("width", [64, 16])
def test_parameter_budget_at_most_two_percent_over_unet(width):
    unet = count_parameters(build_model("unet", base_width=width))
    mfcnet = count_parameters(build_model("mfcnet", base_width=width))
    expected_extra = sum(_block_parameters(width * 2 ** (level - 1)) for level in (3, 4, 5))
    assert mfcnet - unet == expected_extra
    assert 0 < (mfcnet - unet) / unet <= 0.02


def make_model(seed: int = 0) -> MFCNet:
    torch.manual_seed(seed)
    model = MFCNet(base_width=4).eval()
    random_weights(model, seed)
    return model


def test_capture_does_not_change_the_output_and_records_every_block():
    model = make_model()
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        plain = model(x)
        with model.capture_context(query_points=[(3, 4)]) as records:
            captured = model(x)
        after = model(x)
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert sorted(records) == [3, 4, 5]
    for level, rec in records.items():
        h, w = 48 // 2 ** (level - 1), 64 // 2 ** (level - 1)  # 40 x 56 padded to 48 x 64
        c = 4 * 2 ** (level - 1)
        assert rec.input.shape == rec.output.shape == (2, c, h, w)
        assert rec.channel_attention.shape == (2, c, c)
        assert rec.spatial_rows.shape == (2, 1, h, w)
        assert rec.spatial_attention is None  # only with full_spatial=True
        block = model.context[str(level)]
        torch.testing.assert_close(rec.output, block(rec.input))
        assert rec.alpha == block.spatial.alpha.item() and rec.beta == block.channel.beta.item()
    assert model._capture is None


def test_attention_rows_sum_to_one_and_rows_match_the_full_map():
    model = make_model()
    x = torch.rand(1, 1, 32, 48)
    points = [(0, 0), (31, 47), (17, 9)]
    with torch.no_grad(), model.capture_context(query_points=points, full_spatial=True) as records:
        model(x)
    for rec in records.values():
        _, c, h, w = rec.input.shape
        n = h * w
        assert rec.spatial_attention.shape == (1, n, n)
        torch.testing.assert_close(rec.spatial_attention.sum(-1), torch.ones(1, n))
        torch.testing.assert_close(rec.channel_attention.sum(-1), torch.ones(1, c))
        assert (rec.spatial_attention >= 0).all() and (rec.channel_attention >= 0).all()
        for p, (by, bx) in enumerate(rec.block_points):
            row = rec.spatial_attention[0, by * w + bx].reshape(h, w)
            torch.testing.assert_close(rec.spatial_rows[0, p], row)


def test_query_points_map_to_block_resolution_and_rows_match_a_hand_computation():
    model = make_model()
    x = torch.rand(1, 1, 40, 56)
    with torch.no_grad(), model.capture_context(query_points=[(37, 21), (0, 55)]) as records:
        model(x)
    assert records[3].stride == 4 and records[3].block_points == [(9, 5), (0, 13)]
    assert records[4].block_points == [(4, 2), (0, 6)]
    assert records[5].stride == 16 and records[5].block_points == [(2, 1), (0, 3)]
    assert records[4].query_points == [(37, 21), (0, 55)]
    # The row of point (37, 21) at level 4 is softmax_i(q_j . k_i) at j = (4, 2).
    rec, block = records[4], model.context["4"]
    with torch.no_grad():
        q = block.spatial.query(rec.input)[0, :, 4, 2]  # (d,)
        k = block.spatial.key(rec.input)[0].flatten(1)  # (d, N)
        expected = torch.softmax(q @ k, dim=0).reshape(rec.input.shape[-2:])
    torch.testing.assert_close(rec.spatial_rows[0, 0], expected)


def test_capture_rejects_points_outside_the_image_and_nesting():
    model = make_model()
    with model.capture_context(query_points=[(40, 0)]):
        with pytest.raises(ValueError, match="query_points.*40 x 56"):
            model(torch.rand(1, 1, 40, 56))
    assert model._capture is None  # left cleanly despite the error
    with pytest.raises(ValueError, match="query_points"):
        with model.capture_context(query_points=[(-1, 3)]):
            pass
    with model.capture_context(), pytest.raises(RuntimeError, match="already active"):
        with model.capture_context():
            pass


def test_capture_gradients_flow_like_without_capture():
    model = make_model().train()
    x = torch.rand(2, 1, 32, 32)
    model(x).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with model.capture_context(query_points=[(5, 5)]):
        model(x).mean().backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_stays_close_to_float32():
    model = make_model()
    x = torch.rand(2, 1, 40, 56).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("stages", [(0,), (6,), (3, 3), "345", (2.5,), 4])
def test_invalid_context_stages_raise_value_error_naming_the_argument(stages):
    with pytest.raises(ValueError, match="context_stages"):
        build_model("mfcnet", base_width=4, context_stages=stages)


def test_context_stage_options_build_the_right_blocks():
    model = build_model("mfcnet", base_width=4, context_stages=[5, 1], reduction=2, qk_activation="relu")
    assert model.context_stages == (1, 5)
    assert sorted(model.context) == ["1", "5"]
    assert model.context["5"].spatial.query.out_channels == 64 // 2
    assert model.context["5"].spatial.key.bias is not None  # matters under ReLU
    plain = build_model("mfcnet", base_width=4, context_stages=())
    assert count_parameters(plain) == count_parameters(build_model("unet", base_width=4))
    assert plain(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize(
    ("option", "value"),
    [("attention_impl", "flash"), ("qk_activation", "gelu"), ("reduction", 0)],
)
def test_invalid_block_options_raise_value_error_naming_the_argument(option, value):
    with pytest.raises(ValueError, match=option):
        build_model("mfcnet", base_width=4, **{option: value})


def test_key_bias_would_be_redundant_under_the_identity():
    # Why the key conv has no bias when f is the identity: a key offset leaves M unchanged.
    torch.manual_seed(0)
    block = ContextAggregation(16)
    random_weights(block)
    assert block.spatial.key.bias is None
    x = torch.randn(1, 16, 5, 6)
    q, k, v = block.spatial.queries_keys_values(x)
    shifted = block.spatial.attend(q, k + torch.randn(k.shape[-1]), v)
    torch.testing.assert_close(shifted, block.spatial.attend(q, k, v), rtol=1e-5, atol=1e-5)
