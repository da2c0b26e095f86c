#!/usr/bin/env bash
# The GPU checks, in one go (under 8 minutes on one GPU): scripts/gpu_check.sh [--device cuda|cuda:N|cpu] [--smoke]
#
#   1. tests/cuda (pytest -m cuda): every method on the embedded model on the device equals the CPU run
#      (grid ratios, integer codes, accuracy within 0.3 points), and a bf16 run on the device;
#   2. qig quantize --device DEVICE for a few methods on the embedded model, each followed by qig eval;
#   3. benchmarks/scale.py at LLaVA-OneVision-7B's decoder dimensions (hidden 3584, intermediate 18944,
#      28/4 heads), 2 layers, 128 samples: seconds per layer, peak host and device memory.
#
# --device cpu (or --smoke) is the smoke mode: the same steps on the CPU, small (the device-vs-CPU tests then
# compare the CPU with itself; fewer samples and questions; step 3 on Qwen2-0.5B's dimensions, 1 layer, 2 samples),
# a few minutes on two cores. Uses the repository's .venv (bash scripts/install.sh; on a GPU machine install the
# CUDA torch into .venv first). Step 3's methods and search grid: SCALE_METHODS, SCALE_N_GRID.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

DEVICE=cuda
SMOKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value: cuda, cuda:N or cpu}"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (allowed: --device cuda|cuda:N|cpu, --smoke)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cpu) SMOKE=1 ;;
  cuda | cuda:[0-9]*) ;;
  *) echo "error: --device $DEVICE is not cuda, cuda:N or cpu" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [[ ! -x $PY ]]; then
  echo "error: $PY not found; run bash scripts/install.sh first (with the CUDA torch in .venv on a GPU machine)" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [[ $DEVICE == cuda* ]] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: .venv's torch sees no CUDA device; install a CUDA build of torch, or run --device cpu" >&2
  exit 2
fi

if [[ $SMOKE == 1 ]]; then
  TEST_SAMPLES=8 TEST_EVAL=200 CLI_SAMPLES=16 CLI_EVAL=200
  SCALE=(--decoder qwen2-0.5b --depths 1 --n-samples 2 --n-grid "${SCALE_N_GRID:-2}")
  SCALE_METHODS=${SCALE_METHODS:-rtn awq qig gptq}
else
  TEST_SAMPLES=16 TEST_EVAL=1000 CLI_SAMPLES=64 CLI_EVAL=1000
  SCALE=(--decoder qwen2-7b --depths 2 --n-samples 128 --n-grid "${SCALE_N_GRID:-10}")
  SCALE_METHODS=${SCALE_METHODS:-rtn awq qig gptq}
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/qig-gpu-check.XXXXXX")
SUMMARY=()
STEP=""
T0=$SECONDS
finish() {
  local rc=$?
  echo
  echo "== gpu_check summary (device $DEVICE$([[ $SMOKE == 1 ]] && echo ', smoke mode'), $((SECONDS - T0)) s) =="
  local line
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  if [[ $rc -ne 0 ]]; then
    echo "  FAILED in: ${STEP:-setup} (exit $rc); work files kept in $WORK"
  else
    echo "  all checks passed"
    rm -rf "$WORK"
  fi
}
trap finish EXIT

# 1. device == CPU, method by method
STEP="1. tests/cuda (pytest -m cuda)"
start=$SECONDS
echo "== $STEP on $DEVICE: $TEST_SAMPLES calibration samples, $TEST_EVAL eval questions"
QIG_TEST_DEVICE=$DEVICE QIG_TEST_SAMPLES=$TEST_SAMPLES QIG_TEST_EVAL_N=$TEST_EVAL \
  $PY -m pytest -q -m cuda -p no:cacheprovider tests/cuda | tee "$WORK/pytest.txt"
SUMMARY+=("$STEP: $(grep -E '[0-9]+ (passed|failed)' "$WORK/pytest.txt" | tail -1) ($((SECONDS - start)) s)")

# 2. the CLI on the device, then qig eval
cli_run() {
  local name=$1
  shift
  STEP="2. qig quantize $name --device $DEVICE + qig eval"
  start=$SECONDS
  echo "== $STEP"
  $PY -m qig quantize --device "$DEVICE" "$@" --n-samples "$CLI_SAMPLES" --output "$WORK/$name" --no-progress \
    | tail -3
  $PY -m qig eval --model "$WORK/$name" --device "$DEVICE" --limit "$CLI_EVAL" --json "$WORK/$name.json" | tail -2
  local acc
  acc=$($PY - "$WORK/$name.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
fid = r.get("fidelity") or {}
print(f"{100 * r['accuracy']:.1f}% on {r['n']} questions, agreement {100 * fid.get('agreement', float('nan')):.1f}%, "
      f"KL {fid.get('kl', float('nan')):.4f}")
if r["accuracy"] < 0.85:
    sys.exit(f"{sys.argv[1]}: accuracy {r['accuracy']:.3f} is below 0.85 (the embedded model's searches keep ~97%)")
EOF
  )
  SUMMARY+=("qig quantize $name + eval: $acc ($((SECONDS - start)) s)")
}
cli_run awq-w3 --method awq --wbits 3 --group-size 128
cli_run qig-w3 --method qig --wbits 3 --group-size 128
cli_run gptq-qig-w3 --method gptq --token-weights qig --wbits 3 --group-size 128
cli_run qig-w4a8 --method qig --wbits 4 --abits 8

# 3. LLaVA-OneVision-7B decoder layers (smoke: Qwen2-0.5B's), random weights
STEP="3. benchmarks/scale.py ${SCALE[*]} --methods $SCALE_METHODS"
start=$SECONDS
echo "== $STEP --device $DEVICE"
# shellcheck disable=SC2086  # SCALE_METHODS is a list of words
$PY benchmarks/scale.py "${SCALE[@]}" --methods $SCALE_METHODS --device "$DEVICE" --scratch "$WORK" \
  --json "$WORK/scale.json" | tee "$WORK/scale.txt"
SUMMARY+=("$STEP: $(($(wc -l <"$WORK/scale.txt") - 2)) runs ok ($((SECONDS - start)) s); table:")
while IFS= read -r line; do SUMMARY+=("  $line"); done < <(tail -n +2 "$WORK/scale.txt")
STEP=""
