"""Cascade vs single stage, alternating in one process (medians of per-pair ratios: robust to a shared machine's load)."""
import sys, time, json, statistics
from pathlib import Path
import numpy as np, torch
from hepaseg.io import read_volume
from hepaseg.training import load_checkpoint
from hepaseg.inference.cascade import predict_cascade
from hepaseg.inference.predictor import predict_volume
which = sys.argv[1]
if which == "synthetic":
    w = Path("/tmp/perf/casc")
    vol = read_volume(sorted((w/"src").glob("volume-*"))[0], with_label=True)
    liver, tumor, single = (load_checkpoint(w/f"{n}.ckpt") for n in ("liver", "tumor", "single"))
else:
    vol = read_volume("/work/shared/data/3Dircadb1.1", with_label=True)
    liver, tumor = load_checkpoint("/tmp/perf/ck/liver.ckpt"), load_checkpoint("/tmp/perf/ck/mfcnet.ckpt")
    single = load_checkpoint("/tmp/perf/single_mfcnet8.ckpt")
kw = dict(progress=False, device="cpu", precision="fp32")
pairs = []
for rep in range(int(sys.argv[2])):
    t = time.perf_counter(); predict_volume(single.model, vol, single.data_options, **kw); ts = time.perf_counter() - t
    t = time.perf_counter(); r = predict_cascade(liver.model, liver.data_options, tumor.model, tumor.data_options, vol, **kw); tc = time.perf_counter() - t
    pairs.append((ts, tc, r.timings))
print(json.dumps({"which": which, "shape": list(vol.shape), "single_s": [round(p[0], 2) for p in pairs], "cascade_s": [round(p[1], 2) for p in pairs],
                  "ratio_median": round(statistics.median(p[1] / p[0] for p in pairs), 2), "stages": [{k: round(v, 2) for k, v in p[2].items()} for p in pairs]}))
