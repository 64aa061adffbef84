# make demo: set up .venv and run the main job end to end; make test: the whole suite; make lint: ruff.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint format demo clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || \
		{ echo "crn_tf needs Python >= 3.10 (tested on 3.11); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Two pytest processes (pytest-xdist), whole test files to each so module fixtures are built once:
# the suite's small TF ops keep ~1 core busy per process. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# VGG_WEIGHTS=imagenet make demo: the paper's perceptual loss (Keras downloads ~80 MB once).
VGG_WEIGHTS ?= none
demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m crn_tf.demo --output_dir=demo_output --vgg_weights=$(VGG_WEIGHTS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
