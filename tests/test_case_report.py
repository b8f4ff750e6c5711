"""The per-case HTML report of ``hepaseg predict --report`` (hepaseg.viz.case_report).

Every image in the page (``<img src>`` and the slice browser's frames) must decode; the page
must not link anywhere; the montage has a reference column only when labelled and an
uncertainty column only when an uncertainty array is given; arrays are shown as stored
(canonical LPS: row 0 anterior at the top, column 0 the patient's right on the left). Where
Chromium is installed, the page is opened headless, the slider moved (``#slice=K``) and the
screenshots compared.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hepaseg.cli import app
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.errors import HepasegError
from hepaseg.inference.lesions import lesion_table
from hepaseg.models import build_model
from hepaseg.viz import CaseReport, predict_report, render_case_report, write_case_report

SHAPE = (12, 48, 64)
SPACING = (2.5, 0.8, 0.6)  # anisotropic pixels: the page must keep the physical aspect ratio


class _Page(HTMLParser):
    """Every img src, every href/src, JSON script blocks by id, table rows' cell texts and th texts."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts: dict[str, str] = {}
        self.headers: list[str] = []
        self.text: list[str] = []
        self._script: str | None = None
        self._th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v is not None]
        if tag == "script":
            self._script = attrs.get("id", "")
            self.scripts.setdefault(self._script, "")
        self._th = tag == "th"

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None
        if tag == "th":
            self._th = False

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] += data
        else:
            self.text.append(data)
        if self._th:
            self.headers.append(data.strip())


def _decode(uri: str) -> Image.Image:
    head, _, payload = uri.partition(",")
    assert head in ("data:image/jpeg;base64", "data:image/png;base64"), head[:40]
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    img.load()  # decodes every pixel: a truncated file raises here
    return img


def _case(with_reference: bool = True, uncertainty: bool = False, case_id: str = "case-1") -> CaseReport:
    z, y, x = SHAPE
    zz, yy, xx = np.mgrid[:z, :y, :x]
    image = np.full(SHAPE, -1000.0, np.float32)
    body = ((yy - 24) / 22) ** 2 + ((xx - 32) / 30) ** 2 < 1
    image[body] = 40.0
    liver = body & (xx < 30) & (yy < 36)  # the patient's right (image left), anterior
    image[liver] = 110.0
    image[:, 0, 0] = 240.0  # a marker at row 0, column 0: must land at the frame's top left
    pred = np.zeros(SHAPE, np.uint8)
    pred[3:7, 10:18, 8:16] = 1  # lesion 1: 4 x 8 x 8 = 256 voxels
    pred[8:10, 20:24, 20:23] = 1  # lesion 2: 2 x 4 x 3 = 24 voxels
    ref = np.zeros(SHAPE, bool)
    ref[3:8, 10:19, 8:16] = True
    image[ref] = 60.0
    return CaseReport(
        case_id=case_id, image=image, spacing=SPACING, prediction=pred,
        reference=ref if with_reference else None, liver=liver,
        uncertainty=(np.random.default_rng(0).uniform(0, 0.3, SHAPE).astype(np.float32) * liver)
        if uncertainty else None,
        uncertainty_label="std over members and flips",
        lesions=lesion_table(pred, SPACING),
        metrics={"dice": 0.75, "hd95": 4.25, "pred_voxels": 280, "target_voxels": 360,
                 "liver": {"dice": 0.9, "hd95": 2.0}} if with_reference else None,
        command="hepaseg predict scan.nii.gz --out out --report",
        models=[{"role": "tumour", "model": "unet", "file": "best.ckpt"}],
        versions={"torch": torch.__version__},
        warnings=["a <b>warning</b>"],
    )


