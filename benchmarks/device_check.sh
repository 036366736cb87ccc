#!/usr/bin/env bash
# The accelerator check: jaxbn's benchmarks and numerical tests on JAX's default backend, in one call.
#
#   bash benchmarks/device_check.sh                              # on a GPU or TPU machine: under 7 minutes
#   OUT=/tmp/check bash benchmarks/device_check.sh               # results elsewhere (default: benchmarks/results/device)
#   JAX_PLATFORMS=cpu bash benchmarks/device_check.sh --smoke    # a dry run of every step, on small sizes
#
# Needs jax (with the accelerator's plugin), flax and optax; equinox and dm-haiku are compared when they are
# installed. jaxbn is imported from this checkout (PYTHONPATH), not installed. Every step has a time limit, so
# one that hangs or fails leaves the others' results. Writes into $OUT (6 files, no folders):
#
#   env.txt                   the machine, the accelerator (nvidia-smi), JAX and its devices
#   full_batch.{json,md}      the full-batch step against optax.MultiSteps on the same CNN and micro-batches:
#                             the default loop ("auto": the scanned one), the host loop, exact batch norm
#   batch_norm_*.{json,md}    the batch-norm layer against Flax, Haiku and Equinox (--gpu: large bfloat16 shapes
#                             and the achieved fraction of copy bandwidth)
#   tests.log                 the numerical tests (float64 oracles, peers) run on this backend
#
# The step limits add up to 6.5 minutes (a lent machine's 15 leave room for its start and one rerun); the whole
# run takes less where every step ends early.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# The contenders of benchmarks/full_batch.py: what users get by default, the loop the default does not pick,
# exact batch norm (its target is against "jaxbn + jaxbn BN" on the same loop).
CONTENDERS="optax.MultiSteps,jaxbn,jaxbn + jaxbn BN,jaxbn host loop,jaxbn exact BN"
FULL_BATCH_ARGS=(--repeats 7 --no-rss --no-buffers)
BATCH_NORM_ARGS=(--gpu --repeats 5 --resnet-batch 128 --resnet-stages 2)
TEST_FILES=(tests/test_functional.py tests/test_exact_batch_norm.py)
TEST_WORKERS=4  # processes, each allocating GPU memory as it needs it (not JAX's 75% up front)
LIMITS=(180 120 90)  # seconds: full_batch, batch_norm, tests
if [[ "${1:-}" == "--smoke" ]]; then
  FULL_BATCH_ARGS=(--quick --repeats 1 --check-steps 1 --no-rss --no-buffers)
  BATCH_NORM_ARGS=(--gpu --quick --repeats 1 --shapes "64,8,8,16" --resnet-batch 0)
  TEST_FILES=(tests/test_functional.py)
  TEST_WORKERS=2
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git log -1 --format="commit %H %s" 2>/dev/null
  uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 60 "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print('backend', jax.default_backend(), jax.devices())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
step() {  # step NAME LIMIT LOG COMMAND...: COMMAND under LIMIT seconds, its output also in $OUT/LOG ("-": none)
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS rc
  if [[ $log == - ]]; then
    timeout "$limit" "$@"
  else
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"  # pipefail: the command's exit status
  fi
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [[ $rc -eq 0 ]] || status=1
}

step "full-batch step against optax.MultiSteps" "${LIMITS[0]}" - \
  "$PYTHON" benchmarks/full_batch.py --contenders "$CONTENDERS" "${FULL_BATCH_ARGS[@]}" --out "$OUT"
step "batch-norm layer against its peers" "${LIMITS[1]}" - \
  "$PYTHON" benchmarks/batch_norm.py "${BATCH_NORM_ARGS[@]}" --out "$OUT"
step "numerical tests on the default backend" "${LIMITS[2]}" tests.log \
  env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -m pytest -q -n "$TEST_WORKERS" "${TEST_FILES[@]}"
ls -l "$OUT"
exit $status
