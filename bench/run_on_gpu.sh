#!/usr/bin/env bash
# Everything the GPU path needs checked on a CUDA machine, in one go: the CUDA tests, then the benchmark.
#   bench/run_on_gpu.sh OUTDIR [gpu_transfer.py args...]
# Writes OUTDIR/cuda_tests.log, OUTDIR/gpu_bench.json (+ .err), OUTDIR/traces/ (the chunk traces of the benchmark's
# configuration variants) and OUTDIR/env.txt. The benchmark prints its summary table last. Optional stages:
#   KVD_COMPARE="KVD_X=V ..."  bench/event_wait.py (OUTDIR/event_wait.json), and the benchmark again with the
#                   daemon configured so (OUTDIR/gpu_bench_compare.json)
#   KVD_TESTS_AGAIN_WITH="KVD_X=V ..."  the CUDA tests again with every test daemon configured so (e.g.
#                   KVD_TRANSPORTS__CUDA_QUEUE_ON_LOOP=false), logged to OUTDIR/cuda_tests_again.log
#   KVD_SANITIZE=1  the round-trip and ordering tests again with the daemon under compute-sanitizer (memcheck, then
#                   racecheck; KVD_SANITIZE_TOOLS="memcheck" for one); logs in OUTDIR/sanitizer.txt
#   KVD_INTERFERENCE="NAME:KVD_X=V,... NAME:tree=DIR ..."  bench/gpu_interference.py (OUTDIR/interference.json):
#                   the matmul's slowdown while saving, the default configuration against each one named (`tree=DIR`:
#                   a daemon run from another checkout), interleaved over three rounds
#   KVD_IN_STEP=1   bench/gpu_in_step.py (OUTDIR/in_step.json, at most 90 s): TTFT on a hit with in-step vs async
#                   loads vs recompute, model-like GPU loop (with KVD_SKIP_MAIN=1 it runs alone)
#   KVD_PROFILE=1   the benchmark again (gpu_bench_profiled.json) with py-spy sampling the daemon and the benchmark process (collapsed
#                   stacks per thread, idle included) into OUTDIR/pyspy_{daemon,bench}.txt
set -uo pipefail
out=${1:-.}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
{
    nvidia-smi -L
    nvidia-smi --query-gpu=name,pci.bus_id,pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max \
        --format=csv
    nvidia-smi topo -m
    lscpu | grep -Ei 'model name|numa|^cpu\(s\)'
    python3 -c 'import torch, cupy, grpc, google.protobuf as p; print(torch.__version__, cupy.__version__, grpc.__version__, p.__version__)'
} > "$out/env.txt" 2>&1
if [[ "${KVD_SKIP_MAIN:-0}" != 1 ]]; then  # KVD_SKIP_MAIN=1: only the optional stages below
    # Every test marked cuda (IPC round trips, progress counters, in-step loads, the cap on events), file by file:
    # a hang costs one file, and faulthandler prints every thread's stack after 90 s in one test.
    for file in $(grep -l "mark.cuda" tests/kvd/test_*.py tests/security/test_*.py); do
        timeout "${KVD_TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider --tb=short -rfE \
            -o faulthandler_timeout=90 -m cuda "$file" 2>&1 | tee -a "$out/cuda_tests.log"
        echo "$file rc ${PIPESTATUS[0]}" | tee -a "$out/cuda_tests.log"
    done
    # The benchmark starts no configuration variant after --budget-s (120 s); the timeout leaves room for the last.
    timeout "${KVD_BENCH_TIMEOUT:-200}" python3 bench/gpu_transfer.py --trace-dir "$out/traces" "${@:2}" \
        > "$out/gpu_bench.json" 2> "$out/gpu_bench.err"
    echo "bench rc $?"
    tail -40 "$out/gpu_bench.err"  # ends with the benchmark's summary table
fi

