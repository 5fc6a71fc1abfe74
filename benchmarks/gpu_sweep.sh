# One call on a lent GPU machine: a grid of benchmarks/sweep.py with many runs side by side.
#
#   bash benchmarks/gpu_sweep.sh GRID [WORKERS] [DATA]      # writes $OUT/GRID.jsonl (or ./GRID.jsonl)
#
# The network is small, so each training process launches tiny kernels and leaves the GPU mostly
# idle. CUDA MPS lets the processes' kernels run at the same time instead of taking turns; without
# it (no nvidia-cuda-mps-control, or its client check fails) the script falls back to 8 workers.
# Results are written one line per finished run, so a run cut off by the time limit loses only
# the runs still going.
set -u
export PYTHONUNBUFFERED=1
GRID=${1:-tune}
DATA=${3:-.gpu/cifar10-jpeg.tar.gz}
DEST=${OUT:-.}
t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
W=8
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  if nvidia-cuda-mps-control -d && sleep 1 && timeout 60 python3 -c \
      "import torch; print('MPS client ok', (torch.ones(4, device='cuda') * 2).sum().item())"; then
    W=${2:-16}
  else
    echo quit | nvidia-cuda-mps-control; echo "MPS failed: plain time-slicing"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
else
  echo "no nvidia-cuda-mps-control: plain time-slicing"
fi
echo "workers $W, setup $(( $(date +%s) - t0 )) s"
# stop well inside a 600 s call, keeping every finished run
timeout $(( 560 - ($(date +%s) - t0) )) python3 benchmarks/sweep.py --data "$DATA" \
    --out "$DEST/$GRID.jsonl" --grid "$GRID" --workers $W 2>&1 | grep -v -i warn \
  | while read -r line; do echo "$(( $(date +%s) - t0 ))s $line"; done
echo "done after $(( $(date +%s) - t0 )) s"
