#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for raytransfer: system libraries FFCV builds against, an offline
# WordNet, Chromium for the report test, a virtualenv with the package. Idempotent: a second run only
# does what is missing. Usage: bash scripts/setup.sh   (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RAYTRANSFER_VENV:-.venv}
TORCH_SPEC=${RAYTRANSFER_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
APT_PACKAGES="build-essential pkg-config python3-dev python3-venv libturbojpeg0-dev libopencv-dev wordnet-base wordnet-sense-index chromium"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "[setup] apt-get install:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing > /tmp/raytransfer-apt.log \
        || { tail -20 /tmp/raytransfer-apt.log; exit 1; }
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] pip install $TORCH_SPEC"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
    "$PY" -c "import torch, torchvision"
fi
stamp="$VENV/.raytransfer-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$PY" -c "import raytransfer, ffcv, ray" 2>/dev/null; then
    echo "[setup] pip install -e .[dev]"
    "$PY" -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    "$PY" -c "import raytransfer, ffcv, ray"
    touch "$stamp"
fi
echo "[setup] ready: $VENV"