def test_page_is_self_contained_and_every_image_decodes():
    case = _case(uncertainty=True)
    page = _Page()
    page.feed(render_case_report(case))
    # no link to another file or site: only data URIs
    assert page.links and all(link.startswith("data:image/") for link in page.links)
    montage_and_thumbs = [_decode(u) for u in page.images]
    frames = json.loads(page.scripts["browser-frames"])
    assert len(frames) == SHAPE[0]  # one frame per slice
    decoded = [_decode(u) for u in frames]
    # physical aspect: 48 rows x 0.8 mm = 38.4 mm high, 64 x 0.6 = 38.4 mm wide -> square frames
    assert all(f.size == (256, 256) for f in decoded)
    # frames with and without tumour differ; a frame is not blank
    a, b = (np.asarray(decoded[k].convert("RGB"), np.float32) for k in (0, 4))
    assert np.abs(a - b).mean() > 1.0 and a.std() > 10
    red = (b[..., 0] > 200) & (b[..., 1] < 90)
    assert red.sum() > 20  # slice 4 has predicted tumour, outlined in red
    meta = json.loads(page.scripts["browser-meta"])
    assert meta["pred"] == [int(s.sum()) for s in case.prediction] and meta["start"] == 3  # most tumour first
    assert meta["ref"][7] == 72 and meta["z_mm"][2] == 5.0
    # montage: CT, prediction, reference, uncertainty; the browser's current frame; one thumbnail per lesion
    assert {"CT", "prediction", "reference", "std over members and flips"} <= set(page.headers)
    n_slices_with_tumour = 7  # slices 3-9 hold tumour (prediction or reference); montage keeps <= 6
    assert len(montage_and_thumbs) == min(6, n_slices_with_tumour) * 4 + 1 + len(case.lesions)
    assert page.images[6 * 4] == frames[3]  # the browser opens at the slice with the most tumour
    text = " ".join(page.text)
    assert "a <b>warning</b>" in text  # escaped: shown as text, not markup
    assert "75.00 %" in text and "4.25 mm" in text and "90.00 %" in text  # tumour and liver metrics


def test_arrays_are_shown_as_stored_radiological_view():
    case = _case()
    page = _Page()
    page.feed(render_case_report(case))
    frame = np.asarray(_decode(json.loads(page.scripts["browser-frames"])[0]).convert("L"), np.float32)
    # the 240 HU marker at (row 0, column 0) is white at the top left; the opposite corner is air (black)
    assert frame[:2, :2].mean() > 200 and frame[-3:, -3:].mean() < 30
    # the liver (110 HU, columns < 30 of 64) is brighter on the image's left than the body (40 HU) on the right
    assert frame[80:140, 60:110].mean() > frame[80:140, 150:200].mean() + 20


def test_optional_parts_follow_the_inputs():
    page = _Page()
    page.feed(render_case_report(_case(with_reference=False, case_id="<script>alert(1)</script>")))
    assert "reference" not in page.headers and "std over members and flips" not in page.headers
    assert set(page.scripts) == {"browser-frames", "browser-meta", ""}  # the inline script has no id
    assert json.loads(page.scripts["browser-meta"])["ref"] is None
    text = " ".join(page.text)
    assert "Metrics against the reference" not in text
    assert "<script>alert(1)</script>" in text  # the case id is text, not a script
    empty = _case()
    empty.prediction = np.zeros(SHAPE, np.uint8)
    empty.lesions = []
    page = _Page()
    page.feed(render_case_report(empty))
    assert "No lesion predicted." in " ".join(page.text)
    assert json.loads(page.scripts["browser-meta"])["start"] == 3  # the reference's largest slice


