"""The self-contained HTML report writer (hepaseg.viz.report) and the training-curves reader."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from hepaseg.errors import HepasegError
from hepaseg.evaluation import table1_markdown
from hepaseg.viz.curves import TrainingLog, plot_slice_dice, plot_training_curves, read_training_log
from hepaseg.viz.report import ReportContent, ReportFigure, png_data_uri, render_report, write_report


def _png(path: Path, value: int = 0) -> Path:
    """A real (tiny) PNG written with matplotlib, different bytes for different ``value``."""
    import matplotlib.image

    img = np.full((4, 6, 3), value, dtype=np.uint8)
    matplotlib.image.imsave(path, img)
    return path


SUMMARY = {
    "dice": 0.8125, "hausdorff": 12.5, "jaccard": 0.6875, "precision": 0.75,
    "recall": 0.9, "specificity": 0.99875, "f1": 2 * 0.75 * 0.9 / (0.75 + 0.9),
}
# Hand-computed cells: fractions in percent with 2 decimals, Hausdorff in pixels.
EXPECTED_CELLS = ["81.25", "12.50", "68.75", "75.00", "90.00", "99.88", "81.82"]


class _Cells(HTMLParser):
    """Collects the text of every table row as a list of cell strings, and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Cells:
    parser = _Cells()
    parser.feed(text)
    return parser


@pytest.fixture()
def content(tmp_path: Path) -> ReportContent:
    return ReportContent(
        title="demo <b>report</b>",
        subtitle="case <script>alert(1)</script>",
        warning="single-patient z-split",
        table1={"mfcnet": SUMMARY, "unet": {**SUMMARY, "dice": 0.5}},
        table1_extra={"Params": {"mfcnet": 1234567, "unet": 1200000}, "ms/slice": {"mfcnet": 3.14159}},
        slice_dice=ReportFigure(path=_png(tmp_path / "slice_dice.png", 5), title="Dice per slice"),
        curves=ReportFigure(path=_png(tmp_path / "curves.png", 10), title="Training curves"),
        volume_metrics={"dice": 0.5, "hd95": 3.25, "pred_voxels": 12345},
        overlay=ReportFigure(path=_png(tmp_path / "overlay.png", 20), title="Overlay", caption="red & green"),
        lesions=[{"id": 1, "voxels": 1500, "volume_ml": 1.5, "centroid_mm": [1.0, 2.0, 3.0],
                  "max_axial_diameter_mm": 14.04, "first_slice": 3, "last_slice": 9}],
        explanation=ReportFigure(path=_png(tmp_path / "explain.png", 30), title="Explanation"),
        timings={"train <mfcnet>": 61.26},
        commands=[("train", "hepaseg train --data 'a b' --model mfcnet --out x&y")],
        details={"case": "lits-117"},
    )


def test_table1_cells_match_hand_computed_values_and_markdown(content: ReportContent) -> None:
    rows = _parse(render_report(content)).rows
    header = next(r for r in rows if r and r[0] == "Method")
    assert header[1:8] == ["Dice (%)", "Hausdorff (px)", "Jaccard (%)", "Precision (%)", "Recall (%)",
                           "Specificity (%)", "F1 (%)"]
    assert header[8:] == ["Params", "ms/slice"]
    mfc = next(r for r in rows if r and r[0] == "mfcnet")
    unet = next(r for r in rows if r and r[0] == "unet")
    assert mfc[1:8] == EXPECTED_CELLS
    assert mfc[8:] == ["1,234,567", "3.14"]
    assert unet[1] == "50.00" and unet[9] == "–"  # a method missing from an extra column
    # The same cells as the Markdown Table 1 of the evaluation package.
    md = table1_markdown(content.table1, extra=content.table1_extra)
    md_row = next(line for line in md.splitlines() if line.startswith("| mfcnet"))
    assert [c.strip() for c in md_row.strip("|").split("|")] == mfc


def test_strings_are_escaped(content: ReportContent, tmp_path: Path) -> None:
    text = render_report(content)
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "demo &lt;b&gt;report&lt;/b&gt;" in text
    assert "<b>report</b>" not in text
    assert "x&amp;y" in text and "train &lt;mfcnet&gt;" in text
    # A case id with markup in a lesion/extra cell and a method name is escaped too.
    evil = ReportContent(title="t", table1={'<img src=x onerror="1">': SUMMARY})
    out = render_report(evil)
    assert "<img src=x" not in out and "&lt;img src=x onerror=&quot;1&quot;&gt;" in out


