# Every target that needs the environment depends on .venv/.installed, which is rebuilt only when
# pyproject.toml changes, so a second `make setup` takes seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision builds that this platform ships on disk; override on other machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export PYTHONDONTWRITEBYTECODE :=
unexport PYTHONDONTWRITEBYTECODE

DATA ?= data/digits
SRC ?= digits
SPLIT ?= train
TEACHER ?= test_resnet
CHECKPOINT ?=
RECIPE ?= digits
SEED ?= 0
EPOCHS ?= 2
TOPK ?= 10
STORE ?= runs/cache/teacher.zarr
STUDENT ?= test_convnext
METHOD ?= ofa
BATCH ?= 64
RUN ?= runs/student
ARGS ?=

.PHONY: setup test test-quick fuzz lint shards cache-teacher inspect-cache train-student demo cka bench bench-report gpu-smoke chaos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m compileall -q $(VENV) > /dev/null || true
	touch $(STAMP)

# every test, the files spread over two processes (pytest-xdist; a file's tests stay in one process, so its
# session fixtures are built once; the heaviest files first): 11 to 12 minutes on a 2-core machine
TEST_PROCESSES ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# the fast tier (no end-to-end runs): about 85 s on a 2-core machine
test-quick: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile -m "not slow"

# the property-based tests (tests/test_fuzz.py) in the random exploring profile: 20x the examples, new ones each
# run, failures kept in .hypothesis/ and replayed first next time (tests/support/fuzz.py); `make test` runs the
# derandomized CI profile
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q tests/test_fuzz.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

shards: $(STAMP)
	$(PY) cli.py shards $(SRC) $(DATA) --split $(SPLIT) $(ARGS)

cache-teacher: $(STAMP)
	$(PY) cli.py cache-teacher --data $(DATA) --teacher $(TEACHER) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--recipe $(RECIPE) --seed $(SEED) --epochs $(EPOCHS) --topk $(TOPK) --out $(STORE) $(ARGS)

inspect-cache: $(STAMP)
	$(PY) cli.py inspect-cache $(STORE)

train-student: $(STAMP)
	$(PY) cli.py train-student --data $(DATA) --student $(STUDENT) --method $(METHOD) \
		$(if $(filter ce,$(METHOD)),--recipe $(RECIPE),--cache $(STORE)) --epochs $(EPOCHS) --batch-size $(BATCH) \
		--out $(RUN) $(ARGS)

demo: $(STAMP)
	$(PY) cli.py demo --out runs/demo $(ARGS)

# stage-by-stage CKA between the demo's CNN teacher and its OFA ViT student (run `make demo` first)
cka: $(STAMP)
	$(PY) cli.py cka --model-a test_resnet --checkpoint-a runs/demo/teacher/model.safetensors \
		--model-b test_vit --model-kwargs-b img_size=16 --model-kwargs-b patch_size=4 --model-kwargs-b depth=4 \
		--model-kwargs-b class_token=false --model-kwargs-b global_pool=avg \
		--checkpoint-b runs/demo/students/test_vit-ofa-s0/model.safetensors \
		--data runs/demo/data --recipe digits-demo --samples 360 --out runs/cka $(ARGS)

# one-GPU smoke run of both stages with real-size models (ResNet-50 -> DeiT-Tiny at 224 px) on CIFAR-10
gpu-smoke: $(STAMP)
	$(PY) bench/gpu_smoke.py $(ARGS)

chaos: $(STAMP)
	$(PY) bench/chaos.py --save $(ARGS)

# every performance benchmark, then bench/results/README.md from all the records (ARGS=--small: a quick check of
# the scripts, written to runs/bench-small/results)
bench: $(STAMP)
	$(PY) bench/run_all.py $(ARGS)

# bench/results/README.md from the JSON records already there, without running anything
bench-report: $(STAMP)
	$(PY) bench/report.py $(ARGS)

clean:
	rm -rf runs data/digits
