#!/usr/bin/env bash
# Set up everything napari-m2ort needs on a Debian machine: the system libraries Qt and
# OpenGL need (plus Xvfb for headless use, and g++ for the optional torch.compile), then
# a virtual environment in .venv with torch, the package and its test extras, all through
# the pins in constraints.txt. Safe to run again: it only installs what is missing.
#
# Which torch build (README, "Installing torch (CPU or CUDA)"):
#   M2ORT_TORCH=auto   default: the CUDA build where nvidia-smi sees a GPU, else the CPU build
#   M2ORT_TORCH=cpu    the CPU build (from https://download.pytorch.org/whl/cpu when reachable)
#   M2ORT_TORCH=cuda   the CUDA build (PyPI's Linux wheels)
#   M2ORT_TORCH=skip   leave torch alone: you installed the build you want into .venv
#   M2ORT_TORCH_INDEX=URL  take torch from URL instead, e.g. https://download.pytorch.org/whl/cu128
# e.g.  M2ORT_TORCH=cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_torch.sh

step() { printf '\n==> %s\n' "$*"; }
# pip, minus the warning this machine's config prints for every package (an empty index folder)
pip_install() {
  { .venv/bin/python -m pip install $FIND_LINKS "$@" 2>&1 1>&3 3>&- |
    { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }; } 3>&1
}

mode=$(m2ort_torch_mode)

APT_PKGS="xvfb xauth libgl1 libegl1 libglib2.0-0 libdbus-1-3 libfontconfig1 libxkbcommon0
libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-xfixes0 g++"

step "1/4 system packages (Qt, OpenGL, Xvfb, g++)"
if command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "Installing:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
  else
    echo "all present"
  fi
else
  echo "no apt-get: install Qt's and OpenGL's libraries with your package manager if napari fails to start"
fi

step "2/4 virtual environment .venv"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then
  echo "exists ($(.venv/bin/python --version))"
else
  "$PY" -m venv .venv
  echo "created with $("$PY" --version)"
fi

if [ "$mode" = skip ]; then
  step "3/4 torch: M2ORT_TORCH=skip, left as it is"
else
  step "3/4 torch ($mode build)"
  want=$(m2ort_pin torch)
  read -r have_version have_build <<<"$(m2ort_installed_torch .venv/bin/python)" || true
  if [ "${have_version%%+*}" = "$want" ] && [ "${have_build:-}" = "$mode" ]; then
    echo "torch $have_version ($have_build build) already installed"
  else
    m2ort_torch_plan .venv/bin/python "$mode"
    if [ "${have_version%%+*}" = "$want" ] && [ "$mode" = cpu ] && [ ${#TORCH_PIP_ARGS[@]} = 0 ]; then
      # Reinstalling from the same indexes would bring the same build back.
      echo "torch $have_version ($have_build build) kept: no CPU build is offered by $TORCH_SOURCE"
    else
      if [ -n "${have_version:-}" ] && [ "${have_build:-}" != "$mode" ]; then
        echo "replacing torch $have_version ($have_build build) by the $mode build"
        .venv/bin/python -m pip uninstall -y torch torchvision
      fi
      echo "from $TORCH_SOURCE"
      pip_install --progress-bar on ${TORCH_PIP_ARGS[@]+"${TORCH_PIP_ARGS[@]}"} -c constraints.txt "${TORCH_REQS[@]}"
    fi
  fi
fi

step "4/4 napari-m2ort and its test extras (editable)"
pip_install --progress-bar on -c constraints.txt -e '.[test]'

step "check"
.venv/bin/python - "$mode" <<'EOF'
import sys

import torch

import napari_m2ort

mode = sys.argv[1]
if torch.version.cuda:
    build = f"CUDA {torch.version.cuda} build; GPU usable: {'yes' if torch.cuda.is_available() else 'no'}"
elif getattr(torch.version, "hip", None):
    build = f"ROCm {torch.version.hip} build"
else:
    build = "CPU build"
print(f"torch {torch.__version__} ({build})")
if mode == "cpu" and torch.version.cuda:
    print(
        "note: the CUDA build was installed on a machine without an NVIDIA GPU (no CPU build "
        "was reachable). It runs on the CPU, but is ~3 GB larger. See README, "
        '"Installing torch (CPU or CUDA)".'
    )
if mode == "cuda" and not torch.version.cuda:
    print(
        "note: an NVIDIA GPU was found but the CPU build is installed (a CPU wheel was "
        "preferred by pip's configuration). Rerun with M2ORT_TORCH=cuda and "
        "M2ORT_TORCH_INDEX=https://download.pytorch.org/whl/cu128 (your CUDA version)."
    )
print("napari-m2ort", napari_m2ort.__version__, "ready")
EOF
