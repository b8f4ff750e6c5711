"""``hepaseg explain``: the figure, its arrays against naive re-computations, query rules, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.errors import HepasegError
from hepaseg.inference import preprocess_slices
from hepaseg.io import read_volume
from hepaseg.models import build_model
from hepaseg.viz import default_queries, explain_slice, map_to_input_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = 32  # network input; the phantom slices are 64 x 64, so queries are mapped 2:1
DATA_OPTIONS = {"window": [-200.0, 250.0], "size": SIZE, "context_slices": 1, "slices": "all", "target": "tumor"}


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """A labelled phantom CT (10 x 64 x 64) as LiTS NIfTI files."""
    root = tmp_path_factory.mktemp("case")
    return write_phantom_dataset(root, "lits", n_cases=1, shape=(10, 64, 64), seed=1, n_tumors=2)[0]


@pytest.fixture(scope="module")
def volume(case):
    return read_volume(case)


@pytest.fixture(scope="module")
def tumour_slice(volume) -> int:
    areas = (volume.label == 2).sum(axis=(1, 2))
    return int(np.argmax(areas))


def write_checkpoint(path: Path, volume, *, model: str = "mfcnet", alpha: float = 0.0, beta: float = 0.0) -> Path:
    """A checkpoint in the training format, BatchNorm statistics calibrated on the phantom.

    Without calibration the untrained encoder features are ~1e-3 and every attention row is
    uniform; calibrated, they have data-like scale and the rows differ between queries.
    """
    torch.manual_seed(0)
    net = build_model(model, in_channels=3, num_classes=1, base_width=4)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
    net.train()
    with torch.no_grad():
        net(preprocess_slices(volume.image, np.arange(volume.shape[0]), DATA_OPTIONS))
        for block in getattr(net, "context", {}).values():
            block.spatial.alpha.fill_(alpha)
            block.channel.beta.fill_(beta)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hepaseg": {"version": "0.1.0", "model": model, "model_options": {}, "in_channels": 3,
                        "num_classes": 1, "base_width": 4, "data_options": DATA_OPTIONS, "metrics": {},
                        "config": {}},
        },
        path,
    )
    return path


def _naive_block(model, x: torch.Tensor, stage: int, points):
    """Block input X, output and attention rows by the paper's formulas (explicit N x N, float64)."""
    block = model.context[str(stage)]
    with torch.no_grad():
        feat = model.encode(x)[stage - 1].double()  # (1, C, h, w)
        _, c, h, w = feat.shape
        f = feat.flatten(2)[0]  # (C, N)
        q = torch.einsum("dc,cn->dn", block.spatial.query.weight[:, :, 0, 0].double(), f)
        q = q + block.spatial.query.bias.double()[:, None]
        k = torch.einsum("dc,cn->dn", block.spatial.key.weight[:, :, 0, 0].double(), f)
        m = torch.softmax(q.T @ k, dim=-1)  # (N, N): row j = weights of every position for j
        a = torch.softmax(f @ f.T, dim=-1)  # (C, C)
        alpha, beta = float(block.spatial.alpha), float(block.channel.beta)
        out = (alpha * (f @ m.T) + f) + (beta * (a @ f) + f)  # X^s + X^c, (C, N)
        rows = torch.stack([m[y * w + x_] for y, x_ in points]).reshape(len(points), h, w)
    return feat[0].mean(0).numpy(), out.reshape(c, h, w).mean(0).numpy(), rows.numpy()


