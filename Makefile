# One venv, torch's CPU wheel first (a plain `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PHOTOS := .cache/test-photos
# The lowest-versions environment: every runtime dependency at pyproject.toml's floor.
LOWEST := .venv-lowest

.PHONY: install lowest demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

lowest: $(LOWEST)/.installed

# torch's floor has no CPU wheel on PyPI: this venv holds its CUDA build (about 4.5 GB), which runs on CPUs.
# Its install runs once more if the registry cuts a connection mid-wheel (CI saw cuDNN's 731 MB stop
# at 691 MB six times in one install).
$(LOWEST)/.installed: pyproject.toml .ci/lowest_constraints.py
	rm -rf $(LOWEST)
	mkdir -p .cache
	$(PYTHON) .ci/lowest_constraints.py > .cache/lowest-constraints.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q --upgrade pip
	$(LOWEST)/bin/pip install -q -c .cache/lowest-constraints.txt torch || \
		$(LOWEST)/bin/pip install -q -c .cache/lowest-constraints.txt torch
	$(LOWEST)/bin/pip install -q -c .cache/lowest-constraints.txt -e ".[test-base]"
	touch $@

# The face_recognition sdist's photos of Obama and Biden: test data fetched from PyPI, never committed.
$(PHOTOS)/.done:
	mkdir -p .cache/sdist $(PHOTOS)
	$(BIN)/pip download -q --no-deps --no-binary :all: face_recognition==1.3.0 -d .cache/sdist
	tar -xzf .cache/sdist/face_recognition-1.3.0.tar.gz -C $(PHOTOS) --strip-components=3 face_recognition-1.3.0/tests/test_images
	touch $@

demo: install
	$(BIN)/agepipe demo

test: install $(PHOTOS)/.done
	AGEPIPE_TEST_PHOTOS=$(PHOTOS) $(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/store_bench.py
	$(BIN)/python bench/embed_bench.py

clean:
	rm -rf $(VENV) $(LOWEST) .cache .pytest_cache
