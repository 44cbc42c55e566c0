# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo demo-headless test lint bench

PY := .venv/bin/python
XVFB := $(shell [ -z "$$DISPLAY" ] && command -v xvfb-run >/dev/null && echo "xvfb-run -a -s '-screen 0 1600x1000x24'")

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m napari_selfreg.demo

demo-headless: setup
	$(PY) -m napari_selfreg.demo --headless

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(XVFB) $(PY) -m pytest -p no:cacheprovider

bench: setup
	$(PY) benchmarks/inference.py
