#!/usr/bin/env bash
# The GPU checks of one device session, in one go (docs/BENCHMARKS.md records the figures):
#   1. the fused kernels' tests on CUDA (tests/client_hooks/test_fused.py, test_stats.py);
#   2. bench/fused_check.py: fused vs torch path vs NumPy, host cost per call, GPU ops per step;
#      bench/launches.py: Triton launches per every-step capture on the demo FNO;
#   3. bench/overhead.py on the demo FNO (width 64, modes 16, batch 64); then every_step against
#      none alone (profile_step.py measured 1.22x where overhead.py measured 1.50x), with the
#      default read-back ring and with one of 64 slots;
#   4. if .prev/ holds an earlier tree (git archive), its overhead.py right after, shorter;
#   5. bench/profile_step.py (ablations and a cProfile), PROFILE rounds (default 3; 0: skip).
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
set -o pipefail
python3 -m pytest -q -p no:cacheprovider tests/client_hooks/test_fused.py tests/client_hooks/test_stats.py 2>&1 | tail -15
rc_tests=$?
python3 bench/fused_check.py 2>&1 | tee "$OUT/fused_check.txt" | tail -22
rc_check=$?
python3 bench/launches.py --device cuda --width 64 --modes 16 --batch 64 --size 64 2>&1 | tee "$OUT/launches.txt"
ARGS="--device cuda --width 64 --modes 16 --batch 64 --epoch-steps 50"
python3 bench/overhead.py $ARGS --steps ${STEPS:-1000} 2>&1 | tee "$OUT/overhead.txt"
# the same every-step Tap with `none` only: does the harness's mix of variants change its cost?
python3 bench/overhead.py $ARGS --steps 500 --variants every_step 2>&1 | tee "$OUT/overhead_pair.txt" | tail -8
# the same pair with a read-back ring too large to run out (a slot is busy until the sender reads it)
python3 bench/overhead.py $ARGS --steps 500 --variants every_step --ring-slots 64 2>&1 | tee "$OUT/overhead_pair_ring.txt" | tail -8
if [ -d .prev ]; then
    echo "--- previous tree ($(cat .prev/REV 2>/dev/null)) ---"
    python3 .prev/bench/overhead.py $ARGS --steps ${PREV_STEPS:-300} 2>&1 | tee "$OUT/overhead_prev.txt" | tail -9
fi
# (not `| head`: a closed pipe would cut the profile short)
[ "${PROFILE:-3}" != 0 ] && python3 bench/profile_step.py --steps 50 --rounds ${PROFILE:-3} > "$OUT/profile.txt" 2>&1
[ -f "$OUT/profile.txt" ] && head -12 "$OUT/profile.txt"
echo "tests rc=$rc_tests, fused_check rc=$rc_check"
[ "$rc_tests" = 0 ] && [ "$rc_check" = 0 ]
