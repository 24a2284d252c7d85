# Two commands on a fresh machine with Python 3.11:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHAKESPEARE ?= ../shared/data/tinyshakespeare/input.txt

.PHONY: setup demo test test-slow bench bench-suite speech clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## set up, train the default recipe end to end, then sample and evaluate
	$(BIN)/armodal train text_code_cpu $(ARGS)
	run=$$(ls -td runs/text_code_cpu/*/ | head -1); \
	$(BIN)/armodal generate run=$$run prompt="def " decoding=top_k decoding.max_new_tokens=200 && \
	$(BIN)/armodal eval run=$$run

test: $(STAMP)  ## set up, then run the default (CPU, < 15 min) test suite
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## the long tests (the full demo, README commands, fuzzing at 500 examples)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)  ## char-level shakespeare against wall-clock (needs the data file)
	$(BIN)/python bench/text_shakespeare.py --data $(SHAKESPEARE)

bench-suite: $(STAMP)  ## armodal vs transformers: training, decoding, speculative, quantized (~1 h first run)
	$(BIN)/python bench/suite.py $(ARGS)

speech:  ## espeak-ng (Debian package) for the audio recipes' speech corpus; needs apt rights
	command -v espeak-ng >/dev/null || { apt-get install -y espeak-ng 2>/dev/null || \
	  sudo apt-get install -y espeak-ng; } || \
	  { echo "install espeak-ng (Debian/Ubuntu: apt-get install espeak-ng), or train the audio \
	recipes on your own files: domain.audio._target_=armodal.data.audio.AudioFolder \
	domain.audio.root=<dir>"; exit 1; }

clean:
	rm -rf $(VENV) runs
