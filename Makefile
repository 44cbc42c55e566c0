# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo demo-headless test bench

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m napari_selfreg.demo

demo-headless: setup
	$(PY) -m napari_selfreg.demo --headless

test: setup
	bash scripts/test.sh

bench: setup
	$(PY) benchmarks/inference.py
