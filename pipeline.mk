# The rules of one run, included by `make run` (see Makefile). Inputs:
#   RECIPE   the recipe YAML              RUN_DIR  the run directory (default runs/<recipe dir>-<recipe name>)
#   ITER     last iteration to run (default: the recipe's num_iterations; the data split never depends on it)
#   ARGS     recipe overrides (--key value ...), frozen into RUN_DIR/recipe.yaml with the recipe
#   LAUNCH   how train.py is started (plain python, or accelerate launch ...)
#   GPUS     processes for generation and ranking (vLLM data parallel); empty: the recipe's own setting
#
# Prerequisites are order-only (|): a stage runs when its output is missing, never because another file is newer,
# so a finished stage is never redone and a rerun resumes where the last one stopped.

ifndef RECIPE
$(error make run needs RECIPE=path/to/recipe.yaml)
endif
ifeq ($(wildcard $(RECIPE)),)
$(error recipe not found: $(RECIPE))
endif

NUMBERS := 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20
RUN_DIR ?= $(RUN_ROOT)/$(notdir $(patsubst %/,%,$(dir $(RECIPE))))-$(basename $(notdir $(RECIPE)))
LAUNCH ?= $(PY)
# Flat YAML, so the keys that shape the plan are read with sed (overriding the first two in ARGS is refused by freeze).
RECIPE_ITERS := $(shell sed -n 's/^num_iterations: *\([0-9][0-9]*\).*/\1/p' $(RECIPE))
HAS_ITER0 := $(filter true True,$(shell sed -n 's/^dpo_iteration_zero: *\([A-Za-z]*\).*/\1/p' $(RECIPE)))
ITER ?= $(or $(RECIPE_ITERS),3)
ifneq ($(filter-out $(wordlist 1,$(or $(RECIPE_ITERS),3),$(wordlist 2,99,$(NUMBERS))),$(ITER)),)
$(error ITER=$(ITER): $(RECIPE) has iterations up to $(or $(RECIPE_ITERS),3) (num_iterations))
endif
ITER0_DIR := $(or $(shell echo '$(ARGS)' | sed -n 's/.*--iteration_zero_dir[ =]\([^ ]*\).*/\1/p'),$(shell sed -n 's/^iteration_zero_dir: *\([^ #]*\).*/\1/p' $(RECIPE)),$(RUN_DIR)/iter-0)

ITERATIONS := $(if $(HAS_ITER0),0) $(wordlist 2,$(words x $(wordlist 1,$(ITER),$(NUMBERS))),$(NUMBERS))
previous = $(word $(1),$(NUMBERS))
iter_dir = $(if $(filter 0,$(1)),$(ITER0_DIR),$(RUN_DIR)/iter-$(1))
FROZEN := $(RUN_DIR)/recipe.yaml
# vLLM replicas = GPUs / GPUs per replica (tensor_parallel_size)
RECIPE_TP := $(or $(shell echo '$(ARGS)' | sed -n 's/.*--tensor_parallel_size[ =]\([0-9][0-9]*\).*/\1/p'),$(shell sed -n 's/^tensor_parallel_size: *\([0-9][0-9]*\).*/\1/p' $(RECIPE)),1)
PARALLEL := $(if $(GPUS),--data_parallel_size $(shell echo $$(( $(GPUS) / $(RECIPE_TP) ))))

.PHONY: run freeze
run: $(foreach k,$(ITERATIONS),$(call iter_dir,$(k))/model)
	@echo "run finished: $(RUN_DIR) (iterations $(strip $(ITERATIONS)))"

# Always checked: creates RUN_DIR/recipe.yaml once, and refuses a rerun whose recipe or ARGS differ from it.
freeze:
	$(PY) scripts/freeze_recipe.py $(RECIPE) --output_dir $(RUN_DIR) $(ARGS)

# Iteration 0 (dpo_iteration_zero): plain DPO on the first portion's original pairs; no generation, no ranking.
$(ITER0_DIR)/model: | freeze
	$(LAUNCH) scripts/train.py $(FROZEN) --iteration 0

define ITERATION_RULES
$(RUN_DIR)/iter-$(1)/generated.parquet: | freeze $(if $(filter $(1),$(firstword $(ITERATIONS))),,$(call iter_dir,$(call previous,$(1)))/model)
	$(PY) scripts/generate.py $(FROZEN) --iteration $(1) $(PARALLEL)

$(RUN_DIR)/iter-$(1)/ranked.parquet: | $(RUN_DIR)/iter-$(1)/generated.parquet
	$(PY) scripts/rank.py $(FROZEN) --iteration $(1)

$(RUN_DIR)/iter-$(1)/model: | $(RUN_DIR)/iter-$(1)/ranked.parquet
	$(LAUNCH) scripts/train.py $(FROZEN) --iteration $(1)
endef
$(foreach k,$(filter-out 0,$(ITERATIONS)),$(eval $(call ITERATION_RULES,$(k))))
