# Two commands do all set-up on a fresh machine (Debian, Python 3.11, no GPU needed):
#   make book   creates .venv, installs everything, builds the book into _build/html (every notebook executed)
#   make test   the same environment; runs every test, the book build and the browser tests included
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines take the local CPU build of torch; a GPU user keeps the torch they have.
TORCH ?= torch==2.13.0

.PHONY: book test test-fast gpu-test chromium clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[book,test,gpu]"
	touch $@

book: $(STAMP)
	rm -rf _build/html _build/.doctrees
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	@echo "The book is built: open file://$(CURDIR)/_build/html/index.html"

chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: book chromium
	$(BIN)/python -m pytest -q

# Everything but the book and the browser: the quick loop while working.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not browser"

# On a machine with a GPU: the gpu-marked tests alone.
gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf _build .jupyter_cache
