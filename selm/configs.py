"""The make plan of a run: what pipeline.mk's `$(shell scripts/plan.py ...)` decodes.

Left here for the run driver, which moves it into selm/run.py; the recipe itself is the `selm.recipe` package.
"""

from pathlib import Path

from selm.cli import split_cli
from selm.errors import SELMError
from selm.layout import RunLayout
from selm.recipe.freeze import merge_recipe_sources
from selm.recipe.parse import iterations_of, load_recipe_yaml, per_iteration_values, typed
from selm.recipe.schema import BadValue


def _plan_of(recipe: dict, described: str) -> dict:
    """The iteration structure of a merged recipe mapping: what the Makefile plans and parse_recipe resolves."""
    iterations = iterations_of(recipe, described)

    def per_iteration(key, default, tp):
        values = per_iteration_values(recipe, key, default, iterations, described)
        try:
            return {k: typed(key, v, tp) for k, v in zip(iterations, values)}
        except BadValue as e:
            raise SELMError(f"{described}: {e}") from None

    return {"iterations": iterations, "dpo_iteration_zero": iterations[0] == 0,
            "iteration_zero_dir": recipe.get("iteration_zero_dir"),
            "evaluate": per_iteration("evaluate", False, bool),
            "tensor_parallel_size": per_iteration("tensor_parallel_size", 1, int)}


PLAN_USAGE = ("python scripts/plan.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR [--last_iteration K] "
              "[--key value ...]")


def run_plan(argv: list[str]) -> dict:
    """What `make run` will do, from the same merge of recipe, overlays and overrides that the freeze step writes.

    Reads and writes nothing but the recipe files (so `make -n` stays side-effect free). When the run directory
    already has its frozen recipe, that file is the plan (the freeze step refuses a rerun that differs from it).
    `--last_iteration K` (make's ITER) cuts the plan after iteration K; it must be one of the recipe's iterations.
    """
    last, rest = None, []
    pairs = split_cli(argv[1:]) if argv and not argv[0].startswith("--") else []
    for key, value in pairs:
        if key == "last_iteration":
            last = value
        else:
            rest += [f"--{key}"] + ([] if value is None else [value])
    source, recipe, described = merge_recipe_sources(argv[:1] + rest, PLAN_USAGE)
    frozen = RunLayout(recipe["output_dir"]).frozen_recipe
    if frozen.is_file():
        recipe, described = load_recipe_yaml(frozen), str(frozen)
    plan = _plan_of(recipe, described)
    if last not in (None, ""):
        if not str(last).isdigit() or int(last) not in plan["iterations"]:
            raise SELMError(f"ITER={last}: {described} has iterations {plan['iterations']} (num_iterations "
                            f"{plan['iterations'][-1]}); ITER is the last one to run")
        plan["iterations"] = [k for k in plan["iterations"] if k <= int(last)]
    run_dir = Path(recipe["output_dir"])
    shared = plan["iteration_zero_dir"] if plan["dpo_iteration_zero"] else None
    plan["iteration_zero_dir"] = str(shared or run_dir / "iter-0") if plan["dpo_iteration_zero"] else None
    plan["base_dir"] = str(RunLayout(run_dir, shared).base_dir())
    plan["run_dir"] = str(run_dir)
    return plan


def plan_as_make_words(plan: dict) -> str:
    """The plan as `key=value` words for the Makefile ($(shell) joins lines; paths may not contain spaces)."""
    for path in (plan["run_dir"], plan["iteration_zero_dir"] or "", plan["base_dir"]):
        if any(c.isspace() for c in path):
            raise SELMError(f"run directory {path!r} contains white space, which make cannot handle; choose another")
    words = [f"iterations={','.join(map(str, plan['iterations']))}", f"run_dir={plan['run_dir']}",
             f"base_dir={plan['base_dir']}"]
    if plan["iteration_zero_dir"]:
        words.append(f"iter0_dir={plan['iteration_zero_dir']}")
    first = plan["iterations"][0]
    words.append(f"evaluate_base={int(plan['evaluate'][first])}")
    words.append(f"tp_base={plan['tensor_parallel_size'][first]}")
    for k in plan["iterations"]:
        words += [f"evaluate_{k}={int(plan['evaluate'][k])}", f"tp_{k}={plan['tensor_parallel_size'][k]}"]
    return " ".join(words)
