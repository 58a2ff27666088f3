#!/usr/bin/env bash
# Set up everything napari-m2ort needs on a Debian machine: the system libraries Qt and
# OpenGL need (plus Xvfb for headless use, and g++ for the optional torch.compile), then
# a virtual environment in .venv with the package, its test extras and the torch pins
# from constraints.txt (CPU torch, no CUDA downloads). Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="xvfb xauth libgl1 libegl1 libglib2.0-0 libdbus-1-3 libfontconfig1 libxkbcommon0
libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-xfixes0 g++"

if command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "Installing system packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
FIND_LINKS=""
[ -d /opt/wheels ] && FIND_LINKS="--find-links /opt/wheels"
log=$(mktemp)
if ! .venv/bin/python -m pip install -q $FIND_LINKS -c constraints.txt -e '.[test]' >"$log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
.venv/bin/python -c "import napari_m2ort, timm; print('napari-m2ort', napari_m2ort.__version__, 'ready')"
