"""MFCNet and its context aggregation block: chunked and SDPA vs naive vs the slides' formulas written
out (both channel forms, outputs and gradients), placement, the initial state, the parameter budget,
the capture API and option checks."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from hepaseg.models import build_model, context, count_parameters
from hepaseg.models.context import ChannelContext, ContextAggregation
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
    """The slides' formulas written out with einsum, independent of the module's code paths.

    Differentiable in ``x`` and in the block's parameters (the gradient reference too).
    """
    b, c, h, w = x.shape
    f = x.reshape(b, c, h * w)  # (B, C, N)
    sp = block.spatial
    q = torch.einsum("oc,bcn->bno", sp.query.weight[:, :, 0, 0], f) + sp.query.bias
    k = torch.einsum("oc,bcn->bno", sp.key.weight[:, :, 0, 0], f)
    if sp.key.bias is not None:
        k = k + sp.key.bias
    q, k = sp.activation(q), sp.activation(k)
    m = torch.softmax(torch.einsum("bjd,bid->bji", q, k), dim=-1)  # M[j, i]: position i for position j
    spatial = torch.einsum("bji,bci->bcj", m, f)  # X'_j = sum_i M[j, i] F_i
    a = torch.softmax(torch.einsum("bcn,bdn->bcd", f, f), dim=-1)  # A[c, d], rows sum to 1
    if block.channel.form == "danet":
        channel = torch.einsum("bcd,bdn->bcn", a, f)  # refined c = sum_d A[c, d] F_d  (A F)
    else:
        channel = torch.einsum("bdc,bdn->bcn", a, f)  # X' = F M with F (N, C): sum_d F_d A[d, c]
    x_s = sp.alpha * spatial + f
    x_c = block.channel.beta * channel + f
    return (x_s + x_c).reshape(b, c, h, w)


def outputs_and_gradients(fn, x: torch.Tensor, params: list[torch.Tensor], weight: torch.Tensor):
    out = fn(x)
    return (out, *torch.autograd.grad((out * weight).sum(), [x, *params]))


# C = 16, 24: the query width d = C // 8 divides C; C = 44 (d = 5) exercises the zero-padded SDPA head.
# 300 > 256: Q and K padded to 256-wide SDPA heads, F split into 2 heads with zero-padded channels.
@pytest.mark.parametrize("channels", [16, 24, 44, 300])
@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
def test_fused_implementations_equal_naive_outputs_and_gradients(channels, impl):
    torch.manual_seed(0)
    block = ContextAggregation(channels)
    random_weights(block, seed=channels)
    x = torch.randn(2, channels, 7, 9, requires_grad=True)
    weight = torch.randn(2, channels, 7, 9)  # a loss whose gradient differs everywhere
    params = list(block.parameters())
    results = {}
    for name in (impl, "naive"):
        block.attention_impl = name
        results[name] = outputs_and_gradients(block, x, params, weight)
    names = ["output", "input", *(n for n, _ in block.named_parameters())]
    for name, a, b in zip(names, results[impl], results["naive"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# Both channel forms, both f, NCHW and channels_last input: every implementation against the slides'
# formulas written out with einsum, outputs and the gradients of the input and of every parameter.
@pytest.mark.parametrize("impl", ["chunked", "sdpa", "naive"])
@pytest.mark.parametrize("form", ["danet", "slides"])
@pytest.mark.parametrize(("activation", "channels_last"), [("identity", False), ("relu", True)])
def test_every_implementation_matches_the_reference_formulas(impl, form, activation, channels_last):
    torch.manual_seed(1)
    block = ContextAggregation(24, channel_form=form, qk_activation=activation, attention_impl=impl)
    random_weights(block, seed=3)
    x = torch.randn(2, 24, 6, 5)
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(2, 24, 6, 5)
    params = list(block.parameters())
    got = outputs_and_gradients(block, x, params, weight)
    expected = outputs_and_gradients(lambda t: reference_block(block, t), x, params, weight)
    names = ["output", "input", *(n for n, _ in block.named_parameters())]
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The output keeps the input's memory format (no layout copy for the next layer).
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=memory_format)


def test_the_two_channel_forms_differ():
    # A = softmax_rows(F^T F) is not symmetric, so F A (slides) and F A^T (DANet) differ.
    torch.manual_seed(0)
    x = 0.2 * torch.randn(1, 8, 4, 4)  # small energies: a spread-out A, not the near-identity of large ones
    a = ChannelContext.attention(x)[0]
    assert not torch.allclose(a, a.T, atol=1e-3)
    danet, slides = ChannelContext("danet"), ChannelContext("slides")
    with torch.no_grad():
        danet.beta.fill_(1.0)
        slides.beta.fill_(1.0)
        assert (danet(x) - slides(x)).abs().max() > 1e-2


def test_chunked_attention_splits_rows_and_batches_exactly(monkeypatch):
    # The default block budget covers the small test inputs in one block; a tiny budget forces
    # many row blocks (N = 63 > budget // N) and, for a small N, several samples per block.
    q, k = torch.randn(3, 63, 5, dtype=torch.float64), torch.randn(3, 63, 5, dtype=torch.float64)
    v = torch.randn(3, 63, 11, dtype=torch.float64)
    expected = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    for budget in (200, 63 * 63 * 2):  # 3 rows per block; 2 whole samples per block
        monkeypatch.setattr(context, "_CHUNK_ELEMENTS", budget)
        blocks = context._blocks(3, 63)
        assert len(blocks) == (21 * 3 if budget == 200 else 2)
        torch.testing.assert_close(context.chunked_attention(q, k, v), expected.float(), rtol=1e-5, atol=1e-5)
        # The hand-written backward against autograd through the explicit formula.
        for t in (q, k, v):
            t.requires_grad_(True)
        weight = torch.randn(3, 63, 11, dtype=torch.float64)
        got = torch.autograd.grad((context.chunked_attention(q, k, v) * weight).sum(), (q, k, v))
        ref = torch.autograd.grad(((torch.softmax(q @ k.transpose(1, 2), -1) @ v) * weight).sum(), (q, k, v))
        for a, b in zip(got, ref):
            assert a.dtype == torch.float64  # gradients come back in the inputs' dtype
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for t in (q, k, v):
            t.requires_grad_(False)
    # And against finite differences, on a small case split into 6 row blocks (float32 inside: loose eps).
    monkeypatch.setattr(context, "_CHUNK_ELEMENTS", 30)
    small = [torch.randn(1, 12, n, dtype=torch.float64, requires_grad=True) for n in (3, 3, 4)]
    assert torch.autograd.gradcheck(context.chunked_attention, small, eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
@pytest.mark.parametrize("placement", ["skip", "inline"])
def test_fused_equal_naive_in_the_whole_network_with_channels_last(impl, placement):
    torch.manual_seed(0)
    model = MFCNet(base_width=4, placement=placement, attention_impl=impl).eval()
    random_weights(model)
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        fused = model(x.contiguous(memory_format=torch.channels_last))
        model.set_attention_impl("naive")
        naive = model(x)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)


def test_auto_is_chunked_on_cpu_and_sdpa_while_tracing():
    block = ContextAggregation(16)
    assert block.attention_impl == "auto"
    assert block.spatial.resolved_impl(torch.device("cpu")) == "chunked"
    assert block.spatial.resolved_impl(torch.device("cuda")) == "sdpa"
    for native, bf16_impl in ((False, "chunked"), (True, "sdpa")):  # bf16 on CPUs with and without bf16 units
        with mock.patch.object(context, "cpu_has_native_bf16", lambda native=native: native):
            assert block.spatial.resolved_impl(torch.device("cpu"), torch.bfloat16) == bf16_impl
            assert block.spatial.resolved_impl(torch.device("cpu"), torch.float32) == "chunked"
    seen = []
    original = context._padded_sdpa

    def spy(q, k, v):
        seen.append(torch.jit.is_tracing())
        return original(q, k, v)

    context._padded_sdpa = spy
    try:
        torch.jit.trace(block.eval(), torch.randn(1, 16, 4, 4), check_trace=False)
    finally:
        context._padded_sdpa = original
    assert seen == [True]  # one fused op in the traced graph, not an unrolled Python loop


@pytest.mark.parametrize("impl", ["chunked", "sdpa", "naive"])
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


def test_fresh_inline_mfcnet_is_unet_with_each_refined_level_feeding_the_next():
    # Pins "inline": level l + 1 is computed from CAB(E_l) = 2 E_l, and the decoder sees the refined levels.
    torch.manual_seed(0)
    unet = UNet(base_width=4).eval()
    model = MFCNet(base_width=4, context_stages=(2, 5), placement="inline").eval()
    model.load_state_dict(unet.state_dict(), strict=False)
    x = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        features, h = [], x
        for level, down in enumerate(unet.encoder, start=1):
            h = down(h)
            h = 2 * h if level in (2, 5) else h
            features.append(h)
        expected = unet.decode(features)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # With context in the blocks: inline, the level-5 block's input is computed from the refined
    # level 2; as skips, from the raw one.
    random_weights(model)
    skip = MFCNet(base_width=4, context_stages=(2, 5)).eval()
    skip.load_state_dict(model.state_dict())
    with torch.no_grad():
        for net, source in ((model, "output"), (skip, "input")):
            with net.capture_context() as records:
                net(x)
            h = getattr(records[2], source)
            for down in net.encoder[2:]:
                h = down(h)
            torch.testing.assert_close(records[5].input, h, rtol=1e-6, atol=1e-6)
        assert (records[2].output - records[2].input * 2).abs().max() > 1e-3  # the block did refine


def test_architecture_options_are_resolved_and_rebuild_the_same_network():
    model = build_model("mfcnet", base_width=4, channel_form="slides", context_stages=[5, 3])
    options = model.architecture_options()
    assert options == {"context_stages": [3, 5], "placement": "skip", "channel_form": "slides", "reduction": 8,
                       "qk_activation": "identity"}
    rebuilt = build_model("mfcnet", base_width=4, **options)
    assert rebuilt.architecture_options() == options
    assert build_model("unet", base_width=4).architecture_options() == {}


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
    [("attention_impl", "flash"), ("qk_activation", "gelu"), ("reduction", 0), ("channel_form", "cbam"),
     ("placement", "dense")],
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
