#!/usr/bin/env bash
# One call on a lent GPU machine: the two candidates for the notebooks' shared recipe (3 seeds of
# every norm each: the notebooks themselves run seed 1, benchmarks/sweep.py seeds 2 and 3), the
# assignment's network with each candidate's settings, the no-norm study, side by side under CUDA MPS.
#
#   bash benchmarks/gpu_run.sh DATA [SMOKE]     # results and executed notebooks under $OUT
#
# Candidate A is the recipe in utils.Recipe (the weight-standardized build, C1 not whitened, which
# weight standardization would undo); candidate B, the plain build with the whitened C1, runs from a
# copy of the tree whose Recipe defaults are changed to it, so that its notebooks print the recipe
# they trained. The results files of doc/results/ (shared-recipe.jsonl, why-normalise.json) came
# from this call; the notebooks of whichever candidate has the better mean are the ones to commit.
set -u
export PYTHONUNBUFFERED=1
DATA=$(realpath "${1:-.gpu/cifar10-jpeg.tar.gz}")
SMOKE=${2:-}
DEST=${OUT:-/tmp/gpu-out}; mkdir -p "$DEST"
t0=$(date +%s)
say() { echo "$(( $(date +%s) - t0 ))s $*"; }
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
rm -rf /tmp/B && mkdir /tmp/B && cp -r benchmarks doc model.py utils.py S8_*.ipynb /tmp/B/ && ln -s "$PWD/data" /tmp/B/data
sed -i 's/build: str = "separable-ws-skips"/build: str = "separable-skips"/; s/whiten_c1: bool = False/whiten_c1: bool = True /' /tmp/B/utils.py
grep -q 'build: str = "separable-skips"' /tmp/B/utils.py && grep -q 'whiten_c1: bool = True ' /tmp/B/utils.py || exit 1
say "setup done"
SW="--data $DATA"; NB_ENV=""; WHY="--seeds 1,2,3 --change build=separable-skips --change whiten_c1=true"
if [ -n "$SMOKE" ]; then SW="$SW --smoke"; NB_ENV="S8_EPOCHS=1 S8_SUBSET=512"; WHY="$WHY --seeds 1 --epochs 1 --train-subset 512"; fi
LOGS=/tmp/gpu-logs; mkdir -p $LOGS
left() { echo $(( ${LIMIT:-550} - ($(date +%s) - t0) )); }      # seconds left of the call, for timeouts
sweep() { timeout $(left) python3 benchmarks/sweep.py $SW "$@" 2>&1 | grep -v -i warn; }
( cd /tmp/B && sweep --out "$DEST/B.jsonl" --notebook-seeds 2,3 --workers 6 ) > $LOGS/sweep-B.log &
sweep --out "$DEST/A.jsonl" --notebook-seeds 2,3 --workers 6 > $LOGS/sweep-A.log &
( for seeds in 1 2,3; do
    sweep --out "$DEST/ref.jsonl" --notebook-seeds $seeds --change build=reference --name reference --workers 3
    sweep --out "$DEST/ref.jsonl" --notebook-seeds $seeds --change build=reference --change whiten_c1=true \
      --name reference --workers 3
  done ) > $LOGS/sweep-ref.log &
timeout $(left) python3 benchmarks/why_normalise.py --data "$DATA" --out doc/results/why-normalise.json $WHY \
  > $LOGS/why.log 2>&1
cp doc/results/why-normalise.json "$DEST/" && cp doc/results/why-normalise.json /tmp/B/doc/results/
say "why-normalise done"
pids=()
for tree in A B; do
  dir=$PWD; [ $tree = B ] && dir=/tmp/B
  for nb in S8_BatchNorm S8_LayerNorm S8_GroupNorm; do
    ( cd "$dir" && env S8_DATA="$DATA" $NB_ENV timeout $(left) python3 -c "
import nbformat, nbclient
nb = nbformat.read('$nb.ipynb', as_version=4)
nbclient.NotebookClient(nb, timeout=-1, kernel_name='python3', record_timing=False).execute()
nbformat.write(nb, '$nb.ipynb')" > $LOGS/$tree-$nb.log 2>&1; say "$tree $nb rc $?" ) &
    pids+=($!)
  done
done
wait "${pids[@]}"
for tree in A B; do
  dir=$PWD; [ $tree = B ] && dir=/tmp/B
  (cd "$dir" && tar czf "$DEST/notebooks-$tree.tar.gz" S8_*.ipynb doc/*.png doc/results/bn.json doc/results/ln.json \
     doc/results/gn.json)
done
say "notebooks packed"
wait
say "all done"
tail -n 2 $LOGS/*.log
tar czf "$DEST/logs.tar.gz" -C $LOGS .
