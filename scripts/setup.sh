#!/usr/bin/env bash
# Idempotent set-up of everything percept needs, from the project's own files:
# Debian build libraries, a .venv with the pinned requirements, pillow-simd built last
# (AVX2 when the CPU has it, SSE4 otherwise), the project itself, and the offline assets.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-}
STAMP=$VENV/.percept-setup
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages: headers pillow-simd compiles against (JPEG, zlib, WebP, TIFF, FreeType,
#    and littlecms for colour management: CIELAB images, ICC profiles), openssl, whose
#    certificate recipe in deploy/README.md a test runs, and prometheus (with promtool), which
#    the tests of the alerting rules and the dashboard run. On a machine with systemd, the
#    package enables and starts a Prometheus service; set-up stops and disables it again.
APT_PKGS="libjpeg-dev zlib1g-dev libwebp-dev libtiff-dev libfreetype-dev liblcms2-dev openssl prometheus"
missing=""
# installed, not merely known: a removed package keeps its configuration, and `dpkg -s`
# still answers 0 for it ("deinstall ok config-files")
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
for p in $APT_PKGS; do installed "$p" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    log "apt-get install$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    if [[ " $missing " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
  else
    log "missing Debian packages:$missing (run as root, or: sudo apt-get install$missing)"; exit 1
  fi
fi

# 2. The virtual environment. torch==2.13.0's CPU wheel lies on disk for Python 3.11.
if [ ! -x $VENV/bin/python ]; then
  if [ -z "$PY" ]; then
    if command -v python3.11 >/dev/null; then PY=python3.11; else PY=python3; fi
  fi
  log "creating $VENV with $($PY --version)"
  $PY -m venv $VENV
fi
VPY=$VENV/bin/python

# 3. Pinned requirements, re-installed only when requirements.txt or this script changed.
#    --no-compile: pip would byte-compile every file of every package (about 90 s on 2
#    cores); step 6 compiles only what percept imports.
want=$(cat requirements.txt scripts/setup.sh scripts/warm_bytecode.py | sha256sum | cut -c1-16)
have=$(cat $STAMP 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  log "installing pinned requirements (requirements.txt)"
  $VPY -m pip install -q --no-compile --upgrade pip wheel setuptools
  $VPY -m pip install -q --no-compile -r requirements.txt
  rm -f $VENV/.pillow-simd
fi

# 4. pillow-simd last: anything depending on Pillow reinstalls stock Pillow over it. Built
#    again where an earlier build lacks littlecms (its headers came with step 1).
if ! $VPY -c "import PIL, PIL.features as f, sys
sys.exit(0 if 'post' in PIL.__version__ and f.check('littlecms2') else 1)" 2>/dev/null; then
  if grep -qw avx2 /proc/cpuinfo; then SIMD="-mavx2"; else SIMD="-msse4"; fi
  log "building pillow-simd 12.1.1.post0 with CC='cc $SIMD' (about 30 s)"
  $VPY -m pip uninstall -q -y pillow pillow-simd >/dev/null 2>&1 || true
  CC="cc $SIMD" $VPY -m pip install -q --no-compile --no-cache-dir --no-binary :all: --no-build-isolation pillow-simd==12.1.1.post0
fi

# 5. The project itself (editable; console script `percept`).
if ! $VPY -c "import services, training, percept.v1" 2>/dev/null || [ "$want" != "$have" ]; then
  log "installing percept (editable)"
  $VPY -m pip install -q --no-compile --no-deps --no-build-isolation -e .
fi

# 6. Bytecode for what percept and its tests import (written even where the environment
#    sets PYTHONDONTWRITEBYTECODE; otherwise every process would compile torch again).
if [ "$want" != "$have" ]; then
  $VPY scripts/warm_bytecode.py
fi

# 7. Offline assets (VGG19 weights, style paintings, WordNet 3.0 nouns), checked by sha256.
$VPY -m training.assets fetch

# 8. Word vectors of all 82,115 WordNet noun synsets (all-MiniLM-L6-v2), built once and
#    cached by content hash under assets/vectors/ (minutes on a CPU; skipped when cached).
HF_HUB_OFFLINE=1 $VPY -m services.embed.word_vectors build --threads "$(nproc)"

echo "$want" > $STAMP
log "ready: $($VPY -c 'import PIL, torch, grpc; print(f"PIL {PIL.__version__}, torch {torch.__version__}, grpcio {grpc.__version__}")')"
