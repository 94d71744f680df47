# Two commands matter: `make run` (the main job) and `make test` (the whole suite).
# Both create the virtual environment on first use; nothing is downloaded at run time but packages.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench install clean full

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/iterlayers reproduce all --quick --out results

full: $(STAMP)
	$(BIN)/iterlayers reproduce all --full --out results

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_torchdeq.py --out results/bench
	$(BIN)/python benchmarks/bench_training.py --out results/bench
	$(BIN)/python benchmarks/bench_shine.py --out results/bench

clean:
	rm -rf $(VENV) results build *.egg-info src/*.egg-info
