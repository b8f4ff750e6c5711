"""``hepaseg demo`` end to end on the real LiTS-117 sample, with a tiny budget and tiny networks.

The budget (0.2 min, 32 px slices, width 4) is far too small to learn anything: these tests
check the wiring (every stage runs, every output lands inside DIR, the report is complete,
self-contained and honest about the split), not the scores.
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.errors import HepasegError
from hepaseg.experiments.demo import DEMO_MARKER, Z_SPLIT_WARNING, run_demo, write_z_block

TINY = {"minutes": 0.2, "size": 32, "width": 4}


class _Page(HTMLParser):
    """Rows of every table (cell texts), every img src and the text inside <strong>."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.strong: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._in_strong = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if attrs.get(k)]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "strong":
            self._in_strong = True
            self.strong.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "strong":
            self._in_strong = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_strong:
            self.strong[-1] += data


def _page(path: Path) -> tuple[str, _Page]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return text, page


@pytest.fixture(scope="module")
def demo(lits117_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "d"
    return run_demo(out, sample_dir=lits117_dir, progress=False, **TINY), out


@pytest.mark.realdata
def test_demo_report_is_complete_and_self_contained(demo) -> None:
    result, out = demo
    assert result.report == out / "report.html"
    text, page = _page(result.report)
    # Table 1 rows of both networks, with the numbers of their own evaluation files.
    for model in ("mfcnet", "unet"):
        row = next(r for r in page.rows if r and r[0] == model)
        saved = json.loads((out / "eval" / model / "metrics.json").read_text())["summary"]
        assert row[1] == f"{100 * saved['dice']:.2f}"
        assert row[2] == f"{saved['hausdorff']:.2f}"
        assert row[7] == f"{100 * saved['f1']:.2f}"
        assert row[8] == f"{result.params[model]:,}"
    # The z-split warning, in bold.
    assert any("single-patient z-split" in s and "not a patient-level evaluation" in s for s in page.strong)
    assert Z_SPLIT_WARNING in page.strong
    # Figures embedded as PNG data URIs (per-slice Dice, curves, overlay, explanation), no links.
    pngs = [src for src in page.images if src.startswith("data:image/png;base64,")]
    assert len(pngs) >= 4
    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG") for src in pngs)
    assert page.links == page.images
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.IGNORECASE)
    # The commands that reproduce each step, with the real paths.
    for verb in ("prepare", "train", "evaluate", "predict", "explain"):
        assert re.search(rf"hepaseg {verb} .*{re.escape(str(out))}", text), verb
    assert "--z-split 0.6,0.2,0.2" in text and "--model unet" in text


@pytest.mark.realdata
def test_demo_outputs_stay_in_out_dir_with_correct_geometry(demo, lits117_dir: Path) -> None:
    result, out = demo
    assert (out / DEMO_MARKER).is_file()
    for path in result.paths.values():
        assert Path(path).is_file() and out in Path(path).parents
    mask_file = out / "predict" / "tumor_mask.nii.gz"
    assert mask_file.is_file()
    summary = json.loads((out / "demo.json").read_text())
    assert summary["demo_z_split"] is True and set(summary["table1"]) == {"mfcnet", "unet"}
    # The held-out block: the test slices of the manifest, voxel for voxel, with the origin moved.
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    test_z = next(c for c in manifest["cases"] if c["split"] == "test")["kept_slices"]
    z0, z1 = min(test_z), max(test_z) + 1
    full = nib.load(out / "sample" / "volume-117.nii.gz")
    full_label = nib.load(out / "sample" / "segmentation-117.nii.gz")
    block = nib.load(out / "heldout" / "volume-117.nii.gz")
    block_label = nib.load(out / "heldout" / "segmentation-117.nii.gz")
    np.testing.assert_array_equal(np.asarray(block.dataobj), np.asarray(full.dataobj)[:, :, z0:z1])
    np.testing.assert_array_equal(np.asarray(block_label.dataobj), np.asarray(full_label.dataobj)[:, :, z0:z1])
    # Voxel (0, 0, 0) of the block is voxel (0, 0, z0) of the full scan in world mm.
    np.testing.assert_allclose(block.affine @ [0, 0, 0, 1], full.affine @ [0, 0, z0, 1])
    mask = nib.load(mask_file)
    assert mask.shape == block.shape
    np.testing.assert_allclose(mask.affine, block.affine)
    # The volume metrics in the report are the prediction's, on the held-out block only.
    pred = np.asarray(mask.dataobj) > 0
    target = np.asarray(block_label.dataobj) == 2
    assert result.volume_metrics["pred_voxels"] == int(pred.sum())
    assert result.volume_metrics["target_voxels"] == int(target.sum())


