# Fresh machine to results in one command: `make run` (the main job) or `make test`.
# Setup is idempotent: a stamp file records a finished install, so later calls skip it.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := dev,launchers,bench,wandb,mlflow,text,optuna,compress
# torch/torchvision pinned to the builds on this machine's disk (a plain `torch` pulls a newer CUDA build).
ifeq ($(shell uname -m),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup run test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	@# every extra, so the tests exercise the real trackers, CLIP, pruning and Optuna; the pin keeps the torch above
	printf '%s\n' $(TORCH) > $(VENV)/torch-pin.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-pin.txt -e '.[$(EXTRAS)]'
	@# Fashion-MNIST offline (Debian's IDX files); optional, so a failure only prints a note.
	@[ -d /usr/share/datasets/fashion-mnist ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "note: dataset-fashion-mnist not installed; dataset=fashion_mnist will need dataset.download=true"
	touch $@

run: setup
	$(PY) run.py $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile  # each test file in one of 2 workers (module fixtures stay shared)

bench: setup
	$(PY) benchmarks/throughput.py
