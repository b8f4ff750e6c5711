"""Slice aggregation, the Table-1 Markdown rendering and the per-slice CSV."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from hepaseg.evaluation import (
    SLICE_METRICS,
    f1_from_means,
    slice_metrics,
    summarize_slices,
    table1_markdown,
    write_slice_csv,
)


def row(**values: float) -> dict[str, float]:
    """A slice_metrics-like row with neutral defaults for the metrics not given."""
    base = dict.fromkeys(SLICE_METRICS, 1.0) | {"hausdorff": 0.0, "hd95": 0.0}
    return base | values


def _random_slice_rows(n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        # Mix of overlaps, misses, false positives and empty slices.
        pred = rng.random((24, 24)) < rng.choice([0.0, 0.05, 0.3])
        target = rng.random((24, 24)) < rng.choice([0.0, 0.05, 0.3])
        rows.append({"case": f"c{i // 10}", "slice": i % 10, **slice_metrics(pred, target)})
    return rows


# ----------------------------------------------------------------------------- summarize
def test_f1_of_means_differs_from_mean_of_f1():
    rows = [row(precision=1.0, recall=0.2), row(precision=0.6, recall=1.0)]
    s = summarize_slices(rows)
    assert s["precision"] == pytest.approx(0.8) and s["recall"] == pytest.approx(0.6)
    # Table 1's F1: harmonic mean of the mean precision and mean recall.
    assert s["f1"] == pytest.approx(2 * 0.8 * 0.6 / 1.4)  # 0.685714...
    # Mean of per-slice F1: (1/3 + 3/4) / 2.
    assert s["f1_mean_per_slice"] == pytest.approx((2 * 0.2 / 1.2 + 2 * 0.6 / 1.6) / 2)  # 0.541667
    assert s["f1"] - s["f1_mean_per_slice"] > 0.1


def test_f1_from_means_formula():
    assert f1_from_means(0.7961, 0.7543) == pytest.approx(2 * 0.7961 * 0.7543 / (0.7961 + 0.7543))
    assert f1_from_means(1.0, 1.0) == 1.0
    assert f1_from_means(0.0, 0.0) == 0.0
    assert f1_from_means(0.5, 0.0) == 0.0


def test_means_and_sample_sd_by_hand():
    rows = [row(dice=0.2, hausdorff=3.0), row(dice=0.4, hausdorff=5.0), row(dice=0.9, hausdorff=1.0)]
    s = summarize_slices(rows)
    assert s["n_slices"] == 3
    assert s["dice"] == pytest.approx(0.5)
    assert s["dice_sd"] == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))  # ddof=1
    assert s["hausdorff"] == pytest.approx(3.0) and s["hausdorff_sd"] == pytest.approx(2.0)
    assert s["jaccard"] == 1.0 and s["jaccard_sd"] == 0.0


def test_summary_matches_numpy_on_real_rows_and_f1_per_slice_is_dice():
    rows = _random_slice_rows()
    s = summarize_slices(rows)
    for key in SLICE_METRICS:
        values = np.array([r[key] for r in rows])
        assert s[key] == pytest.approx(values.mean(), abs=1e-12)
        assert s[f"{key}_sd"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    # Under the empty-mask policy per-slice F1 == Dice on every branch, so the means agree.
    assert s["f1_mean_per_slice"] == pytest.approx(s["dice"], abs=1e-12)
    assert s["f1"] == pytest.approx(f1_from_means(s["precision"], s["recall"]))
    # Every slice counted, empty ones included.
    assert s["n_slices"] == len(rows)
    assert any(r["dice"] == 1.0 and r["hausdorff"] == 0.0 for r in rows)  # a both-empty slice
    assert any(r["dice"] == 0.0 for r in rows)


def test_single_slice_has_nan_sd():
    s = summarize_slices([row(dice=0.3)])
    assert s["dice"] == 0.3 and math.isnan(s["dice_sd"]) and s["n_slices"] == 1


def test_summarize_rejects_bad_rows():
    with pytest.raises(ValueError, match="`rows` is empty"):
        summarize_slices([])
    bad = row()
    del bad["specificity"]
    with pytest.raises(ValueError, match=r"`rows\[1\]` lacks 'specificity'"):
        summarize_slices([row(), bad])
    with pytest.raises(ValueError, match=r"`rows\[0\]\['hd95'\]` is NaN"):
        summarize_slices([row(hd95=math.nan)])


# ----------------------------------------------------------------------------- Table 1
HEADER = (
    "| Method | Dice (%) | Hausdorff (px) | Jaccard (%) | Precision (%) | Recall (%) "
    "| Specificity (%) | F1 (%) |"
)

RESULTS = {
    "U-Net": {
        "dice": 0.71234,
        "hausdorff": 12.3456,
        "jaccard": 0.6,
        "precision": 0.7961,
        "recall": 0.75,
        "specificity": 0.99987,
        "f1": 0.771,
    },
    "MFCNet": {
        "dice": 0.8,
        "hausdorff": 7.0,
        "jaccard": 0.70005,
        "precision": 0.81,
        "recall": 0.82,
        "specificity": 0.999,
        "f1": 0.815,
    },
}


def test_table1_header_and_values():
    lines = table1_markdown(RESULTS).splitlines()
    assert lines[0] == HEADER
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| U-Net | 71.23 | 12.35 | 60.00 | 79.61 | 75.00 | 99.99 | 77.10 |"
    assert lines[3] == "| MFCNet | 80.00 | 7.00 | 70.00 | 81.00 | 82.00 | 99.90 | 81.50 |"
    assert len(lines) == 4


def test_table1_with_sd_and_extra_columns():
    sd = {"U-Net": {"dice": 0.1234, "hausdorff_sd": 3.0}}  # plain or *_sd keys
    extra = {"Params": {"U-Net": 31_042_434, "MFCNet": "7.8M"}, "ms/slice": {"MFCNet": 12.3456}}
    lines = table1_markdown(RESULTS, sd=sd, extra=extra).splitlines()
    assert lines[0] == HEADER + " Params | ms/slice |"
    assert (
        lines[2]
        == "| U-Net | 71.23 ± 12.34 | 12.35 ± 3.00 | 60.00 | 79.61 | 75.00 | 99.99 | 77.10 | 31,042,434 | – |"
    )
    assert lines[3] == "| MFCNet | 80.00 | 7.00 | 70.00 | 81.00 | 82.00 | 99.90 | 81.50 | 7.8M | 12.35 |"


def test_table1_from_summaries_with_sd_equal_results():
    summary = summarize_slices([row(dice=0.5, precision=0.5), row(dice=0.7, precision=0.9)])
    text = table1_markdown({"net": summary}, sd={"net": summary})
    cells = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert cells[1] == f"60.00 ± {np.std([50.0, 70.0], ddof=1):.2f}"  # 14.14
    assert cells[4] == f"70.00 ± {np.std([50.0, 90.0], ddof=1):.2f}"
    assert cells[7] == f"{100 * f1_from_means(0.7, 1.0):.2f}"  # F1 of means has no sd


def test_table1_rejects_bad_input():
    with pytest.raises(ValueError, match="`results` is empty"):
        table1_markdown({})
    with pytest.raises(ValueError, match=r"`results\['x'\]` lacks 'f1'"):
        table1_markdown({"x": {k: 0.5 for k in SLICE_METRICS}})


# ----------------------------------------------------------------------------- CSV
def test_write_slice_csv_round_trip(tmp_path):
    rows = _random_slice_rows(n=12)
    rows[3]["note"] = "fp"  # an extra key becomes an extra column, empty elsewhere
    path = write_slice_csv(rows, tmp_path / "sub" / "slices.csv")
    assert path == tmp_path / "sub" / "slices.csv"
    with open(path, newline="") as fh:
        back = list(csv.DictReader(fh))
    assert list(back[0]) == ["case", "slice", *SLICE_METRICS, "note"]
    assert len(back) == 12
    for orig, got in zip(rows, back):
        assert got["case"] == orig["case"] and int(got["slice"]) == orig["slice"]
        for key in SLICE_METRICS:
            assert float(got[key]) == orig[key]  # full precision, exact round trip
    assert back[3]["note"] == "fp" and back[0]["note"] == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["slices.csv"]  # no temp left


def test_write_slice_csv_rejects_rows_without_ids(tmp_path):
    path = tmp_path / "slices.csv"
    path.write_text("old\n")
    with pytest.raises(ValueError, match=r"`rows\[0\]` lacks 'slice'"):
        write_slice_csv([{"case": "a", **row()}], path)
    with pytest.raises(ValueError, match="`rows` is empty"):
        write_slice_csv([], path)
    assert path.read_text() == "old\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slices.csv"]


def test_write_slice_csv_failure_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "slices.csv"
    path.write_text("old\n")

    def boom(self, rowdict):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerow", boom)
    with pytest.raises(OSError, match="disk full"):
        write_slice_csv([{"case": "a", "slice": 0, **row()}], path)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slices.csv"]
