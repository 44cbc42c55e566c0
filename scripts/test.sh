#!/usr/bin/env bash
# The README's test command after set-up: lint, import contracts, then the whole test
# suite, under a virtual X server when there is no display. The display is decided
# here, at run time, after scripts/setup.sh has installed Xvfb (a Makefile variable
# would be fixed before set-up ran, so a first run on a fresh machine had no display).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" -m ruff check .
"$PY" -m ruff format --check .
PYTHONPATH=. .venv/bin/lint-imports
run=("$PY" -m pytest -p no:cacheprovider "$@")
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  if command -v xvfb-run >/dev/null; then
    exec xvfb-run -a -s "-screen 0 1600x1000x24" "${run[@]}"
  fi
  echo "test: no display and no xvfb-run: the GUI tests run with Qt's offscreen platform" >&2
  export QT_QPA_PLATFORM=offscreen
fi
exec "${run[@]}"
