#!/usr/bin/env bash
# The GPU checks of issue 6 in one call, for a lent H100 / H200 (one GPU, no network there).
#
#   here (with network):  make gpu-wheels             # .gpu_deps/: the wheels the GPU image lacks, ~38 MB
#   there:                bash benchmarks/gpu_session.sh    # carry .gpu_deps; logs go to $OUT
#
# What it runs, each under its own time limit so that one hang cannot spend the lease:
#   1. the CUDA-only tests: the whole training step replayed as one CUDA graph (GraphedTrainStep)
#      and decoding with the static cache, against their eager paths;
#   2. ours vs transformers' Mllama (benchmarks/vs_hf_mllama.py) in bf16-mixed, ours as one CUDA
#      graph, at 4 x 128 and 32 x 256, and recomputing every 2nd block at 32 x 256 (the memory target);
#   3. benchmarks/gpu_check.py: eager and graphed step throughput and MFU, decoding.
# The last lines of each log are echoed; summary.txt lists each check's exit status and seconds
# (124: it hit its limit). At most 8 files come back from $OUT: this writes 6.
set -uo pipefail
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
if compgen -G ".gpu_deps/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_deps/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repo's packages, not installed there
export PYTHONUNBUFFERED=1
summary=()

check() {  # check NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $((SECONDS - start))s")
  echo "== $name (rc $rc)"
  tail -n 4 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
check tests 100 python3 -m pytest -q -p no:cacheprovider tests/test_graphed_step.py tests/test_generation.py
vs=(python3 benchmarks/vs_hf_mllama.py --device cuda --precision bf16-mixed)
check vs_hf_graph_4x128 110 "${vs[@]}" --ours-graph
check vs_hf_graph_32x256 110 "${vs[@]}" --ours-graph --batch-size 32 --seq-len 256
check vs_hf_every2_32x256 110 "${vs[@]}" --ours-checkpointing 2 --batch-size 32 --seq-len 256
check gpu_check 100 python3 benchmarks/gpu_check.py --no-run --no-compile
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