def test_images_are_embedded_and_nothing_is_linked(content: ReportContent, tmp_path: Path) -> None:
    path = write_report(content, tmp_path / "r" / "report.html")
    text = path.read_text(encoding="utf-8")
    parsed = _parse(text)
    images = [src for src in parsed.links if src.startswith("data:image/png;base64,")]
    assert len(images) == 4
    decoded = [base64.b64decode(src.split(",", 1)[1]) for src in images]
    names = ("slice_dice.png", "curves.png", "overlay.png", "explain.png")
    expected = [(tmp_path / n).read_bytes() for n in names]
    assert decoded == expected  # exactly the files, in report order
    assert parsed.links == images  # no other src/href at all
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.IGNORECASE)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert "<style>" in text  # CSS inline
    assert not list((tmp_path / "r").glob(".*"))  # atomic write left no temp file


def test_warning_is_bold(content: ReportContent) -> None:
    text = render_report(content)
    assert re.search(r'<div class="warning"><strong>single-patient z-split</strong></div>', text)
    assert "class=\"warning\"" not in render_report(ReportContent(title="t"))


def test_volume_metrics_and_lesions_formatted(content: ReportContent) -> None:
    rows = _parse(render_report(content)).rows
    assert ["Dice", "50.00 %"] in rows
    assert ["HD95", "3.25 mm"] in rows
    assert ["Predicted tumour voxels", "12,345"] in rows
    assert ["1", "1,500", "1.500", "14.0", "1.0, 2.0, 3.0", "3–9"] in rows


def test_bad_figure_and_bad_table_raise(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_bytes(b"GIF89a....")
    with pytest.raises(HepasegError, match="not a PNG"):
        png_data_uri(tmp_path / "fake.png")
    with pytest.raises(HepasegError, match="cannot read"):
        png_data_uri(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="lacks"):
        render_report(ReportContent(title="t", table1={"m": {"dice": 0.5}}))


def test_nan_and_inf_cells() -> None:
    text = render_report(ReportContent(title="t", table1={"m": {**SUMMARY, "hausdorff": float("inf"),
                                                                "jaccard": float("nan")}}))
    row = next(r for r in _parse(text).rows if r and r[0] == "m")
    assert row[2] == "∞" and row[3] == "–"


def _write_log(run: Path, version: int, rows: list[str]) -> None:
    d = run / "logs" / "csv" / f"version_{version}"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text("epoch,lr-AdamW,step,train_loss_epoch,train_loss_step,val_dice,val_loss\n"
                                   + "\n".join(rows) + "\n")


def test_read_training_log_merges_versions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_log(run, 0, [",0.001,0,,,,", "0,,8,,1.7,,", "0,,8,,,0.1,1.6", "0,,8,1.5,,,", "1,,17,,,0.2,1.4",
                        "1,,17,1.25,,,"])
    _write_log(run, 10, ["1,,17,,,0.25,1.4", "2,,26,,,0.5,1.0", "2,,26,1.0,,,"])  # resumed: later wins
    log = read_training_log(run)
    assert log.train_loss == {0: 1.5, 1: 1.25, 2: 1.0}
    assert log.val_dice == {0: 0.1, 1: 0.25, 2: 0.5}
    with pytest.raises(HepasegError, match="no training log"):
        read_training_log(tmp_path / "empty")


def test_plot_training_curves_writes_png(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_log(run, 0, ["0,,8,,,0.1,1.6", "0,,8,1.5,,,"])
    out = plot_training_curves({"mfcnet": run, "unet": TrainingLog()}, tmp_path / "c.png")
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="runs"):
        plot_training_curves({}, tmp_path / "d.png")


def test_plot_slice_dice(tmp_path: Path) -> None:
    rows = {"mfcnet": [{"slice": 104, "dice": 0.5}, {"slice": 103, "dice": 0.25}], "unet": []}
    out = plot_slice_dice(rows, tmp_path / "s.png")
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="lacks 'dice'"):
        plot_slice_dice({"m": [{"slice": 1}]}, tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
