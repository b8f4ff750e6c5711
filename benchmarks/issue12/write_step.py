"""The write step of predict_case on a 129x512x512 phantom with an iid speckled mask of 8 M voxels."""
import sys, time, json, tempfile, os
from pathlib import Path
import numpy as np
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.io import read_volume, write_label_nifti, write_json_atomic, write_text_atomic
from hepaseg.inference.lesions import lesion_table, lesions_to_csv
from hepaseg.inference.overlay import draw_overlay
from hepaseg.evaluation import volume_metrics
work = Path(sys.argv[1]); work.mkdir(exist_ok=True)
if not (work/"src").exists():
    write_phantom_dataset(work/"src", "lits", n_cases=1, shape=(129,512,512), spacing=(1.6,0.57,0.57))
case = sorted((work/"src").glob("volume-*"))[0] if list((work/"src").glob("volume-*")) else sorted((work/"src").iterdir())[0]
vol = read_volume(case, with_label=True)
rng = np.random.default_rng(0)
tumor = (rng.random(vol.shape, dtype=np.float32) < 8e6 / np.prod(vol.shape)).astype(np.uint8)
target = vol.label == 2
out = Path(tempfile.mkdtemp(dir=work))
T = {}
t0 = time.perf_counter(); t = t0
rows = lesion_table(tumor, vol.spacing, vol.affine); T["lesion_table"] = time.perf_counter() - t; t = time.perf_counter()
m = volume_metrics(tumor > 0, target, vol.spacing); T["metrics"] = time.perf_counter() - t; t = time.perf_counter()
write_label_nifti(tumor, vol, out / "tumor_mask.nii.gz"); T["nifti"] = time.perf_counter() - t; t = time.perf_counter()
write_text_atomic(out / "lesions.csv", lesions_to_csv(rows))
write_json_atomic(out / "lesions.json", {"lesions": rows}); T["csv_json"] = time.perf_counter() - t; t = time.perf_counter()
draw_overlay(vol.image, tumor, out / "overlay.png", gt_mask=target, spacing=vol.spacing); T["overlay"] = time.perf_counter() - t
T["total"] = time.perf_counter() - t0
print(json.dumps({"voxels": int(tumor.sum()), "lesions": len(rows), "metrics": m, **{k: round(v, 3) for k, v in T.items()}}))
