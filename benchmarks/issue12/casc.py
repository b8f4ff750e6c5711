import sys, time, json, cProfile, pstats, shutil
from pathlib import Path
import numpy as np
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.experiments.benchmark import write_untrained_checkpoint
from hepaseg.inference.pipeline import predict_case
w = Path("/tmp/perf/casc"); w.mkdir(exist_ok=True)
if not (w/"src").exists():
    write_phantom_dataset(w/"src", "lits", n_cases=1, shape=(200,512,512), spacing=(2.5,0.7,0.7))
case = sorted((w/"src").glob("volume-*"))[0]
bias = None if len(sys.argv) < 3 or sys.argv[2] == "none" else float(sys.argv[2])
liver = write_untrained_checkpoint(w/"liver.ckpt", model="unet", width=4, head_bias=bias,
    data_options={"size": 96, "target": "liver", "context_slices": 0})
tumor = write_untrained_checkpoint(w/"tumor.ckpt", model="unet", width=4, head_bias=-4.0,
    data_options={"size": 128, "context_slices": 1, "roi": "liver", "roi_margin_mm": 10.0})
single = write_untrained_checkpoint(w/"single.ckpt", model="unet", width=4, head_bias=-4.0,
    data_options={"size": 128, "context_slices": 1})
mode = sys.argv[1]
for rep in range(2):
    out = w/f"out_{mode}"; shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if mode == "cascade":
        r = predict_case(case, out, checkpoint=tumor, liver_checkpoint=liver, progress=False, device="cpu")
    else:
        r = predict_case(case, out, checkpoint=single, progress=False, device="cpu")
    print(json.dumps({"mode": mode, "wall": round(time.perf_counter()-t, 2), **{k: round(v, 2) for k, v in r.timings.items()},
                      "liver_voxels": r.settings.get("cascade", {}).get("liver_voxels"), "crop": r.settings.get("cascade", {}).get("crop_box")}))
if len(sys.argv) > 3:
    out = w/f"out_{mode}"; shutil.rmtree(out, ignore_errors=True)
    cProfile.run("predict_case(case, out, checkpoint=tumor, liver_checkpoint=liver, progress=False, device='cpu')" if mode=="cascade" else "predict_case(case, out, checkpoint=single, progress=False, device='cpu')", "/tmp/perf/casc.prof")
    pstats.Stats("/tmp/perf/casc.prof").sort_stats("tottime").print_stats(18)
