# The rules of one run, included by `make run` (see Makefile). Inputs:
#   RECIPE   the recipe YAML              RUN_DIR  the run directory (default runs/<recipe dir>-<recipe name>)
#   OVERLAY  a recipe file merged over RECIPE (REHEARSAL=1 uses recipes/rehearsal.yaml)
#   ITER     last iteration to run (default: the recipe's last; the data split never depends on it)
#   ARGS     recipe overrides (--key value ...), frozen into RUN_DIR/recipe.yaml with the recipe
#   LAUNCH   how train.py is started (plain python, or accelerate launch ...)
#   GPUS     GPUs for generation and evaluation (vLLM data parallel); empty: the recipe's own setting
#
# The plan (iterations, shared iteration 0, evaluation, vLLM parallelism) comes from scripts/plan.py, which merges
# recipe, overlay and ARGS exactly as the freeze step does: make plans what the stages read. It writes nothing.
# Prerequisites are order-only (|): a stage runs when its output is missing, never because another file is newer,
# so a finished stage is never redone and a rerun resumes where the last one stopped.

ifndef RECIPE
$(error make run needs RECIPE=path/to/recipe.yaml)
endif
ifeq ($(wildcard $(RECIPE)),)
$(error recipe not found: $(RECIPE))
endif

comma := ,
RUN_DIR ?= $(RUN_ROOT)/$(notdir $(patsubst %/,%,$(dir $(RECIPE))))-$(basename $(notdir $(RECIPE)))
LAUNCH ?= $(PY)
SOURCES := $(RECIPE) $(if $(OVERLAY),--overlay $(OVERLAY)) --output_dir $(RUN_DIR)
PLAN := $(shell $(PY) scripts/plan.py $(SOURCES) $(if $(ITER),--last_iteration $(ITER)) $(ARGS))
ifneq ($(.SHELLSTATUS),0)
$(error no plan for $(RECIPE): see the error above)
endif
plan = $(patsubst $(1)=%,%,$(filter $(1)=%,$(PLAN)))

ITERATIONS := $(subst $(comma), ,$(call plan,iterations))
ITER0_DIR := $(call plan,iter0_dir)
BASE_DIR := $(call plan,base_dir)
FROZEN := $(RUN_DIR)/recipe.yaml
iter_dir = $(if $(filter 0,$(1)),$(ITER0_DIR),$(RUN_DIR)/iter-$(1))
previous = $(word $(1),0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30)
# vLLM replicas = GPUs / GPUs per replica (tensor_parallel_size of that iteration)
parallel = $(if $(GPUS),--data_parallel_size $(shell echo $$(( $(GPUS) / $(call plan,tp_$(1)) ))))
evaluated = $(filter 1,$(call plan,evaluate_$(1)))
# STAGE_LOGS=1 (the demo): a stage's output goes to RUN_DIR/logs/NAME.log and the terminal gets its one-line result,
# or the end of its log when it fails.
ifeq ($(STAGE_LOGS),1)
Q := @
stage = @mkdir -p $(RUN_DIR)/logs && { $(2) > $(RUN_DIR)/logs/$(1).log 2>&1 && { grep -h "done in" $(RUN_DIR)/logs/$(1).log || true; }; } \
	|| { tail -n 25 $(RUN_DIR)/logs/$(1).log; echo "(whole log: $(RUN_DIR)/logs/$(1).log)"; exit 1; }
else
Q :=
stage = $(2)
endif

# A stage under LAUNCH (accelerate, srun): its one-line error is followed by the launcher's report of the failed
# processes, so the stage also writes the line to RUN_DIR/.error-NAME (selm.cli.main_guard) and it is printed
# again once the launcher has exited: the cause ends the output (before make's own "*** ... Error" lines).
# (No $$ in it: inside ITERATION_RULES it is expanded once more by $(eval).)
launched = { rm -f $(RUN_DIR)/.error-$(1); SELM_ERROR_FILE=$(RUN_DIR)/.error-$(1) $(2) \
	|| { if [ -s $(RUN_DIR)/.error-$(1) ]; then cat $(RUN_DIR)/.error-$(1) >&2; fi; false; }; }

# What the run makes, in order: iteration 0 first (a shared one is claimed before anything else), the base
# model's evaluation (beside a shared iteration 0, which its runs share too), then each iteration's model and its
# evaluation.
RUN_TARGETS := $(if $(ITER0_DIR),$(ITER0_DIR)/model) \
	$(if $(call evaluated,base),$(BASE_DIR)/eval/metrics.json) \
	$(foreach k,$(ITERATIONS),$(call iter_dir,$(k))/model $(if $(call evaluated,$(k)),$(call iter_dir,$(k))/eval/metrics.json))

# One run per directory at a time: `run` holds RUN_DIR's lock (selm/lock.py) while make builds the stages, which
# pass it on to them; a second run on the same directory refuses at once, naming the holder. `make -n` takes no
# lock (it must write nothing): it only prints the stages.
.PHONY: run run-stages freeze
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
run:
	@$(PY) -m selm.lock $(RUN_DIR) -- $(MAKE) --no-print-directory run-stages RUN_DIR=$(RUN_DIR)
else
run: run-stages
endif

run-stages: $(RUN_TARGETS)
	@echo "run finished: $(RUN_DIR) (iterations $(strip $(ITERATIONS)))"
	$(call stage,summary,$(PY) scripts/summarize.py $(RUN_DIR))

# Always checked: creates RUN_DIR/recipe.yaml once, and refuses a rerun whose recipe or ARGS differ from it.
freeze:
	$(Q)$(PY) scripts/freeze_recipe.py $(SOURCES) $(ARGS)

# Iteration 0 (dpo_iteration_zero): plain DPO on the first portion's original pairs; no generation, no ranking.
$(ITER0_DIR)/model: | freeze
	$(call stage,train-0,$(call launched,train-0,$(LAUNCH) scripts/train.py $(FROZEN) --iteration 0))

$(BASE_DIR)/eval/metrics.json: | freeze
	$(call stage,evaluate-base,$(PY) scripts/evaluate.py $(FROZEN) --iteration base $(call parallel,base))

define ITERATION_RULES
$(RUN_DIR)/iter-$(1)/generated.parquet: | freeze $(if $(filter $(1),$(firstword $(ITERATIONS))),,$(call iter_dir,$(call previous,$(1)))/model)
	$(call stage,generate-$(1),$(PY) scripts/generate.py $(FROZEN) --iteration $(1) $(call parallel,$(1)))

$(RUN_DIR)/iter-$(1)/ranked.parquet: | $(RUN_DIR)/iter-$(1)/generated.parquet
	$(call stage,rank-$(1),$(PY) scripts/rank.py $(FROZEN) --iteration $(1))

$(RUN_DIR)/iter-$(1)/model: | $(RUN_DIR)/iter-$(1)/ranked.parquet
	$(call stage,train-$(1),$(call launched,train-$(1),$(LAUNCH) scripts/train.py $(FROZEN) --iteration $(1)))
endef
$(foreach k,$(filter-out 0,$(ITERATIONS)),$(eval $(call ITERATION_RULES,$(k))))

define EVAL_RULE
$(call iter_dir,$(1))/eval/metrics.json: | $(call iter_dir,$(1))/model
	$(call stage,evaluate-$(1),$(PY) scripts/evaluate.py $(FROZEN) --iteration $(1) $(call parallel,$(1)))
endef
$(foreach k,$(ITERATIONS),$(if $(call evaluated,$(k)),$(eval $(call EVAL_RULE,$(k)))))
