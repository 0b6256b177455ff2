# lmforge: the two commands a new user needs.
#   make run   set up .venv, then prepare the default corpus and pretrain + sample a small model
#   make test  set up the same .venv, then lint, check import layers and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   := data/shakespeare
STAMP  := $(VENV)/.lmforge-installed
DEVSTAMP := $(VENV)/.lmforge-dev-installed

.PHONY: run test test-slow test-llamacpp setup setup-dev lint clean

setup: $(STAMP)
setup-dev: $(DEVSTAMP)

# The pinned CPU torch goes in first: lmforge itself declares a torch range, so a GPU user's own
# torch build is kept, and pip never pulls gigabytes of CUDA wheels on our CPU machines.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

# The tests also need the references we compare against (transformers, onnxruntime, gguf,
# the openai client) and the optional extras they exercise.
$(DEVSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(DEVSTAMP)

run: setup
	@test -f $(DATA)/manifest.json || $(BIN)/lmforge data prepare --out $(DATA)
	$(BIN)/lmforge pretrain --data $(DATA) --run shakespeare --overwrite

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q --durations=30 tests

# The long checks kept out of `make test` (~10 min budget on 2 cores): the 4-rank FSDP memory
# test, FSDPxTP and sharded-LoRA SIGKILL torchrun tests, DPO over torchrun, compiled decode, and
# the real-model tests (SmolLM2, MiniLM: skipped unless their PyPI packages are installed).
test-slow: setup-dev
	$(BIN)/python -m pytest -q --durations=30 -m "slow and not llamacpp" tests

# llama.cpp runs what we export (tests marked llamacpp): llama-cpp-python built from its source
# package, AMX off (upstream ggml-org/llama.cpp#20824: its AMX path crashes on quantized files
# on some CPUs), portable flags; ~10 min on 2 cores the first time, then pip's cached wheel.
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
test-llamacpp: setup-dev
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/python -m pip install -q --no-binary llama-cpp-python \
		'llama-cpp-python==0.3.36'
	$(BIN)/python -m pytest -q -m llamacpp tests/llamacpp

clean:
	rm -rf $(VENV) runs data
