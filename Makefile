# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create their own virtual environment (.venv) and install pinned-enough dependencies.
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS  ?=
# Tested versions of every dependency (see constraints.txt); set CONSTRAINTS= to resolve freely.
CONSTRAINTS ?= constraints.txt
CONSTRAINT_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean help FORCE

help:
	@echo "make demo   - install into $(VENV) and run the end-to-end demo (CPU, embedded images)"
	@echo "make test   - install into $(VENV) (with dev extras) and run lint + the full test suite"
	@echo "variables   - PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC='$(TORCH_SPEC)' DEMO_ARGS='$(DEMO_ARGS)'"

install: $(STAMP)

# The torch spec in effect is recorded in a file that changes only when TORCH_SPEC does, so a
# new spec (e.g. a CUDA build after a CPU one) reinstalls torch instead of being ignored.
SPEC_FILE  := $(VENV)/.torch-spec
$(SPEC_FILE): FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(TORCH_SPEC)' ]; then \
	  if [ -x $(BIN)/python ]; then $(BIN)/python -m pip uninstall --quiet -y torch || true; fi; \
	  echo '$(TORCH_SPEC)' > $@; fi

FORCE:

$(STAMP): pyproject.toml $(CONSTRAINTS) $(SPEC_FILE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet $(CONSTRAINT_FLAGS) -e ".[dev]"
	touch $@

demo: $(STAMP)
	scripts/netns.sh $(BIN)/sr-pipeline demo $(DEMO_ARGS)

test: $(STAMP)
	VENV=$(VENV) scripts/test.sh

test-fast: $(STAMP)
	VENV=$(VENV) scripts/test.sh -m "not slow and not cluster"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