if [[ -n "${KVD_TESTS_AGAIN_WITH:-}" ]]; then
    for file in $(grep -l "mark.cuda" tests/kvd/test_*.py tests/security/test_*.py); do
        KVD_TEST_DAEMON_ENV="$KVD_TESTS_AGAIN_WITH" timeout "${KVD_TEST_TIMEOUT:-150}" python3 -m pytest -q \
            -p no:cacheprovider --tb=short -rfE -o faulthandler_timeout=90 -m cuda "$file" 2>&1 \
            | tee -a "$out/cuda_tests_again.log"
        echo "$file rc ${PIPESTATUS[0]} ($KVD_TESTS_AGAIN_WITH)" | tee -a "$out/cuda_tests_again.log"
    done
fi

if [[ -n "${KVD_INTERFERENCE:-}" ]]; then
    configs=(--config default:)
    for spec in $KVD_INTERFERENCE; do configs+=(--config "$spec"); done
    timeout "${KVD_INTERFERENCE_TIMEOUT:-300}" python3 bench/gpu_interference.py "${configs[@]}" \
        > "$out/interference.json" 2> "$out/interference.err"
    echo "interference bench rc $?"
    tail -8 "$out/interference.err"
fi

if [[ "${KVD_IN_STEP:-0}" == 1 ]]; then
    timeout 90 python3 bench/gpu_in_step.py --budget-s 45 > "$out/in_step.json" 2> "$out/in_step.err"
    echo "in-step bench rc $?"
    cat "$out/in_step.json"
    tail -5 "$out/in_step.err"
fi

if [[ -n "${KVD_COMPARE:-}" ]]; then
    timeout 60 python3 bench/event_wait.py > "$out/event_wait.json" 2>> "$out/gpu_bench.err"
    cat "$out/event_wait.json"
    compare=()
    for kv in $KVD_COMPARE; do compare+=(--daemon-env "$kv"); done
    timeout "${KVD_BENCH_TIMEOUT:-200}" python3 bench/gpu_transfer.py --no-variants "${compare[@]}" "${@:2}" \
        > "$out/gpu_bench_compare.json" 2>> "$out/gpu_bench.err"
    echo "compare bench rc $?"
    cat "$out/gpu_bench_compare.json"
fi

if [[ "${KVD_SANITIZE:-0}" == 1 ]] && command -v compute-sanitizer > /dev/null; then
    : > "$out/sanitizer.txt"
    for tool in ${KVD_SANITIZE_TOOLS:-memcheck racecheck}; do
        logs=$(mktemp -d)
        KVD_TEST_DAEMON_WRAPPER="compute-sanitizer --tool $tool --log-file $logs/%p.log" \
            timeout "${KVD_SANITIZE_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -m cuda \
            tests/kvd/test_cuda_ipc.py -k "bytes_identical or ordering" 2>&1 | tail -5 >> "$out/sanitizer.txt"
        { echo "== $tool"; cat "$logs"/*.log; } >> "$out/sanitizer.txt" 2>&1
    done
    grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$out/sanitizer.txt"
fi

if [[ "${KVD_PROFILE:-0}" == 1 ]] && command -v py-spy > /dev/null; then
    python3 bench/gpu_transfer.py --no-variants "${@:2}" > "$out/gpu_bench_profiled.json" 2>> "$out/gpu_bench.err" &
    bench=$!
    daemon=
    for _ in $(seq 300); do
        daemon=$(pgrep -P "$bench" -f "kvd serve") && break
        sleep 0.1
    done
    for who in daemon bench; do
        timeout 90 py-spy record --pid "${!who}" --duration 60 --rate 1000 --threads --idle --nonblocking \
            --format raw -o "$out/pyspy_$who.txt" > /dev/null 2>&1 &
    done
    timeout 120 tail --pid "$bench" -f /dev/null
    echo "profiled bench done"
    wait
    cat "$out/gpu_bench_profiled.json"
fi
