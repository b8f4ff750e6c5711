"""predict_case's write step on 3D-IRCADb 1.1 with the network's answer replaced by an 8 M-voxel i.i.d. speckle.

    python benchmarks/issue12/write_step_predict.py ROUNDS [../shared/data/3Dircadb1.1]
"""
import sys, json, tempfile, time
from pathlib import Path
from unittest import mock
import numpy as np
from hepaseg.inference import pipeline
from hepaseg.experiments.benchmark import write_untrained_checkpoint
src = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/3Dircadb1.1")
shape = (129, 512, 512)
rng = np.random.default_rng(0)
p = rng.random(shape, dtype=np.float32)
tumor = (p < 8e6 / np.prod(shape)).astype(np.uint8)
prob = np.where(tumor > 0, 1.0 - p, p * 0.5).astype(np.float32)
found = pipeline._Found(tumor=tumor, postprocess_info={}, probability=prob, uncertainty=None, votes=None)
with tempfile.TemporaryDirectory() as d:
    ck = write_untrained_checkpoint(Path(d) / "u.ckpt", model="unet", width=4, data_options={"size": 64})
    models = pipeline.load_models(ck)
    for i in range(int(sys.argv[1])):
        with mock.patch.object(pipeline, "_predict_tumour", return_value=found):
            r = pipeline.predict_case(src, Path(d) / f"out{i}", models=models, progress=False)
        print(json.dumps({"lesions": len(r.lesions), **{k: round(v, 2) for k, v in r.timings.items() if k.startswith("write")}}), flush=True)
