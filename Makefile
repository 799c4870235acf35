# Two commands on a fresh machine with Python 3.11, bash and make:
#   make demo   train PL-Net on the built-in synthetic_persons, evaluate and export (minutes)
#   make test   install what the tests need and run the whole suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu

.PHONY: install install-test demo test test-fast benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# reid-tf and TensorFlow only: what the demo and the tools need (no optional engine).
$(VENV)/.installed: $(BIN)/python setup.py
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The test extra on top: pytest and every optional engine the tests exercise (ONNX, LiteRT,
# Milvus Lite, Apache Beam, Playwright).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS),test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

DEMO_WORKDIR ?= runs/synthetic_persons_plnet_tiny_128x64

demo: install
	$(BIN)/reid-train --flagfile=experiments/synthetic_persons_plnet_tiny_128x64.flags \
		--workdir=$(DEMO_WORKDIR)

# Two processes, whole files each (module fixtures built once): the suite is mostly
# subprocesses starting TensorFlow, so it takes about half the time of one process.
test: install-test
	$(BIN)/pytest -q -n 2 --dist loadfile

# The fast lane: everything but the tests marked slow (they train, serve, or start a browser or
# a tool in a process); under 2 minutes on 2 cores. `make test` stays the whole suite (CI).
test-fast: install-test
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not slow"

benchmarks: install-test
	$(BIN)/python benchmarks/part_partition.py
	REID_TF_SHARED_DIR=$${REID_TF_SHARED_DIR:-../shared} $(BIN)/python benchmarks/input_pipeline.py
	REID_TF_SHARED_DIR=$${REID_TF_SHARED_DIR:-../shared} $(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/evaluation.py
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) build *.egg-info
