#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv/) with the pinned
# OpenMMLab 2.0 stack. Idempotent: when nothing changed it only checks a stamp
# and that mmcv's compiled ops import, which takes a few seconds.
#
# Environment knobs:
#   PYTHON            interpreter used to create .venv (default: python3.11)
#   MLLA_MM_CACHE     where the built mmcv wheel is cached
#                     (default: ${XDG_CACHE_HOME:-$HOME/.cache}/mlla-mm)
#   MAX_JOBS          parallel compile jobs for mmcv (default: nproc)
#   CPPFLAGS          kept for the mmcv build; MMCV_BUILD_CPPFLAGS is appended to it
#   SETUP_CPU_ONLY=1  build mmcv's CPU ops even where torch sees a GPU
#
# On a machine where torch sees a GPU, mmcv is built with its CUDA kernels for
# that GPU's architecture only (tools/cuda_setup.py: an nvcc of torch's CUDA
# major version from CUDA_HOME, /usr/local/cuda* or PATH, else NVIDIA's
# compiler packages from the package index installed into .venv) and cached
# under a name with the CUDA version and architecture (docs/gpu.md).
#
#   tools/setup_env.sh --check-cuda-toolchain
#     compiles two of mmcv's .cu files (nms, roi_align) with FORCE_CUDA=1, the pip
#     nvcc and the build's own flags, on any machine, .venv unchanged (make check-cuda-toolchain)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3.11}"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
MMSEG_VERSION=1.2.2
TIMM_VERSION=1.0.31
# ONNX export and its check (tools/export_onnx.py); optional for the package itself.
ONNX_VERSION=1.23.2
ONNXRUNTIME_VERSION=1.31.1
ONNXSCRIPT_VERSION=0.7.2
# torch 2.14 needs setuptools >= 77.0.3; mmengine still imports pkg_resources,
# which later setuptools releases dropped. (mmcv's own build wants < 70.)
SETUPTOOLS="setuptools>=77.0.3,<81"
# mmcv is compiled with Python's own CFLAGS ("-O3 -g ..."); -g0 drops the debug
# info, not the machine code: sample files compiled in 0.58-0.70x the time
# and the wheel shrinks from 32 MB to about 1.4 MB (docs/benchmarks.md, "mmcv
# build settings"; a whole build with -g0 was not timed). It travels in
# CPPFLAGS: setuptools 69.5.1 (the build's "<70") and 80 both append CPPFLAGS
# after Python's CFLAGS, while setuptools 80 lets CFLAGS replace them (no -O3).
MMCV_BUILD_CPPFLAGS="-g0"

log() { printf '[setup] %s\n' "$*" >&2; }

# The stamp changes whenever this script or the package metadata changes.
stamp_key() {
  cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.cfg" "$ROOT/pyproject.toml" 2>/dev/null | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.mlla-mm-setup"

# NMS and RoIAlign on the CPU, and on the GPU too where torch sees one (unless SETUP_CPU_ONLY=1):
# a CPU-only mmcv on a GPU machine fails here, so the set-up builds the CUDA one.
check_ops() {
  "$PY" - <<'PYEOF'
import os
import torch
from mmcv.ops import nms, RoIAlign
devices = ['cpu']
if torch.cuda.is_available() and os.environ.get('SETUP_CPU_ONLY', '0') in ('', '0'):
    devices.append('cuda')
for device in devices:
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]], device=device)
    scores = torch.tensor([0.9, 0.8, 0.7], device=device)
    dets, keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2], keep
    feat = torch.arange(64, dtype=torch.float32, device=device).view(1, 1, 8, 8)
    rois = torch.tensor([[0., 0., 0., 4., 4.]], device=device)
    out = RoIAlign((2, 2), 1.0, 0)(feat, rois)
    assert out.shape == (1, 1, 2, 2) and torch.isfinite(out).all()
    assert out.device.type == device, out.device
PYEOF
}

CACHE="${MLLA_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlla-mm}"

