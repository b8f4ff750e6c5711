"""Shared tests for every registered network (parametrised over ``list_models()``).

Tiny widths (4) and small sizes keep the whole file fast on a shared CPU. Sizes are
chosen so that every model works after its own padding: CE-Net (stride 32) reaches a
1 x 1 bottleneck at 32 x 32, where BatchNorm cannot train on a batch of one, so the
batch-one case uses 33 x 47 (padded to 64 x 64).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.models import build_model, count_parameters, list_models
from hepaseg.models.registry import model_info
from hepaseg.models.summary import model_summaries

MODELS = list_models()
WIDTH = 4
# (batch, height, width): odd, non-square, batch one and two.
SIZES = [(1, 33, 47), (2, 32, 32), (2, 40, 56)]


def make(name: str, *, seed: int = 0, in_channels: int = 3, num_classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, in_channels=in_channels, num_classes=num_classes, base_width=WIDTH)


def sample(batch: int, height: int, width: int, channels: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, height, width, generator=generator)


def test_registry_has_the_ten_networks_with_mfcnet_first():
    assert MODELS[0] == "mfcnet"
    assert "unet" in MODELS
    assert len(MODELS) == len(set(MODELS))


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_train_and_eval(name):
    model = make(name)
    for batch, h, w in SIZES:
        x = sample(batch, h, w)
        model.train()
        out = model(x)
        assert out.shape == (batch, 2, h, w), f"{name} train {tuple(x.shape)}"
        assert out.dtype == torch.float32
        model.eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (batch, 2, h, w), f"{name} eval {tuple(x.shape)}"


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    model = make(name).train()
    model(sample(2, 40, 56)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients: {bad}"


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_output_other_seed_other_output(name):
    x = sample(2, 32, 32)
    with torch.no_grad():
        a = make(name, seed=0).eval()(x)
        b = make(name, seed=0).eval()(x)
        c = make(name, seed=1).eval()(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", MODELS)
def test_eval_output_of_a_sample_does_not_depend_on_the_batch(name):
    model = make(name)
    model.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from (0, 1)
        model(sample(2, 40, 56, seed=5))
    model.eval()
    x = sample(3, 40, 56)
    with torch.no_grad():
        alone = model(x[:1])
        batched = model(x)[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_matches_contiguous(name):
    model = make(name).eval()
    x = sample(2, 40, 56)
    with torch.no_grad():
        ref = model(x)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_on_cpu_runs_and_is_finite(name):
    model = make(name).eval()
    x = sample(2, 40, 56).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 2, 40, 56)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(40, 56), (3, 40, 56), (1, 3, 1, 40, 56)], ids=["2d", "3d", "5d"])
def test_wrong_rank_raises_value_error(name, shape):
    model = make(name)
    with pytest.raises(ValueError, match=r"4D tensor \(N, C, H, W\)"):
        model(torch.zeros(shape))


@pytest.mark.parametrize("name", MODELS)
def test_wrong_channel_count_raises_value_error(name):
    model = make(name)
    with pytest.raises(ValueError, match=r"in_channels=3.*1 channels"):
        model(torch.zeros(1, 1, 32, 32))


def test_unknown_model_lists_valid_names():
    with pytest.raises(HepasegError, match="unknown model 'vnet'") as info:
        build_model("vnet")
    for name in MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("base_width", [0, -4])
def test_non_positive_base_width_raises(name, base_width):
    with pytest.raises(HepasegError, match="base_width"):
        build_model(name, base_width=base_width)
    # The factories validate on their own too (they are public).
    with pytest.raises(ValueError, match="base_width"):
        model_info(name).factory(base_width=base_width)


def test_unknown_option_becomes_hepaseg_error():
    with pytest.raises(HepasegError, match="unet"):
        build_model("unet", base_width=WIDTH, not_an_option=3)


@pytest.mark.parametrize("name", ["unet", "mfcnet"])
def test_large_slice_pads_and_crops(name):
    # 500 x 512 pads to 512 x 512; at level 3 MFCNet attends over N = 128 * 128 positions.
    torch.manual_seed(0)
    model = build_model(name, base_width=WIDTH).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 500, 512))
    assert out.shape == (1, 1, 500, 512)
    assert torch.isfinite(out).all()


def _double_conv(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out  # two bias-free 3x3 convs + two BNs


def _unet_parameters(in_channels: int, num_classes: int, w: int) -> int:
    widths = [w * 2**i for i in range(5)]
    total = _double_conv(in_channels, w) + sum(_double_conv(a, b) for a, b in zip(widths, widths[1:]))
    for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]):  # (16w, 8w), ..., (2w, w)
        total += 4 * c_in * (c_in // 2) + c_in // 2  # 2x2 transposed conv with bias
        total += _double_conv(c_in // 2 + c_out, c_out)
    return total + w * num_classes + num_classes


@pytest.mark.parametrize(("w", "in_channels", "num_classes"), [(64, 1, 1), (16, 3, 2)])
def test_unet_parameter_count_matches_hand_count(w, in_channels, num_classes):
    model = build_model("unet", in_channels=in_channels, num_classes=num_classes, base_width=w)
    assert count_parameters(model) == _unet_parameters(in_channels, num_classes, w)
    if w == 64:
        assert count_parameters(model) == 31_036_481  # ~31 M, Ronneberger et al. with BN


def test_models_cli_json_lists_every_model_with_its_parameter_count():
    result = CliRunner().invoke(app, ["models", "--json", "--width", "8"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == MODELS
    for row in rows:
        assert isinstance(row["params"], int) and row["params"] > 0
        assert row["params"] == count_parameters(build_model(row["name"], base_width=8))
        assert row["paper"] and row["module"]


def test_models_cli_table_and_bad_width():
    result = CliRunner().invoke(app, ["models", "--width", "4"])
    assert result.exit_code == 0, result.output
    assert "mfcnet" in result.stdout and "params" in result.stdout
    result = CliRunner().invoke(app, ["models", "--width", "0"])
    assert result.exit_code == 1
    assert "width must be a positive integer" in result.output


def test_model_summaries_rejects_bad_width():
    with pytest.raises(HepasegError, match="width"):
        model_summaries(width=0)
