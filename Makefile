# Two commands do all set-up on a fresh machine (Debian, Python 3.11, no GPU needed):
#   make book   creates .venv, installs everything, builds the book into _build/html (every notebook executed)
#   make test   the same environment; runs every test, the book build and the browser tests included, and the
#               notebooks once more from the installed wheel in .venv-colab (Colab's versions: tests/test_colab.py)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines take the local CPU build of torch; a GPU user keeps the torch they have.
TORCH ?= torch==2.13.0
# A CPU Colab runtime: requirements-colab.txt alone (the test adds the flashlib wheel with --no-deps). It is made
# anew whenever that file changes, from wheels kept in COLAB_WHEELS (outside the clone, so CI's fresh clones reuse
# them; pip's own HTTP cache stores nothing from this machine's registry). Python 3.11: Colab has 3.13, but the
# only CPU torch on this machine's disk is for 3.11.
COLAB_VENV := .venv-colab
COLAB_STAMP := $(COLAB_VENV)/.installed
COLAB_WHEELS ?= $(HOME)/.cache/flashlib/colab-wheels

.PHONY: book test test-fast test-colab gpu-test chromium clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[book,test,gpu]"
	touch $@

$(COLAB_STAMP): requirements-colab.txt
	rm -rf $(COLAB_VENV)
	$(PY) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install -q --no-index --find-links $(COLAB_WHEELS) -r requirements-colab.txt \
	  || ($(COLAB_VENV)/bin/python -m pip download -q -d $(COLAB_WHEELS) -r requirements-colab.txt \
	      && $(COLAB_VENV)/bin/python -m pip install -q --no-index --find-links $(COLAB_WHEELS) -r requirements-colab.txt)
	touch $@

book: $(STAMP)
	rm -rf _build/html _build/.doctrees
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	@echo "The book is built: open file://$(CURDIR)/_build/html/index.html"

chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: book chromium $(COLAB_STAMP)
	FLASHLIB_COLAB_VENV=$(COLAB_VENV) $(BIN)/python -m pytest -q

# Everything but the book and the browser: the quick loop while working.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not browser and not colab"

# The Colab runtime alone: the wheel in .venv-colab, every notebook from an empty folder, the sm_75 PTX.
test-colab: $(STAMP) $(COLAB_STAMP)
	FLASHLIB_COLAB_VENV=$(COLAB_VENV) $(BIN)/python -m pytest -q tests/test_colab.py

# On a machine with a GPU: the gpu-marked tests alone.
gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf _build .jupyter_cache
