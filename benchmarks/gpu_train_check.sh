#!/usr/bin/env bash
# GPU training check (issue 4): mfcnet and unet at width 64, 224 px, bf16-mixed, about 3 minutes
# each, on LiTS-117 tumour slices (train) with 3D-IRCADb 1.1 held out (val = the unseen patient,
# evaluated with last.ckpt, so it selects nothing). Prints steps/s, peak GPU memory and the
# Table 1 rows of both models.
#
# Prepare the data on a machine that has ../shared/data (the GPU machine does not):
#   echo '{"train": ["lits-117"], "val": ["ircadb-1.1"], "test": []}' > split.json
#   hepaseg prepare ../shared/data/lits117 ../shared/data/3Dircadb1.1 --out gpu_data --size 224 \
#       --split-file split.json
# then run this script where the GPU is:  bash benchmarks/gpu_train_check.sh gpu_data OUT_DIR [MINUTES]
set -euo pipefail
data=${1:?prepared data directory}
out=${2:?output directory}
minutes=${3:-3}
hepaseg=${HEPASEG:-hepaseg}
accelerator=${ACCELERATOR:-gpu}  # ACCELERATOR=cpu WIDTH=8 dry-runs the script without a GPU
width=${WIDTH:-64}
device=$([ "$accelerator" = cpu ] && echo cpu || echo cuda)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for model in mfcnet unet; do
  $hepaseg train --data "$data" --model "$model" --out "$out/$model" --width "$width" --precision bf16-mixed \
      --accelerator "$accelerator" --devices 1 --max-epochs 10000 --max-minutes "$minutes" --num-workers 6 --no-progress
  python3 - "$out/$model/result.json" "$model" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
peak = r["peak_gpu_memory_bytes"]
print(sys.argv[2], "steps/s", r["steps_per_second"], "epochs", r["epochs"],
      "peak GPU GiB", None if peak is None else round(peak / 2**30, 2))
PY
  $hepaseg evaluate --checkpoint "$out/$model/last.ckpt" --data "$data" --split val --out "$out/$model/eval" --device "$device"
done
cat "$out"/mfcnet/eval/table.md "$out"/unet/eval/table.md
