# The two commands in the README do all set-up on a fresh machine.
#   make demo  - create .venv, install slimlm, fetch the assets, run the default pipeline (small budget)
#   make test  - create .venv, install slimlm, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint bench-foundation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build through constraints.txt; pyproject.toml keeps a range.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the default pipeline at a small budget (teacher SFT -> OSSCAR student -> KD + on-policy -> INT8 -> eval),
# ending with runs/demo/report/report.md; re-running resumes. Full budget: slimlm run movielens-ranking
demo: $(STAMP)
	$(BIN)/slimlm fetch
	$(BIN)/slimlm run movielens-ranking-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check slimlm tests benchmarks

bench-foundation: $(STAMP)
	$(BIN)/python benchmarks/foundation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
