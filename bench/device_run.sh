#!/usr/bin/env bash
# The GPU checks of one device session, in one go (docs/BENCHMARKS.md records the figures):
#   1. the fused kernels' tests on CUDA (tests/client_hooks/test_fused.py, test_stats.py), and
#      test_tap.py's CUDA cases (AMP with a GradScaler, gradient accumulation, torch.compile);
#      bench/compile_check.py (a compiled model's step times under a Tap);
#   2. (not with QUICK=1) bench/fused_check.py: fused vs torch path vs NumPy, host cost per
#      call, GPU time the capture adds kernel by kernel; bench/launch_cost.py: host time of a
#      Triton launch, JIT path against the launcher; bench/partials_bandwidth.py: the grouped
#      partials kernel's GPU time (this tree's also by block size and warps), for this tree
#      and .prev/ when it is there;
#   3. bench/capture_memory.py: the peak memory of a capture step against a plain one
#      (printed only: $OUT returns at most 8 files);
#      bench/overhead.py on the demo FNO (width 64, modes 16, batch 64), STEPS (default 600);
#   4. if .prev/ holds an earlier tree (git archive), its overhead.py right after, PREV_STEPS;
#      AB=N repeats 3 and 4 N times, alternated;
#   5. every_step against none alone, PAIR_STEPS (0: skip); the full harness has measured
#      more for the same Tap (1.52x against 1.32x on one H100);
#   6. LAUNCHES=1: bench/launches.py (Triton launches per every-step capture);
#      PROFILE=N: bench/profile_step.py, N rounds of the ablations, host timers per entry point
#      (and the same for .prev/ when it is there); DIFF=1: bench/profile_step.py --diff (the
#      functions whose own time differs most between none and every_step, and each one's GPU
#      kernel time a step).
#   ONLY=goal: instead of all that, the every-step goal alone: the kernels' tests, then
#      bench/partials_bandwidth.py (this tree's with --sweep: other block sizes and warps),
#      and overhead.py (gate_off, default, every_step; STEPS, default 400) for this tree and
#      .prev/, alternated AB times (default 2).
#   ONLY=compile: instead of all that, test_tap.py's CUDA and torch.compile cases, then
#      bench/compile_check.py with inductor for this tree and for .prev/ when it is there.
# Exits non-zero when the tests or fused_check failed.
# Needs python3 with torch and Triton; pyzmq/msgspec from .whl/ when missing. Output: $OUT.
set -u
OUT=${OUT:-/tmp/tensortap-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import zmq, msgspec" 2>/dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# the host: the every-step figure depends on it (run 1 of the sixth session: a slower host, 1.52x)
echo "cpus $(nproc), cgroup cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo -), load $(cut -d' ' -f1-3 /proc/loadavg)"
# the host's Python speed: a pure-Python loop (the project's VM: 0.12-0.19 s; the ninth
# session's four H100 hosts 0.13-0.20 s)
python3 -c "import time; t = time.perf_counter(); [sum(range(100)) for _ in range(200000)]; print(f'host Python: {time.perf_counter() - t:.3f} s for the reference loop')"
if [ "${ONLY:-}" = compile ]; then
    python3 -m pytest -q -p no:cacheprovider tests/client_hooks/test_tap.py -k "cuda or compile" > "$OUT/tests_tap.txt" 2>&1
    rc_tap=$?
    grep "^E  \|passed\|failed" "$OUT/tests_tap.txt" | tail -12
    for tree in . .prev; do
        [ -d "$tree/client_hooks" ] || continue
        echo "--- compile_check, tree $tree ($(cat $tree/REV 2>/dev/null || echo this)) ---"
        timeout 200 python3 bench/compile_check.py --backend inductor --tree "$tree" 2>&1 | grep -v "Warning\|^  \|^W" | tail -9
    done
    echo "tests rc=$rc_tap"
    exit $rc_tap
fi
ARGS="--device cuda --width 64 --modes 16 --batch 64 --epoch-steps 50"
bandwidth() {  # the grouped partials kernel: this tree by block size and warps, then .prev/'s
    python3 bench/partials_bandwidth.py --sweep 2>&1 | tail -10
    [ -d .prev/client_hooks ] && python3 bench/partials_bandwidth.py --tree .prev 2>&1 | tail -4
}
if [ "${ONLY:-}" = goal ]; then  # the every-step goal alone: kernels, then this tree and .prev/ alternated
    python3 -m pytest -q -p no:cacheprovider tests/client_hooks/test_fused.py tests/client_hooks/test_stats.py \
        > "$OUT/tests.txt" 2>&1
    rc_tests=$?
    tail -3 "$OUT/tests.txt"
    bandwidth
    for ab in $(seq 1 "${AB:-2}"); do
        for tree in . .prev; do
            [ -d "$tree/client_hooks" ] || continue
            echo "--- tree $tree ($(cat $tree/REV 2>/dev/null || echo this)), pass $ab ---"
            python3 $tree/bench/overhead.py $ARGS --steps ${STEPS:-400} --variants gate_off,default,every_step 2>&1 \
                | tail -9
        done
    done
    echo "tests rc=$rc_tests"
    exit $rc_tests
fi
python3 -m pytest -q -p no:cacheprovider tests/client_hooks/test_fused.py tests/client_hooks/test_stats.py > "$OUT/tests.txt" 2>&1
rc_tests=$?
tail -4 "$OUT/tests.txt"
# Tap on the GPU, through a real socket: AMP (GradScaler, autocast) and gradient accumulation;
# and the torch.compile cases on the device image's torch (untraced hooks, compiled graphs)
python3 -m pytest -q -p no:cacheprovider tests/client_hooks/test_tap.py -k "cuda or compile" > "$OUT/tests_tap.txt" 2>&1
rc_tap=$?
tail -3 "$OUT/tests_tap.txt"
[ "$rc_tap" = 0 ] || rc_tests=$rc_tap
rc_check=0
if [ "${QUICK:-0}" != 1 ]; then
    python3 bench/fused_check.py > "$OUT/fused_check.txt" 2>&1
    rc_check=$?
    grep -v "^ok " "$OUT/fused_check.txt"
    python3 bench/launch_cost.py > "$OUT/launch_cost.txt" 2>&1
    tail -2 "$OUT/launch_cost.txt"
    # the grouped partials kernel's GPU time over the demo's activations, this tree and .prev/
    bandwidth
fi
# torch.compile under a Tap: one compilation, then no capture step recompiles (the earlier
# code took up to 55 s at a capture step with inductor; thirteenth session)
timeout 120 python3 bench/compile_check.py --backend inductor 2>&1 | grep -v "Warning\|^  \|^W" | tail -9
python3 bench/capture_memory.py --device cuda --width 64 --modes 16 --batch 64 --size 64 2>&1 | tail -12
# AB=N: this tree and .prev/ alternated N times (STEPS and PREV_STEPS each time): a machine
# whose speed drifts within the call then tilts neither (one pass each tilted three calls
# of the ninth session by up to 6 points, `gate_off` reading 0.94-1.02x)
for ab in $(seq 1 "${AB:-1}"); do
    python3 bench/overhead.py $ARGS --steps ${STEPS:-600} > "$OUT/overhead_$ab.txt" 2>&1
    echo "--- this tree, pass $ab ---"
    cat "$OUT/overhead_$ab.txt"
    if [ -d .prev ]; then
        echo "--- previous tree ($(cat .prev/REV 2>/dev/null)), pass $ab ---"
        python3 .prev/bench/overhead.py $ARGS --steps ${PREV_STEPS:-250} > "$OUT/overhead_prev_$ab.txt" 2>&1
        tail -9 "$OUT/overhead_prev_$ab.txt"
    fi
done
if [ "${PAIR_STEPS:-400}" != 0 ]; then
    python3 bench/overhead.py $ARGS --steps ${PAIR_STEPS:-400} --variants every_step > "$OUT/overhead_pair.txt" 2>&1
    tail -8 "$OUT/overhead_pair.txt"
fi
if [ "${LAUNCHES:-0}" = 1 ]; then
    python3 bench/launches.py --device cuda --width 64 --modes 16 --batch 64 --size 64 > "$OUT/launches.txt" 2>&1
    cat "$OUT/launches.txt"
fi
if [ "${PROFILE:-0}" != 0 ]; then
    python3 bench/profile_step.py --steps 50 --rounds ${PROFILE} --timers --no-cprofile > "$OUT/profile.txt" 2>&1
    cat "$OUT/profile.txt"
    if [ -d .prev ]; then  # the same host timers for the previous tree, on this machine
        echo "--- previous tree ($(cat .prev/REV 2>/dev/null)), profile ---"
        python3 .prev/bench/profile_step.py --steps 50 --rounds ${PROFILE} --timers --no-cprofile \
            > "$OUT/profile_prev.txt" 2>&1
        tail -22 "$OUT/profile_prev.txt"
    fi
fi
if [ "${DIFF:-0}" = 1 ]; then  # where every_step's host time goes, function by function (last:
    # torch.profiler reads the kernel time, and launches after it may run slower)
    python3 bench/profile_step.py --diff --steps 50 > "$OUT/profile_diff.txt" 2>&1
    grep -v -i warn "$OUT/profile_diff.txt" | head -40
fi
echo "tests rc=$rc_tests, fused_check rc=$rc_check"
[ "$rc_tests" = 0 ] && [ "$rc_check" = 0 ]
