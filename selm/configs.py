"""Recipe dataclasses and the one parser every stage script uses.

A recipe is a flat YAML file (alignment-handbook style). Its keys are the fields of the dataclasses below plus
trl's `ModelConfig` and `SELMConfig` (a `trl.DPOConfig` with `alpha`). A scalar field may be given a list in the
recipe: one value per iteration, in iteration order. Stage scripts are called as

    python scripts/<stage>.py RECIPE.yaml --iteration K [--key value | --key=value ...]

and command-line values override the recipe (a command-line value applies to the one iteration being run).
"""

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selm.errors import SELMError
from selm.limits import BadValue, CheckedArguments, check_limits, scalar_type, typed


@dataclass
class PipelineConfig(CheckedArguments):
    """Data, portions and iterations of a run."""

    dataset_name: str = field(
        default="HuggingFaceH4/ultrafeedback_binarized",
        metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet file in the UltraFeedback schema."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name, if any."})
    dataset_split: str = field(
        default="train_prefs", metadata={"help": "Split to read; slices work, e.g. 'train_prefs[:1000]'."}
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N rows before splitting (CI uses 100)."}
    )
    num_iterations: int = field(default=3, metadata={"help": "Number of SELM (or iterative DPO) iterations."})
    dpo_iteration_zero: bool = field(
        default=False,
        metadata={
            "help": "Run iteration 0 first: plain DPO on the first portion with the original pairs and no generation "
            "(the paper's Zephyr-7B-DPO start); alpha is 0 there whatever the recipe says. The data is then split into "
            "num_iterations + 1 portions."
        },
    )
    iteration_zero_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of iteration 0 (default: <output_dir>/iter-0). Point the SELM and DPO runs of one base "
            "model at the same directory to train their common iteration 0 once."
        },
    )
    portion_split: str = field(
        default="contiguous",
        metadata={"help": "'contiguous' (the paper: consecutive slices) or 'shuffled' (seeded permutation first)."},
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the permutation when portion_split is 'shuffled'."})
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "Keep iter-K/checkpoints after iter-K/model is saved (they hold the optimizer states)."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per optimizer step over all processes. When set, gradient_accumulation_steps is "
            "derived from it and the process count, so changing the GPU count does not change the batch."
        },
    )

    @property
    def first_iteration(self) -> int:
        return 0 if self.dpo_iteration_zero else 1

    @property
    def iterations(self) -> list[int]:
        return list(range(self.first_iteration, self.num_iterations + 1))


