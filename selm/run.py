"""One run: freeze the recipe, then launch each stage whose output is missing, in order (docs/running.md).

    python scripts/run.py RECIPE.yaml [--overlay PATH] [--run_dir DIR | --run_root DIR] [--last_iteration K]
        [--launch "accelerate launch ..."] [--gpus N] [--stage_logs] [--print] [--key value ...]

The stages: iteration 0 first (dpo_iteration_zero: plain DPO on the first portion, in a shared directory when the
recipe says so), the base model's evaluation, then generate -> rank -> train -> evaluate for every iteration up to
K. Every output (selm/layout.py) is written atomically, so one that exists is finished: rerunning the same command
resumes at the first missing one and never redoes a finished stage. The run holds its directory's lock
(selm/lock.py) from the freeze to the summary; the stages it launches pass it on.

The plan comes from the same merge of recipe, overlays and overrides that the freeze writes (the frozen recipe,
once it exists), so what is planned is what the stages read. `--print` prints the commands, one per line, and
writes nothing (`make -n` shows it).
"""

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from selm.cli import ERROR_FILE_ENV, RECIPE_OVERRIDES, main_guard, script_parser
from selm.errors import SELMError
from selm.layout import BASE, RunLayout, default_run_dir

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
USAGE = "python scripts/run.py RECIPE.yaml [--overlay PATH] [--run_dir DIR] [--last_iteration K] [--key value ...]"
LOG_TAIL = 25  # lines of a failed stage's log shown on the terminal


@dataclass(frozen=True)
class Stage:
    name: str  # generate-1, evaluate-base, ...: its log's name
    output: Path | None  # exists: the stage is finished (None: always runs)
    command: list[str]
    launched: bool = False  # under LAUNCH: its error line is repeated once the launcher has reported


def _parser():
    parser = script_parser(__doc__, epilog=RECIPE_OVERRIDES)
    parser.add_argument("recipe", help="the recipe file")
    parser.add_argument("--overlay", action="append", default=[], help="a recipe file merged over it (repeatable)")
    parser.add_argument("--run_dir", help="the run directory (default: RUN_ROOT/<recipe folder>-<recipe name>)")
    parser.add_argument("--run_root", help="where the default run directory goes (default: the recipe's output_dir)")
    parser.add_argument("--last_iteration", help="the last iteration to run (make's ITER; default: the recipe's last)")
    parser.add_argument("--launch", default=sys.executable, help="how train.py is started (default: this python)")
    parser.add_argument("--gpus", type=int, help="GPUs for generation and evaluation: GPUS / tensor_parallel_size "
                                                 "vLLM replicas (default: the recipe's data_parallel_size)")
    parser.add_argument("--stage_logs", action="store_true", help="each stage's output to RUN_DIR/logs/NAME.log")
    parser.add_argument("--print", action="store_true", help="print the commands that would run; write nothing")
    return parser


def plan_run(sources: list[str], last_iteration=None) -> dict:
    """The iterations, the layout, evaluation and tensor parallelism of a run, from `RECIPE [--overlay PATH]
    --output_dir RUN_DIR [--key value ...]` merged as the freeze merges it (the frozen recipe once it exists).
    Reads only the recipe files. `last_iteration` cuts the plan after iteration K, one of the recipe's."""
    from selm.recipe.freeze import merge_recipe_sources
    from selm.recipe.parse import load_recipe_yaml

    _, recipe, described = merge_recipe_sources(sources, USAGE)
    frozen = RunLayout(recipe["output_dir"]).frozen_recipe
    if frozen.is_file():
        recipe, described = load_recipe_yaml(frozen), str(frozen)
    plan = iteration_plan(recipe, described)
    last = last_iteration
    if last not in (None, ""):
        if not str(last).isdigit() or int(last) not in plan["iterations"]:
            raise SELMError(f"ITER={last}: {described} has iterations {plan['iterations']} (num_iterations "
                            f"{plan['iterations'][-1]}); ITER is the last one to run")
        plan["iterations"] = [k for k in plan["iterations"] if k <= int(last)]
    shared = plan["iteration_zero_dir"] if plan["dpo_iteration_zero"] else None
    plan["layout"] = RunLayout(recipe["output_dir"], iteration_zero_dir=shared or None)
    return plan


def iteration_plan(recipe: dict, described: str) -> dict:
    """The iteration structure of a merged recipe mapping: what the driver plans."""
    from selm.recipe.parse import iterations_of, per_iteration_values, typed
    from selm.recipe.schema import BadValue

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


