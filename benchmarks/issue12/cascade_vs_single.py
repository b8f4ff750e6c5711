"""Cascade (a crossval fold's checkpoints) vs the same tumour network on whole slices, alternating in one
process, median of the per-pair ratios (issue 12's "cascade within 1.5x of a single stage").

    python benchmarks/issue12/cascade_vs_single.py cv/target-w16/folds/ircadb-1.1 ../shared/data/3Dircadb1.1
"""
import json
import statistics
import sys
import time

from hepaseg.io import read_volume
from hepaseg.training import load_checkpoint
from hepaseg.models import build_model
from hepaseg.inference.cascade import predict_cascade
from hepaseg.inference.predictor import predict_volume
F = sys.argv[1]  # a crossval fold folder holding liver-unet/seed0 and mfcnet/seed0
vol = read_volume(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/3Dircadb1.1", with_label=True)
liver, tumor = load_checkpoint(f"{F}/liver-unet/seed0/last.ckpt"), load_checkpoint(f"{F}/mfcnet/seed0/last.ckpt")
single = build_model("mfcnet", in_channels=tumor.in_channels, base_width=16).eval()  # same network, whole slices
opts = dict(tumor.data_options); opts.pop("roi", None)
kw = dict(progress=False, device="cpu", precision="fp32")
pairs = []
for _ in range(3):
    t = time.perf_counter(); predict_volume(single, vol, opts, **kw); ts = time.perf_counter() - t
    t = time.perf_counter(); r = predict_cascade(liver.model, liver.data_options, tumor.model, tumor.data_options, vol, **kw); tc = time.perf_counter() - t
    pairs.append((ts, tc, r.timings))
print(json.dumps({"single_s": [round(p[0], 2) for p in pairs], "cascade_s": [round(p[1], 2) for p in pairs],
                  "ratio_median": round(statistics.median(p[1] / p[0] for p in pairs), 2),
                  "stages": [{k: round(v, 2) for k, v in p[2].items()} for p in pairs]}))