@dataclass
class GenerationArguments(CheckedArguments):
    """How the starting model of an iteration answers the prompts of its portion."""

    generation_backend: str = field(default="vllm", metadata={"help": "'vllm' (GPU) or 'hf' (transformers generate)."})
    temperature: float = field(default=0.0, metadata={"help": "0 means greedy decoding (the paper)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    num_responses: int = field(default=1, metadata={"help": "Responses per prompt; the first is reference_response."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Generated tokens per response at most."})
    generation_seed: int = field(default=0, metadata={"help": "Sampling seed."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per batch of the hf backend."})
    generation_shard_size: int = field(
        default=2048, metadata={"help": "Prompts per saved shard: an interrupted generation resumes at a shard."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model replica."})
    data_parallel_size: int = field(
        default=1, metadata={"help": "vLLM: replicas, one process each over a contiguous shard of the prompts."}
    )
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory it may use."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "vLLM: context length; prompt + max_new_tokens must fit."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_responses > 1 and self.temperature <= 0:
            raise BadValue("num_responses", self.num_responses, f"greedy decoding (temperature {self.temperature}) "
                           "gives identical responses; set temperature > 0")


@dataclass
class RankingArguments(CheckedArguments):
    """How {generated, chosen, rejected} become the iteration's preference pair."""

    ranker: str = field(default="pairrm", metadata={"help": "'pairrm', 'reward_model' or 'oracle'."})
    ranker_model_name_or_path: str = field(
        default="llm-blender/PairRM", metadata={"help": "Hub id or local directory of the ranker model."}
    )
    ranker_batch_size: int = field(default=16, metadata={"help": "Candidates or pairs per ranker forward."})
    ranker_max_length: int = field(default=2048, metadata={"help": "Token limit of one ranker input."})
    oracle_reward: str | None = field(
        default=None, metadata={"help": "'module:function' scoring (prompt_messages, response_text) -> float."}
    )
    update_rule: str = field(
        default="best_worst",
        metadata={
            "help": "'best_worst' (paper: best candidate chosen, worst rejected), 'replace' (Appendix C: the "
            "generated response replaces chosen if better, rejected if worse) or 'original' (keep the dataset pair)."
        },
    )
    on_tie: str = field(default="drop", metadata={"help": "Rows whose best and worst score tie: 'drop' or 'keep'."})


@dataclass
class EvaluationArguments(CheckedArguments):
    """Held-out evaluation of an iteration's model."""

    eval_split: str = field(default="test_prefs", metadata={"help": "Split of dataset_name to evaluate on."})
    eval_max_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})


# Chosen to match a `choices` check below; a typo in one of these keys' values is reported like a typo in a key.
CHOICES = {
    "portion_split": ("contiguous", "shuffled"),
    "generation_backend": ("vllm", "hf"),
    "ranker": ("pairrm", "reward_model", "oracle"),
    "update_rule": ("best_worst", "replace", "original"),
    "on_tie": ("drop", "keep"),
}


def _selm_config_class():
    from selm.trainer_config import SELMConfig  # imports trl; kept out of module import time

    return SELMConfig


def _model_config_class():
    from trl import ModelConfig

    return ModelConfig


def _recipe_classes():
    return {
        "model": _model_config_class(),
        "pipeline": PipelineConfig,
        "generation": GenerationArguments,
        "ranking": RankingArguments,
        "evaluation": EvaluationArguments,
        "training": _selm_config_class(),
    }


def _is_list_type(tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list_type(a) for a in typing.get_args(tp))
    return False


@dataclass
class Recipe:
    """A recipe resolved for one stage and one iteration.

    `model`, `pipeline`, `generation`, `ranking` and `evaluation` are dataclass instances. Training values stay a
    dict until `training_config()` builds the `SELMConfig`, because building one validates the device (bf16 needs
    a GPU), and a dry run must work on a machine without one.
    """

    path: Path
    stage: str
    iteration: int
    num_processes: int
    model: typing.Any
    pipeline: PipelineConfig
    generation: GenerationArguments
    ranking: RankingArguments
    evaluation: EvaluationArguments
    training: dict
    explicit_keys: set

    # ---- run layout (DESIGN.md §4) ----
    @property
    def run_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def iter_dir(self, k: int | None = None) -> Path:
        k = self.iteration if k is None else k
        if k == 0 and self.pipeline.iteration_zero_dir:
            return Path(self.pipeline.iteration_zero_dir)
        return self.run_dir / f"iter-{k}"

    @property
    def portion_index(self) -> int:
        """0-based index of this iteration's data portion."""
        return self.iteration - self.pipeline.first_iteration

    @property
    def num_portions(self) -> int:
        return len(self.pipeline.iterations)

    @property
    def start_model(self) -> str:
        """Policy and reference of this iteration: the previous iteration's model, or the base model."""
        if self.iteration == self.pipeline.first_iteration:
            return self.model.model_name_or_path
        return str(self.iter_dir(self.iteration - 1) / "model")

    @property
    def is_generation_free(self) -> bool:
        """Iteration 0 of a dpo_iteration_zero run trains on the original pairs: no generation or ranking."""
        return self.pipeline.dpo_iteration_zero and self.iteration == 0

    # ---- batch arithmetic ----
    def gradient_accumulation_steps(self) -> int:
        per_device = int(self.training["per_device_train_batch_size"])
        global_batch = self.pipeline.global_batch_size
        if global_batch is None:
            return int(self.training["gradient_accumulation_steps"])
        denominator = per_device * self.num_processes
        if global_batch % denominator:
            raise SELMError(
                f"{self.path}: global_batch_size {global_batch} is not a multiple of per_device_train_batch_size "
                f"{per_device} x {self.num_processes} processes"
            )
        return global_batch // denominator

    @property
    def effective_global_batch(self) -> int:
        return int(self.training["per_device_train_batch_size"]) * self.num_processes * self.gradient_accumulation_steps()

    def training_config(self, **overrides):
        """The `SELMConfig` of this iteration: its learning rate, derived accumulation, checkpoints under iter-K."""
        values = dict(self.training)
        values["output_dir"] = str(self.iter_dir() / "checkpoints")
        values["gradient_accumulation_steps"] = self.gradient_accumulation_steps()
        if values.get("push_to_hub") and not values.get("hub_model_id"):
            # trl would name the repository after the output dir, "checkpoints", for every iteration of every run
            values["hub_model_id"] = f"{self.run_dir.name}-iter-{self.iteration}"
        values.update(overrides)
        return _selm_config_class()(**values)

    def to_dict(self) -> dict:
        """The resolved configuration, for `--dry_run` and the frozen `train_config.yaml`."""
        training_defaults = {
            f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(_selm_config_class())
        }
        always = {"learning_rate", "beta", "alpha", "per_device_train_batch_size", "num_train_epochs",
                  "lr_scheduler_type", "warmup_steps", "max_length", "bf16", "gradient_checkpointing", "seed"}
        training = {
            k: v for k, v in self.training.items()
            if k in always or k in self.explicit_keys or _differs(v, training_defaults.get(k))
        }
        training["gradient_accumulation_steps"] = self.gradient_accumulation_steps()
        return {
            "recipe": str(self.path),
            "stage": self.stage,
            "iteration": self.iteration,
            "iterations": self.pipeline.iterations,
            "run_dir": str(self.run_dir),
            "start_model": self.start_model,
            "portion": f"{self.portion_index + 1} of {self.num_portions}",
            "num_processes": self.num_processes,
            "effective_global_batch": self.effective_global_batch,
            "model": _plain(dataclasses.asdict(self.model)),
            "pipeline": _plain(dataclasses.asdict(self.pipeline)),
            "generation": _plain(dataclasses.asdict(self.generation)),
            "ranking": _plain(dataclasses.asdict(self.ranking)),
            "evaluation": _plain(dataclasses.asdict(self.evaluation)),
            "training": _plain(training),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _differs(value, default) -> bool:
    """Whether a resolved value differs from its default (argparse turns some defaults into look-alikes)."""
    if not value and not default:  # "" / None / False / [] are all "unset"
        return False
    return _plain(value) != _plain(default)


def _plain(obj):
    """Make a value YAML-safe (enums and other objects become strings)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(getattr(obj, "value", obj))


def load_recipe_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SELMError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SELMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SELMError(f"{path}: a recipe must be a YAML mapping of key: value")
    return data


def _unknown_key_error(source, key, known) -> SELMError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return SELMError(f"{source}: unknown key '{key}'{hint}")


def _split_cli(argv: list[str]) -> list[tuple[str, str | None]]:
    """['--a', '1', '--b=2', '--flag'] -> [('a', '1'), ('b', '2'), ('flag', None)]."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SELMError(f"command line: expected --key value, got '{arg}'")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:
            key, value = arg[2:], None
            i += 1
        pairs.append((key, value))
    return pairs


def parse_recipe(argv: list[str] | None = None, stage: str = "train") -> tuple[Recipe, bool]:
    """Parse `RECIPE.yaml --iteration K [--dry_run] [--num_processes N] [--key value ...]`.

    Returns the resolved recipe and whether `--dry_run` was given. Raises SELMError on bad input.
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        TrlParser(list(_recipe_classes().values()), prog=f"python scripts/{stage}.py RECIPE.yaml --iteration K").print_help()
        sys.exit(0)
    if not argv or argv[0].startswith("--"):
        raise SELMError(f"usage: python scripts/{stage}.py RECIPE.yaml --iteration K [--key value ...]")
    path, rest = Path(argv[0]), argv[1:]
    raw = load_recipe_yaml(path)

    classes = _recipe_classes()
    fields = {f.name: f for cls in classes.values() for f in dataclasses.fields(cls) if f.init}
    stage_keys = {"iteration", "dry_run", "num_processes"}
    known = sorted(set(fields) | stage_keys)

    for key in raw:
        if key not in fields:
            raise _unknown_key_error(path, key, known)

    iteration, dry_run, num_processes, cli, overrides = None, False, None, [], {}
    for key, value in _split_cli(rest):
        if key == "dry_run":
            dry_run = value is None or value.lower() in ("1", "true", "yes")
        elif key in ("iteration", "num_processes"):
            if value is None or not value.lstrip("-").isdigit():
                raise SELMError(f"command line: --{key} needs a whole number, got {value!r}")
            if key == "iteration":
                iteration = int(value)
            else:
                num_processes = int(value)
        elif key not in fields:
            raise _unknown_key_error("command line", key, known)
        else:
            cli += [f"--{key}"] + ([] if value is None else [value])
            overrides[key] = value
    if iteration is None:
        raise SELMError(f"command line: --iteration K is required (python scripts/{stage}.py {path} --iteration K)")
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes < 1:
        raise SELMError(f"command line: --num_processes must be at least 1, got {num_processes}")

    # The iteration count decides how long per-iteration lists must be; read it before resolving them.
    from transformers.hf_argparser import string_to_bool

    def source(key):
        return "command line" if key in overrides else str(path)

    n_iter = _plan_value(path, "num_iterations", overrides.get("num_iterations", raw.get("num_iterations", 3)), int)
    try:
        check_limits({"num_iterations": n_iter})
    except BadValue as e:
        raise SELMError(f"{source('num_iterations')}: {e}") from None
    zero = _plan_value(path, "dpo_iteration_zero", True if "dpo_iteration_zero" in overrides and
                       overrides["dpo_iteration_zero"] is None else
                       overrides.get("dpo_iteration_zero", raw.get("dpo_iteration_zero", False)), string_to_bool)
    iterations = list(range(0 if zero else 1, n_iter + 1))
    if iteration not in iterations:
        raise SELMError(f"{path}: --iteration {iteration} is not one of this recipe's iterations {iterations}")

    types_ = {name: scalar_type(hint) for cls in classes.values()
              for name, hint in typing.get_type_hints(cls).items() if name in fields}
    resolved = {}
    for key, value in raw.items():
        if isinstance(value, list) and not _is_list_type(fields[key].type):
            if len(value) != len(iterations):
                raise SELMError(
                    f"{path}: '{key}' has {len(value)} per-iteration values but the recipe has "
                    f"{len(iterations)} iterations {iterations}"
                )
            try:  # every iteration's value, not only this one's: a dry run of iteration 1 sees a bad iteration 3
                for k, element in zip(iterations, value):
                    check_limits({key: typed(key, element, types_[key], f" for iteration {k}")},
                                 f" for iteration {k}")
            except BadValue as e:
                raise SELMError(f"{path}: {e}") from None
            value = value[iterations.index(iteration)]
        resolved[key] = value

    for key, allowed in CHOICES.items():
        value = overrides.get(key, resolved.get(key))
        if value is not None and value not in allowed:
            raise SELMError(f"{path}: '{key}' is {value!r}; expected one of {list(allowed)}")

    parser = TrlParser(list(classes.values()))
    parser.error = _raise_parse_error(path)
    parser.set_defaults_with_config(**resolved)
    namespace = parser.parse_args(cli)

    values = vars(namespace)
    groups = {name: {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}
              for name, cls in classes.items()}
    if zero and iteration == 0:
        groups["training"]["alpha"] = 0.0  # iteration 0 trains on the original pairs: no generated response exists
    try:
        for key in resolved:  # command-line values went through argparse's converters; recipe values may not have
            if key not in overrides:
                typed(key, values[key], types_[key])
        check_limits(groups["training"])
        built = {name: classes[name](**groups[name])
                 for name in ("model", "pipeline", "generation", "ranking", "evaluation")}
    except BadValue as e:
        raise SELMError(f"{source(e.key)}: {e}") from None
    recipe = Recipe(
        path=path,
        stage=stage,
        iteration=iteration,
        num_processes=num_processes,
        training=groups["training"],
        explicit_keys=set(raw) | set(overrides),
        **built,
    )
    if recipe.training.get("output_dir") in (None, ""):
        raise SELMError(f"{path}: 'output_dir' (the run directory) is required")
    if recipe.model.model_name_or_path in (None, ""):
        raise SELMError(f"{path}: 'model_name_or_path' (the base model) is required")
    recipe.gradient_accumulation_steps()  # fail early on an impossible batch split
    return recipe, dry_run


def _plan_value(path, key: str, value, convert):
    """num_iterations / dpo_iteration_zero, converted like argparse will convert them later."""
    try:
        return convert(value) if isinstance(value, str) or convert is int else bool(value)
    except (TypeError, ValueError):
        raise SELMError(f"{path}: '{key}' is {value!r}; expected {'a whole number' if convert is int else 'true or false'}") from None


def _raise_parse_error(path):
    """argparse prints its usage (hundreds of lines here) and exits; say the one thing that is wrong instead."""

    def error(message):
        raise SELMError(f"{path} (or its command-line overrides): {message}")

    return error


def main_guard(fn):
    """Run a stage's main(): bad input becomes one line on stderr and exit code 2, never a traceback wall."""

    def wrapper(argv=None):
        try:
            return fn(argv)
        except SELMError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# Planned by the Makefile from the recipe file itself, so they cannot change through overrides.
PLAN_KEYS = ("num_iterations", "dpo_iteration_zero")


def freeze_recipe(argv: list[str], allow_plan_keys: bool = False) -> tuple[Path, str]:
    """Merge RECIPE with `--key value` overrides into `<output_dir>/recipe.yaml` (see scripts/freeze_recipe.py).

    Returns (frozen path, what happened). Raises SELMError for unknown keys, bad per-iteration lists, a plan key
    among the overrides (unless `allow_plan_keys`: a sweep writes them into each run's own frozen recipe, which is
    what the Makefile then plans from), or a frozen recipe that differs from this one.
    """
    from selm.io import atomic_path

    if not argv or argv[0].startswith("--"):
        raise SELMError("usage: python scripts/freeze_recipe.py RECIPE.yaml --output_dir RUN_DIR [--key value ...]")
    source = Path(argv[0])
    recipe = load_recipe_yaml(source)
    overrides = _split_cli(argv[1:])
    if [k for k, _ in overrides].count("output_dir") > 1:
        raise SELMError("command line: 'output_dir' is the run directory; set it with RUN_DIR (or RUN_ROOT), not in ARGS")
    for key, value in overrides:
        if key in PLAN_KEYS and not allow_plan_keys:
            raise SELMError(f"command line: '{key}' shapes the plan; set it in the recipe file, not in ARGS")
        recipe[key] = True if value is None else yaml.safe_load(value)
    if not recipe.get("output_dir"):
        raise SELMError(f"{source}: 'output_dir' (the run directory) is required")
    frozen = Path(recipe["output_dir"]) / "recipe.yaml"

    if frozen.exists():
        previous = load_recipe_yaml(frozen)
        changed = sorted(k for k in set(previous) | set(recipe) if previous.get(k) != recipe.get(k))
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {recipe.get(k)!r}" for k in changed[:5])
            raise SELMError(
                f"{frozen}: this run was started with other settings ({detail}); "
                "use another RUN_DIR, or delete the run directory to start over"
            )
        return frozen, "using the frozen recipe"

    first = 0 if recipe.get("dpo_iteration_zero") else 1
    with atomic_path(frozen) as tmp:
        tmp.write_text(f"# Frozen from {source}; every stage of this run reads this file.\n"
                       + yaml.safe_dump(recipe, sort_keys=False))
        try:  # every key and per-iteration list, for every iteration, before the file gets its final name
            for k in range(first, int(recipe.get("num_iterations", PipelineConfig.num_iterations)) + 1):
                parse_recipe([str(tmp), "--iteration", str(k)], stage="freeze")
        except SELMError as e:
            raise SELMError(str(e).replace(str(tmp), f"{source} (with overrides)")) from None
    return frozen, "frozen"