@pytest.mark.realdata
def test_demo_cli_replaces_an_earlier_demo(demo, lits117_dir: Path) -> None:
    _, out = demo
    stale = out / "stale.txt"
    stale.write_text("from the earlier demo")
    args = ["demo", "--out", str(out), "--sample-dir", str(lits117_dir), "--minutes", str(TINY["minutes"]),
            "--size", str(TINY["size"]), "--width", str(TINY["width"]), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not stale.exists()  # the earlier demo's folder was replaced as a whole
    assert (out / "report.html").is_file()
    assert "report.html" in result.output.replace("\n", "")
    assert "mfcnet" in result.output and "unet" in result.output


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (tmp_path / "sample").mkdir()
    with pytest.raises(HepasegError, match=f"no {re.escape(DEMO_MARKER)} marker"):
        run_demo(out, sample_dir=tmp_path / "sample", **TINY)
    assert (out / "thesis.tex").read_text() == "precious"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--minutes", "0.1"])
    assert result.exit_code == 1
    assert "error:" in result.output and "thesis.tex" in result.output
    assert (out / "thesis.tex").is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"minutes": 0}, "--minutes"), ({"minutes": -1.0}, "--minutes"), ({"size": 8}, "size"),
     ({"width": 0}, "width")],
)
def test_demo_rejects_bad_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(HepasegError, match=match):
        run_demo(tmp_path / "d", **{**TINY, **kwargs})
    assert not (tmp_path / "d").exists()  # nothing written before the options are checked


def test_demo_sample_dir_must_hold_the_sample(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(HepasegError, match="img_117.mrc"):
        run_demo(tmp_path / "d", sample_dir=tmp_path / "empty", **TINY)
    assert not (tmp_path / "d").exists()
    with pytest.raises(HepasegError, match="--out is inside the input"):  # never written into the sample folder
        run_demo(tmp_path / "empty" / "d", sample_dir=tmp_path / "empty", **TINY)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.realdata
def test_write_z_block_range_checks(demo, tmp_path: Path) -> None:
    _, out = demo
    volume = out / "sample" / "volume-117.nii.gz"
    with pytest.raises(HepasegError, match="out of range"):
        write_z_block(volume, tmp_path / "b", 100, 200)
    with pytest.raises(HepasegError, match="out of range"):
        write_z_block(volume, tmp_path / "b", 5, 5)
    path = write_z_block(volume, tmp_path / "b", 0, 3)
    assert path.name == "volume-117.nii.gz" and nib.load(path).shape == (128, 128, 3)


def test_default_sample_source_looks_beside_the_checkout(monkeypatch) -> None:
    # The module moved to hepaseg/experiments/ (one folder deeper): its path arithmetic must still find
    # ../shared/data/lits117 beside the checkout. The checkout is found here from the package root instead.
    import hepaseg
    from hepaseg.experiments.demo import default_sample_source

    monkeypatch.delenv("HEPASEG_SHARED_DATA", raising=False)
    beside = Path(hepaseg.__file__).resolve().parents[2].parent / "shared" / "data" / "lits117"
    assert default_sample_source() == (beside if (beside / "img_117.mrc").is_file() else None)
    monkeypatch.setenv("HEPASEG_SHARED_DATA", "/nonexistent-hepaseg-data")
    assert default_sample_source() == (beside if (beside / "img_117.mrc").is_file() else None)