def _script(name: str) -> str:
    """scripts/NAME.py, relative to the working directory when under it (as make runs it, from the repository)."""
    path = SCRIPTS / f"{name}.py"
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def stages_of(plan: dict, launch: list[str], gpus: int | None) -> list[Stage]:
    """Every stage of the plan, in the order they run (each after the outputs it reads)."""
    layout, iterations = plan["layout"], plan["iterations"]
    frozen = str(layout.frozen_recipe)

    def stage(name, k, output, extra=()):
        return Stage(f"{name}-{k}", output, [sys.executable, _script(name), frozen, "--iteration", str(k), *extra])

    def train(k):
        return Stage(f"train-{k}", layout.model(k), [*launch, _script("train"), frozen, "--iteration", str(k)], True)

    def vllm(k):  # vLLM replicas = GPUs / GPUs per replica (that iteration's tensor_parallel_size)
        if gpus is None:
            return []
        tp = plan["tensor_parallel_size"][iterations[0] if k == BASE else k]
        if gpus < tp:
            raise SELMError(f"GPUS={gpus}: iteration {k} needs tensor_parallel_size {tp} GPUs per vLLM replica")
        return ["--data_parallel_size", str(gpus // tp)]

    stages = [train(0)] if plan["dpo_iteration_zero"] else []
    if plan["evaluate"][iterations[0]]:  # beside a shared iteration 0, which its runs share too
        stages.append(stage("evaluate", BASE, layout.eval_metrics(BASE), vllm(BASE)))
    for k in iterations:
        if k != 0:
            stages += [stage("generate", k, layout.generated(k), vllm(k)), stage("rank", k, layout.ranked(k)),
                       train(k)]
        if plan["evaluate"][k]:
            stages.append(stage("evaluate", k, layout.eval_metrics(k), vllm(k)))
    return stages


def launch_stage(stage: Stage, layout: RunLayout, held: list, stage_logs: bool) -> int:
    """Run one stage; its exit status. With stage_logs its output goes to its log and the terminal gets the
    one-line result, or the log's tail when it fails. A failure ends with the stage's own error line."""
    from selm.lock import run_holding

    env = dict(os.environ)
    error_file = layout.error_file(stage.name) if stage.launched else None
    if error_file is not None:  # the launcher's report of the failed processes follows the stage's error line
        error_file.unlink(missing_ok=True)
        env[ERROR_FILE_ENV] = str(error_file)
    if stage_logs:
        log = layout.log(stage.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as out:
            status = run_holding(stage.command, held, env=env, stdout=out, stderr=out)
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        shown = [line for line in lines if "done in" in line] if status == 0 else lines[-LOG_TAIL:]
        print("\n".join(shown + ([] if status == 0 else [f"(whole log: {log})"])), flush=True)
    else:
        print(shlex.join(stage.command), flush=True)
        status = run_holding(stage.command, held, env=env)
    if status:
        print(f"run stopped: {stage.name} failed (exit status {status}); rerun the same command to resume",
              file=sys.stderr)
        if error_file is not None and error_file.is_file():
            sys.stderr.write(error_file.read_text(encoding="utf-8"))
        sys.stderr.flush()
    return status


def run(argv: list[str]) -> int:
    """The driver: plan, lock, freeze, then every stage whose output is missing, then the summary; exit status."""
    from selm.recipe.freeze import freeze_recipe
    from selm.lock import run_lock

    args, overrides = _parser().parse_known_args(argv)
    run_dir = args.run_dir or (default_run_dir(args.run_root, args.recipe) if args.run_root else None)
    sources = [args.recipe, *(w for o in args.overlay for w in ("--overlay", o)),
               *(["--output_dir", str(run_dir)] if run_dir else []), *overrides]
    plan = plan_run(sources, args.last_iteration)
    layout = plan["layout"]
    stages = stages_of(plan, shlex.split(args.launch), args.gpus)
    summary = Stage("summary", None, [sys.executable, _script("summarize"), str(layout.run_dir)])
    if args.print:
        commands = [[sys.executable, _script("freeze_recipe"), *sources]]
        commands += [s.command for s in stages if not s.output.exists()] + [summary.command]
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    with run_lock(layout.run_dir) as held:
        path, message = freeze_recipe(sources)
        print(f"{message}: {path}", flush=True)
        for stage in stages:
            if not stage.output.exists() and (status := launch_stage(stage, layout, [held], args.stage_logs)):
                return status
        print(f"run finished: {layout.run_dir} (iterations {' '.join(map(str, plan['iterations']))})", flush=True)
        return launch_stage(summary, layout, [held], args.stage_logs)


def main(argv=None) -> int:
    return main_guard(run)(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
