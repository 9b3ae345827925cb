#!/usr/bin/env bash
# Everything the GPU path needs checked on a CUDA machine, in one go: the CUDA tests, then the benchmark.
#   bench/run_on_gpu.sh OUTDIR
# Writes OUTDIR/cuda_tests.log, OUTDIR/gpu_bench.json (+ .err) and OUTDIR/env.txt.
set -uo pipefail
out=${1:-.}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c 'import torch, cupy, grpc, google.protobuf as p; print(torch.__version__, cupy.__version__, grpc.__version__, p.__version__)'; } > "$out/env.txt" 2>&1
timeout "${KVD_TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/kvd/test_cuda_ipc.py 2>&1 | tee "$out/cuda_tests.log"
timeout "${KVD_BENCH_TIMEOUT:-150}" python3 bench/gpu_transfer.py "${@:2}" > "$out/gpu_bench.json" 2> "$out/gpu_bench.err"
echo "bench rc $?"
cat "$out/gpu_bench.json"
tail -20 "$out/gpu_bench.err"
