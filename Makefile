# llm2slm: install / test / lint / smoke / demo / bench.  `make test` on a fresh machine sets up everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; on a GPU machine use e.g. `make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`
TORCH  ?= torch==2.13.0

.PHONY: install test test-fast lint smoke demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,demo,serve,int8]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check llm2slm_cli tests

smoke: install
	HF_HUB_OFFLINE=1 $(MAKE) -C recipes/smoke LLM2SLM=$(abspath $(BIN))/llm2slm PYTHON=$(abspath $(BIN))/python

clean:
	rm -rf runs recipes/*/runs

# The main job on an embedded default, offline: real pretrained MiniLM as the LLM, the pydoc task, SLM alone vs
# LLM-to-SLM, generate, eval, bench; prints the table, plots under runs/demo/bench/.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m llm2slm_cli.demo --out runs/demo --overwrite
