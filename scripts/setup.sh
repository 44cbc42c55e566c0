#!/usr/bin/env bash
# Set up everything napari-selfreg needs on a fresh Debian machine:
# a headless X server and Qt's system libraries (when root), a virtual
# environment in .venv with the pinned CPU build of torch, and the package.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
# Where torch comes from: empty = pip's own sources (a CPU wheel where one is at hand, as
# on our machines); on a bare Linux box PyPI's torch is the CUDA build, so pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (or a CUDA index for a GPU).
TORCH_INDEX=${TORCH_INDEX:-}
APT_PACKAGES="xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0
  libxcb-xinerama0 libxcb-xkb1 libdbus-1-3 libfontconfig1"

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
elif ! command -v xvfb-run >/dev/null; then
  echo "setup: not root; install these Debian packages for headless runs: $APT_PACKAGES" >&2
fi

stamp=.venv/.napari-selfreg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # Pin the CPU build first: a bare torch requirement would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_PIN"
  .venv/bin/python -m pip install -q -e ".[qt,test,slicer,export]"
  touch "$stamp"
fi
echo "setup: ready (.venv)"
