#!/usr/bin/env bash
# One call on a lent GPU machine, side by side under CUDA MPS: the three notebooks executed (seed 1),
# seeds 2 and 3 of their recipe (benchmarks/sweep.py), the assignment's network with the same recipe
# (seeds 1-3) and the no-norm study (benchmarks/why_normalise.py). Everything lands under $OUT.
#
#   bash benchmarks/gpu_run.sh DATA [SMOKE]       # SMOKE: 1 epoch on 512 images, to try the script
#
# That machine has torch but no jupyter: wheels for nbclient, ipykernel and torchsummary travel in a
# git-ignored .whl folder and the archive in .gpu; name both in the call's carry. Copy the results
# into doc/results (the seeds as shared-recipe.jsonl lines), unpack the notebooks, run benchmarks/report.py.
set -u
export PYTHONUNBUFFERED=1
DATA=$(realpath "${1:?usage: bash benchmarks/gpu_run.sh DATA [SMOKE], DATA a CIFAR-10 copy}")
SMOKE=${2:-}
DEST=${OUT:-/tmp/gpu-out}; mkdir -p "$DEST"
t0=$(date +%s)
say() { echo "$(( $(date +%s) - t0 ))s $*"; }
left() { echo $(( ${LIMIT:-550} - ($(date +%s) - t0) )); }      # seconds left of the call, for timeouts
if [ -d .whl ] && ! python3 -c "import nbclient, ipykernel, torchsummary" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  if ! (nvidia-cuda-mps-control -d && sleep 1 && timeout 60 python3 -c "import torch; torch.ones(4, device='cuda').sum().item()"); then
    echo quit | nvidia-cuda-mps-control; say "MPS failed: plain time-slicing"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
python3 -c "import utils; utils.load_cifar10('$DATA')" || exit 1          # decode once into data/cache
SW="--data $DATA"; NB_ENV=""; WHY="--seeds 1,2,3"
if [ -n "$SMOKE" ]; then SW="$SW --smoke"; NB_ENV="S8_EPOCHS=1 S8_SUBSET=512"; WHY="--seeds 1 --epochs 1 --train-subset 512"; fi
LOGS=/tmp/gpu-logs; mkdir -p $LOGS
sweep() { timeout $(left) python3 benchmarks/sweep.py $SW "$@" 2>&1 | grep -v -i warn; }
sweep --out "$DEST/seeds.jsonl" --notebook-seeds 2,3 --workers 6 > $LOGS/seeds.log &
sweep --out "$DEST/reference.jsonl" --notebook-seeds 1,2,3 --change build=reference --name reference --workers 9 \
  > $LOGS/reference.log &
timeout $(left) python3 benchmarks/why_normalise.py --data "$DATA" --out "$DEST/why-normalise-lr.jsonl" --workers 8 $WHY \
  > $LOGS/why.log 2>&1 &
pids=()
for nb in S8_BatchNorm S8_LayerNorm S8_GroupNorm; do
  ( env S8_DATA="$DATA" $NB_ENV timeout $(left) python3 -c "
import nbformat, nbclient
nb = nbformat.read('$nb.ipynb', as_version=4)
nbclient.NotebookClient(nb, timeout=-1, kernel_name='python3', record_timing=False).execute()
nbformat.write(nb, '$nb.ipynb')" > $LOGS/$nb.log 2>&1; say "$nb rc $?" ) &
  pids+=($!)
done
wait "${pids[@]}"
tar czf "$DEST/notebooks.tar.gz" S8_*.ipynb doc/*.png doc/results/bn.json doc/results/ln.json doc/results/gn.json
say "notebooks packed"
wait
say "all done"
tail -n 2 $LOGS/*.log
tar czf "$DEST/logs.tar.gz" -C $LOGS .