# --check-cuda-toolchain: compile mmcv's nms and roi_align CUDA files with the pip nvcc (bounded; any machine).
if [[ "${1:-}" == "--check-cuda-toolchain" ]]; then
  [[ -x "$PY" ]] || { log "ERROR: $PY missing: run tools/setup_env.sh (make setup) first"; exit 2; }
  SDIST="$CACHE/sdist/mmcv-$MMCV_VERSION.tar.gz"
  if [[ ! -f "$SDIST" ]]; then
    mkdir -p "$CACHE/sdist"
    TMPS="$(mktemp -d "$CACHE/tmp.XXXXXX")"
    trap 'rm -rf "$TMPS"' EXIT
    "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
      -d "$TMPS" "mmcv==$MMCV_VERSION" >&2
    mv "$TMPS/mmcv-$MMCV_VERSION.tar.gz" "$SDIST"
    rm -rf "$TMPS"
    trap - EXIT
  fi
  exec timeout "${CUDA_CHECK_TIMEOUT:-600}" "$PY" "$ROOT/tools/cuda_setup.py" check-toolchain \
    --sdist "$SDIST" --cache "$CACHE" "${@:2}"
fi

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_key)" ]]; then
  if check_ops; then
    log "environment up to date ($VENV)"
    exit 0
  fi
  log "mmcv ops check failed; repairing the environment"
fi

if [[ ! -x "$PY" ]]; then
  command -v "$PYTHON" >/dev/null || { log "ERROR: $PYTHON not found; set PYTHON=/path/to/python3.11"; exit 1; }
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$PY" -m pip install --disable-pip-version-check)

log "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