def test_bad_arrays_are_refused(tmp_path):
    case = _case()
    case.uncertainty = np.zeros((3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="uncertainty.*shape"):
        render_case_report(case)
    case.uncertainty = -np.ones(SHAPE, np.float32)
    with pytest.raises(ValueError, match="uncertainty"):
        render_case_report(case)
    case.uncertainty = None
    case.spacing = (1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        write_case_report(case, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()  # nothing half-written
    with pytest.raises(HepasegError, match="--report"):
        predict_report(object(), tmp_path / "r.html")


def _checkpoint(path: Path, size: int = 32) -> Path:
    """A width-4 U-Net checkpoint (untrained; the head's bias makes it predict some tumour)."""
    torch.manual_seed(0)
    net = build_model("unet", in_channels=3, num_classes=1, base_width=4)
    torch.save({
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hepaseg": {"version": "0.1.0", "model": "unet", "model_options": {}, "in_channels": 3, "num_classes": 1,
                    "base_width": 4, "metrics": {}, "config": {},
                    "data_options": {"window": [-200.0, 250.0], "size": size, "context_slices": 1, "slices": "all",
                                     "target": "tumor", "orientation": "LPS"}},
    }, path)
    return path


def test_predict_report_from_the_cli(tmp_path):
    (case,) = write_phantom_dataset(tmp_path / "lits", "lits", n_cases=1, shape=(10, 64, 64), seed=1, n_tumors=2)
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(case), "--out", str(out), "--checkpoint", str(ckpt),
                                      "--report", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "report" in result.output and (out / "report.html").is_file()
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    for uri in page.images + json.loads(page.scripts["browser-frames"]):
        _decode(uri)
    assert len(json.loads(page.scripts["browser-frames"])) == 10
    n_lesions = len((out / "lesions.csv").read_text().strip().splitlines()) - 1
    text = " ".join(page.text)
    assert f"{n_lesions} lesion(s) predicted" in text
    assert "reference" in page.headers and "Metrics against the reference" in text  # the LiTS case is labelled
    assert str(ckpt) in text  # the model file
    assert f"hepaseg predict {case} --out {out} --checkpoint {ckpt} --no-progress --report" in text  # the command
    assert "torch" in text


def test_predict_report_with_a_given_uncertainty(tmp_path):
    from hepaseg.inference import predict_case

    (case,) = write_phantom_dataset(tmp_path / "lits", "lits", n_cases=1, shape=(8, 48, 48), seed=2, n_tumors=1)
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    result = predict_case(case, tmp_path / "out", checkpoint=ckpt, progress=False)
    u = np.random.default_rng(1).uniform(0, 0.2, result.volume.image.shape).astype(np.float32)
    path = predict_report(result, tmp_path / "out" / "report.html", checkpoints=[ckpt], uncertainty=u,
                          uncertainty_label="predictive entropy")
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert "predictive entropy" in page.headers
    for uri in page.images:
        _decode(uri)


# --- in a real browser ---------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _screenshot(browser: str, page: Path, fragment: str, out: Path) -> np.ndarray:
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=900,700",
         "--virtual-time-budget=3000", f"--screenshot={out}", f"{page.as_uri()}#{fragment}"],
        check=True, capture_output=True, timeout=120,
    )
    return np.asarray(Image.open(out).convert("RGB"), np.float32)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium): "
                                               "the headless slider check cannot run")
def test_slider_in_headless_chromium(tmp_path):
    path = write_case_report(_case(uncertainty=True), tmp_path / "report.html")
    browser = _chromium()
    shots = {k: _screenshot(browser, path, f"slice={k}&browser-only", tmp_path / f"s{k}.png") for k in (0, 4)}
    # The frame: the largest dark region of the screenshot (the air around the body is black).
    from scipy import ndimage

    components, n = ndimage.label(shots[0].mean(axis=2) < 40)
    assert n > 0, "nothing dark on the page: the screenshot is blank"
    largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    box = ndimage.find_objects(components)[largest - 1]
    assert (box[0].stop - box[0].start) > 200 and (box[1].stop - box[1].start) > 200, box  # the 256 px frame
    top, left = box[0].start, box[1].start
    frame = (slice(top, top + 256), slice(left, left + 256))
    shot0, shot4 = shots[0][frame], shots[4][frame]
    assert shot0.std() > 20 and shot4.std() > 20  # not blank
    # moving the slider shows the other slice: each screenshot matches its own frame of the page best
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    frames = [np.asarray(_decode(u).convert("RGB"), np.float32) for u in json.loads(page.scripts["browser-frames"])]
    assert np.abs(shot4 - frames[4]).mean() < 2.0 and np.abs(shot0 - frames[0]).mean() < 2.0
    assert np.abs(shot4 - frames[0]).mean() > 2 * np.abs(shot4 - frames[4]).mean() + 0.3
    red = (shot4[..., 0] > 200) & (shot4[..., 1] < 90) & (shot4[..., 2] < 90)
    assert red.sum() > 20 and not ((shot0[..., 0] > 200) & (shot0[..., 1] < 90) & (shot0[..., 2] < 90)).any()
    # the label beside the slider changed too
    assert np.abs(shots[0] - shots[4]).sum() > np.abs(shot0 - shot4).sum()