def test_mfcnet_figure_arrays_match_naive_recomputation(case, volume, tumour_slice, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", volume, alpha=0.7, beta=0.3)
    result = explain_slice(ckpt, case, tumour_slice, tmp_path / "figs" / "fig.png")

    assert result.path.read_bytes()[:8] == PNG_SIGNATURE
    assert result.stages == [3, 4, 5] and result.notes == []
    assert [b["shape"] for b in result.blocks] == [(8, 8, 16), (4, 4, 32), (2, 2, 64)]
    assert result.arrays["input"].shape == result.arrays["probability"].shape == (SIZE, SIZE)

    model = build_model("mfcnet", in_channels=3, num_classes=1, base_width=4)
    model.load_state_dict({k[4:]: v for k, v in torch.load(ckpt)["state_dict"].items()})
    model.eval()
    x = preprocess_slices(volume.image, [tumour_slice], DATA_OPTIONS)
    for block in result.blocks:
        stage = block["stage"]
        attention = result.arrays[f"stage{stage}_attention"]
        assert attention.shape == (2, *block["shape"][:2])
        assert (attention >= 0).all()
        np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-5)
        before, after, rows = _naive_block(model, x, stage, block["block_points"])
        np.testing.assert_allclose(result.arrays[f"stage{stage}_before"], before, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.arrays[f"stage{stage}_after"], after, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(attention, rows, rtol=1e-4, atol=1e-7)
    # The two queries look at different things at the finest block.
    assert not np.allclose(result.arrays["stage3_attention"][0], result.arrays["stage3_attention"][1])


def test_before_and_after_differ_only_when_alpha_or_beta_is_nonzero(case, volume, tumour_slice, tmp_path):
    zero = explain_slice(write_checkpoint(tmp_path / "z.ckpt", volume), case, tumour_slice, tmp_path / "z.png")
    on = explain_slice(write_checkpoint(tmp_path / "a.ckpt", volume, alpha=1.0, beta=1.0), case, tumour_slice,
                       tmp_path / "a.png")
    for stage in (3, 4, 5):
        before, after = zero.arrays[f"stage{stage}_before"], zero.arrays[f"stage{stage}_after"]
        # A block with alpha = beta = 0 returns X^s + X^c = 2 X exactly (the channel means may be
        # summed in another order: float32 rounding only).
        np.testing.assert_allclose(after, 2 * before, rtol=1e-6, atol=0)
        assert zero.blocks[stage - 3]["alpha"] == zero.blocks[stage - 3]["beta"] == 0.0
        assert not np.allclose(on.arrays[f"stage{stage}_after"], 2 * on.arrays[f"stage{stage}_before"], rtol=1e-3)


def test_default_queries_land_in_tumour_and_in_background(case, volume, tumour_slice, tmp_path):
    result = explain_slice(write_checkpoint(tmp_path / "m.ckpt", volume), case, tumour_slice, tmp_path / "f.png")
    assert result.query_names == ["tumour", "background"]
    (ty, tx), (by, bx) = result.queries
    label = volume.label[tumour_slice]
    assert label[ty, tx] == 2
    assert label[by, bx] != 2 and volume.image[tumour_slice, by, bx] > -500  # inside the body
    distance_to_tumour = ndimage.distance_transform_edt(label != 2)
    assert distance_to_tumour[by, bx] > 10  # pixels; the phantom body is ~54 px wide
    assert result.input_queries == [map_to_input_grid(q, (64, 64), SIZE) for q in result.queries]
    assert result.arrays["ground_truth"].any()


def test_default_queries_by_hand():
    image = np.full((40, 100), -1000.0)
    image[5:35, 5:95] = 40.0  # body: rows 5..34, columns 5..94
    yy, xx = np.mgrid[:40, :100]
    tumour = (yy - 20) ** 2 + (xx - 20) ** 2 <= 9
    probability = np.zeros((40, 100))
    (tq, bq), rules = default_queries(image, probability, tumour)
    assert tq == (20, 20) and "labelled tumour" in rules[0]
    # Farthest from tumour, air and edge: the best possible min(distance to tumour, distance to air) is
    # 15 px (row 20 is 15 rows from the air at row 35); check the point by brute force.
    by, bx = bq
    air = np.argwhere(image <= -500)
    to_air = np.sqrt(((air - [by, bx]) ** 2).sum(1)).min()
    to_tumour = np.sqrt(((np.argwhere(tumour) - [by, bx]) ** 2).sum(1)).min()
    assert image[by, bx] > -500 and min(to_air, to_tumour) == pytest.approx(15.0)
    # Unlabelled: the most probable pixel is the tumour query.
    probability[10, 70] = 0.9
    (tq, bq), rules = default_queries(image, probability, None)
    assert tq == (10, 70) and "highest predicted" in rules[0] and "no labels" in rules[0]


def test_background_query_keeps_away_from_the_image_edge_of_a_cropped_scan():
    # A crop with no air around the body (like the LiTS-117 sample): the image edge bounds the
    # body, so the query must not sit on it (it did when only air counted).
    image = np.full((40, 100), 40.0)
    yy, xx = np.mgrid[:40, :100]
    tumour = (yy - 20) ** 2 + (xx - 20) ** 2 <= 9
    (_, (by, bx)), rules = default_queries(image, np.zeros((40, 100)), tumour)
    to_edge = min(by + 1, 40 - by, bx + 1, 100 - bx)  # distance to the padded border
    to_tumour = np.sqrt(((np.argwhere(tumour) - [by, bx]) ** 2).sum(1)).min()
    assert min(to_edge, to_tumour) >= 19.0 and "image edge" in rules[1]


@pytest.mark.parametrize(
    ("point", "hw", "size", "expected"),
    [((0, 0), (512, 512), 224, (0, 0)), ((511, 511), (512, 512), 224, (223, 223)),
     ((256, 100), (512, 512), 224, (112, 43)), ((63, 1), (64, 64), 32, (31, 0)), ((5, 5), (10, 20), 10, (5, 2))],
)
def test_query_mapping_by_hand(point, hw, size, expected):
    # floor((v + 0.5) * size / n): 256 -> floor(256.5 * 0.4375) = 112, 100 -> floor(100.5 * 0.4375) = 43.
    assert map_to_input_grid(point, hw, size) == expected


def test_given_queries_are_mapped_to_each_block(case, volume, tmp_path):
    result = explain_slice(write_checkpoint(tmp_path / "m.ckpt", volume), case, 4, tmp_path / "f.png",
                           queries=[(63, 0), (10, 41)])
    assert result.query_names == ["q1", "q2"]
    assert result.input_queries == [(31, 0), (5, 20)]
    strides = {b["stage"]: b["stride"] for b in result.blocks}
    assert strides == {3: 4, 4: 8, 5: 16}
    for b in result.blocks:
        assert b["block_points"] == [(31 // b["stride"], 0), (5 // b["stride"], 20 // b["stride"])]


def test_other_networks_say_what_does_not_apply(case, volume, tumour_slice, tmp_path):
    ckpt = write_checkpoint(tmp_path / "u.ckpt", volume, model="unet")
    result = explain_slice(ckpt, case, tumour_slice, tmp_path / "u.png")
    assert result.notes[0] == (
        "unet has no context aggregation block: feature maps before/after and attention maps do not apply"
    )
    assert result.stages == [] and not any(k.startswith("stage") for k in result.arrays)
    assert set(result.arrays) == {"input", "probability", "ground_truth"}
    assert result.path.read_bytes()[:8] == PNG_SIGNATURE


def test_errors(case, volume, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", volume)
    for z in (10, -1):
        with pytest.raises(HepasegError, match=rf"slice {z} is out of range .* 0 <= slice < 10 .*10 axial slices"):
            explain_slice(ckpt, case, z, tmp_path / "f.png")
    with pytest.raises(HepasegError, match=r"--query: \(64, 3\) is not a pixel of the 64 x 64 slice"):
        explain_slice(ckpt, case, 3, tmp_path / "f.png", queries=[(64, 3)])
    with pytest.raises(HepasegError, match=r"--out: .*expected a \.png"):
        explain_slice(ckpt, case, 3, tmp_path / "f.jpg")
    with pytest.raises(HepasegError, match="checkpoint not found"):
        explain_slice(tmp_path / "missing.ckpt", case, 3, tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_cli_explain(case, volume, tumour_slice, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", volume, alpha=0.5)
    out = tmp_path / "cli.png"
    runner = CliRunner()
    res = runner.invoke(app, ["explain", "--checkpoint", str(ckpt), "--input", str(case), "--slice",
                              str(tumour_slice), "--out", str(out), "--query", "30,20", "--query", "5,5"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert "wrote" in res.output and "q2" in res.output and "1.0000" in res.output
    res = runner.invoke(app, ["explain", "--checkpoint", str(ckpt), "--input", str(case), "--slice", "99",
                              "--out", str(out)])
    assert res.exit_code == 1 and "slice 99 is out of range" in res.output
    res = runner.invoke(app, ["explain", "--checkpoint", str(ckpt), "--input", str(case), "--slice", "1",
                              "--out", str(out), "--query", "3;4"])
    assert res.exit_code == 1 and "--query: expected Y,X" in res.output