# mmcv: only a source archive exists; build it once per (mmcv, torch, python,
# machine, CPU or CUDA + architecture) and cache the wheel under a key that says so.
if ! "$PY" -c "import mmcv, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null || ! check_ops 2>/dev/null; then
  PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  # CPU ops, or CUDA kernels for this machine's GPU (tools/cuda_setup.py plan; no answer: CPU).
  MMCV_BUILD=cpu MMCV_CACHE_TAG=cpuops MMCV_CUDA_ARCH="" MMCV_CUDA="" MMCV_BUILD_NOTE=""
  PLAN="$("$PY" "$ROOT/tools/cuda_setup.py" plan 2>/dev/null || true)"
  eval "$PLAN"
  [[ -n "$MMCV_BUILD_NOTE" ]] && log "$MMCV_BUILD_NOTE"
  WHEELDIR="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PYTAG-$(uname -m)-$MMCV_CACHE_TAG"
  if ! ls "$WHEELDIR"/mmcv-*.whl >/dev/null 2>&1; then
    BUILD_ENV=()
    if [[ "$MMCV_BUILD" == cuda ]]; then
      TOOLCHAIN="$("$PY" "$ROOT/tools/cuda_setup.py" toolchain --venv "$VENV")" \
        || { log "ERROR: no CUDA compiler for torch's CUDA $MMCV_CUDA (see above); SETUP_CPU_ONLY=1 builds the CPU ops"; exit 1; }
      eval "$TOOLCHAIN"
      log "building mmcv $MMCV_VERSION with its CUDA kernels for TORCH_CUDA_ARCH_LIST=$MMCV_CUDA_ARCH with $CUDA_TOOLCHAIN"
      BUILD_ENV=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$MMCV_CUDA_ARCH" "CUDA_HOME=$CUDA_HOME")
    else
      log "building mmcv $MMCV_VERSION with its ops (one time: 5-10 minutes on 2 cores, up to 15 on slower CPUs)"
    fi
    "${PIP[@]}" "setuptools<70" wheel "numpy<3" ninja
    mkdir -p "$CACHE"
    TMPW="$(mktemp -d "$CACHE/tmp.XXXXXX")"
    # (The EXIT traps must not fail: under set -e a failing command in them, such as kill of a
    # ticker that already ended, makes the whole set-up exit 1 after it succeeded.)
    trap 'rm -rf "$TMPW"' EXIT
    "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
      -d "$TMPW/src" "mmcv==$MMCV_VERSION"
    # (kept for --check-cuda-toolchain)
    mkdir -p "$CACHE/sdist" && cp "$TMPW/src/mmcv-$MMCV_VERSION.tar.gz" "$CACHE/sdist/.part.$$" \
      && mv "$CACHE/sdist/.part.$$" "$CACHE/sdist/mmcv-$MMCV_VERSION.tar.gz" || true
    tar -xzf "$TMPW/src/mmcv-$MMCV_VERSION.tar.gz" -C "$TMPW/src"
    # torch >= 2.10 headers need C++20; mmcv 2.1.0's setup.py asks for C++17.
    sed -i "s/'-std=c++17'/'-std=c++20'/g" "$TMPW/src/mmcv-$MMCV_VERSION/setup.py"
    # A progress line a minute while the 77 C++ files compile (pip prints nothing useful).
    SRC="$TMPW/src/mmcv-$MMCV_VERSION"
    if [[ "$MMCV_BUILD" == cuda ]]; then
      # what mmcv 2.1.0's CUDA sources need for this CUDA / torch (tools/cuda_setup.py, MMCV_PATCHES)
      "$PY" "$ROOT/tools/cuda_setup.py" patch-mmcv "$SRC"
      NFILES=$({ find "$SRC/mmcv/ops/csrc/pytorch" \( -name '*.cpp' -o -name '*.cu' \) 2>/dev/null || true; } | wc -l)
    fi
    # (Its sleep is killed with it, so nothing holds the output open after the build.)
    ( start=$(date +%s)
      trap 'kill $nap 2>/dev/null; exit 0' TERM
      while sleep 60 & nap=$!; wait $nap; do
        done_o=$(find "$SRC/build" -name '*.o' 2>/dev/null | wc -l)
        mins=$(( ($(date +%s) - start) / 60 ))
        if [[ "$MMCV_BUILD" == cuda ]]; then  # the estimate: the rate so far, for the files left
          left=$(( done_o > 0 ? (NFILES - done_o) * mins / done_o : 0 ))
          log "building mmcv (CUDA): $mins min, $done_o of $NFILES files compiled" \
              "$( ((done_o > 0)) && echo "(about $left min left at this rate)" || echo "(the first ones take longest)")"
        else
          log "building mmcv: $mins min, $done_o of about 77 files compiled" \
              "(5-10 min in all on a 2-core Xeon, up to about 15 on slower CPUs)"
        fi
      done ) &
    TICKER=$!
    trap 'kill $TICKER 2>/dev/null || true; rm -rf "$TMPW"' EXIT
    (cd "$SRC" && env "${BUILD_ENV[@]}" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      CPPFLAGS="${CPPFLAGS:+$CPPFLAGS }$MMCV_BUILD_CPPFLAGS" \
      "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps --no-cache-dir \
      -w "$TMPW/wheel" .)
    kill $TICKER 2>/dev/null || true
    rm -rf "$WHEELDIR"
    mv "$TMPW/wheel" "$WHEELDIR"   # atomic: a killed build never leaves a half cache
    rm -rf "$TMPW"
    trap - EXIT
  else
    log "using cached mmcv wheel from $WHEELDIR"
  fi
  "${PIP[@]}" "numpy<3"
  "${PIP[@]}" --force-reinstall --no-deps "$WHEELDIR"/mmcv-*.whl
  "${PIP[@]}" addict "packaging" "Pillow" "pyyaml" "yapf" "opencv-python" "numpy<3"
fi

log "installing mmengine, mmdet, mmsegmentation, timm and this package"
"${PIP[@]}" "mmengine==$MMENGINE_VERSION" "mmdet==$MMDET_VERSION" "mmsegmentation==$MMSEG_VERSION" \
  ftfy regex "timm==$TIMM_VERSION" pycocotools "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
  "onnx==$ONNX_VERSION" "onnxruntime==$ONNXRUNTIME_VERSION" "onnxscript==$ONNXSCRIPT_VERSION" \
  "$SETUPTOOLS"
if [[ -f "$ROOT/setup.cfg" ]]; then
  "${PIP[@]}" --no-build-isolation -e "$ROOT[tests]" "torch==$TORCH_VERSION" "$SETUPTOOLS"
fi

"$PY" -c "import pkg_resources" 2>/dev/null || { log "ERROR: pkg_resources missing (setuptools too new for mmengine)"; exit 1; }
log "checking mmcv's compiled ops"
check_ops || { log "ERROR: mmcv.ops does not work in $VENV"; exit 1; }
"$PY" -c "import mmdet, mmseg, mmengine, timm; print('mmdet', mmdet.__version__, 'mmseg', mmseg.__version__, 'mmengine', mmengine.__version__, 'timm', timm.__version__)"
stamp_key > "$STAMP"
log "environment ready ($VENV)"
