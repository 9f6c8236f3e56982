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

from selm.cli import main_guard, split_cli  # noqa: F401  (main_guard: scripts still import it from here)
from selm.errors import SELMError
from selm.limits import BadValue, CheckedArguments, check_limits, check_prompt_room, scalar_type, typed


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
    vllm_enforce_eager: bool = field(
        default=False,
        metadata={"help": "vLLM: no CUDA graphs / warm-up compilation (starts faster, generates slower; the CPU "
                  "rehearsal uses it)."},
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
    pairrm_dtype: str = field(
        default="float32",
        metadata={"help": "PairRM's weights on a GPU: 'float32', or 'float16' (llm-blender's own default there, which "
                  "this project never ran; a NaN score stops the stage). On CPU always float32."},
    )
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
    """Held-out evaluation of a model: greedy answers to held-out prompts, scored against each row's chosen answer."""

    evaluate: bool = field(
        default=False,
        metadata={"help": "`make run` evaluates the starting model once and every iteration's model after training."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out data (hub id, directory of split files or one file); default: dataset_name."},
    )
    eval_split: str = field(
        default="test_prefs", metadata={"help": "Held-out split (the paper: UltraFeedback test_prefs, 2,000 prompts)."}
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N held-out rows only (more than the split is an error)."}
    )


# Chosen to match a `choices` check below; a typo in one of these keys' values is reported like a typo in a key.
CHOICES = {
    "portion_split": ("contiguous", "shuffled"),
    "generation_backend": ("vllm", "hf"),
    "ranker": ("pairrm", "reward_model", "oracle"),
    "update_rule": ("best_worst", "replace", "original"),
    "on_tie": ("drop", "keep"),
    "pairrm_dtype": ("float32", "float16"),
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
    base: bool = False  # `--iteration base` (evaluation, export): the run's starting model, before any iteration

    # ---- run layout (docs/DESIGN.md §4) ----
    @property
    def run_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def iter_dir(self, k: int | None = None) -> Path:
        if k is None and self.base:
            return base_dir(self.run_dir, self.pipeline.iteration_zero_dir if self.pipeline.dpo_iteration_zero else None)
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
    def trained_model(self) -> str:
        """The model this iteration produces (for `--iteration base`: the base model itself)."""
        return self.model.model_name_or_path if self.base else str(self.iter_dir() / "model")

    @property
    def iteration_name(self) -> str:
        return "base" if self.base else str(self.iteration)

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
            "iteration": "base" if self.base else self.iteration,
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


def base_dir(run_dir, shared_iteration_zero: str | None) -> Path:
    """Where the base model's evaluation lives: beside a shared iteration 0 (the runs that share it start from the
    same model, so they share its evaluation), else in the run directory."""
    return Path(shared_iteration_zero) / "base" if shared_iteration_zero else Path(run_dir) / "base"


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SELMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SELMError(f"{path}: a recipe must be a YAML mapping of key: value")
    return data


def _unknown_key_error(source, key, known) -> SELMError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return SELMError(f"{source}: unknown key '{key}'{hint}")


# Stages that accept `--iteration base` (the run's starting model).
BASE_STAGES = ("evaluate", "export")


def parse_recipe(argv: list[str] | None = None, stage: str = "train", raw: dict | None = None) -> tuple[Recipe, bool]:
    """Parse `RECIPE.yaml --iteration K [--dry_run] [--num_processes N] [--key value ...]`.

    Returns the resolved recipe and whether `--dry_run` was given. Raises SELMError on bad input. `raw`: an already
    merged recipe mapping to parse instead of reading the file (argv[0] then only names it in messages).
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        TrlParser(list(_recipe_classes().values()), prog=f"python scripts/{stage}.py RECIPE.yaml --iteration K").print_help()
        sys.exit(0)
    if not argv or argv[0].startswith("--"):
        raise SELMError(f"usage: python scripts/{stage}.py RECIPE.yaml --iteration K [--key value ...]")
    path, rest = Path(argv[0]), argv[1:]
    raw = load_recipe_yaml(path) if raw is None else dict(raw)

    classes = _recipe_classes()
    fields = {f.name: f for cls in classes.values() for f in dataclasses.fields(cls) if f.init}
    stage_keys = {"iteration", "dry_run", "num_processes"}
    known = sorted(set(fields) | stage_keys)

    for key in raw:
        if key not in fields:
            raise _unknown_key_error(path, key, known)

    iteration, dry_run, num_processes, cli, overrides, base = None, False, None, [], {}, False
    for key, value in split_cli(rest):
        if key == "dry_run":
            dry_run = value is None or value.lower() in ("1", "true", "yes")
        elif key == "iteration" and value == "base":
            if stage not in BASE_STAGES:
                raise SELMError(f"command line: --iteration base is for {' and '.join(BASE_STAGES)} only")
            base = True
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
    if iteration is None and not base:
        raise SELMError(f"command line: --iteration K is required (python scripts/{stage}.py {path} --iteration K)")
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes < 1:
        raise SELMError(f"command line: --num_processes must be at least 1, got {num_processes}")

    def source(key):
        return "command line" if key in overrides else str(path)

    # The iteration count decides how long per-iteration lists must be; read it as the Makefile's plan does.
    plan_keys = {**raw, **{k: (True if v is None else v) for k, v in overrides.items()
                           if k in ("num_iterations", "dpo_iteration_zero")}}
    plan = _plan_of({k: plan_keys[k] for k in ("num_iterations", "dpo_iteration_zero") if k in plan_keys}, path)
    zero, iterations = plan["dpo_iteration_zero"], plan["iterations"]
    if base:
        iteration = iterations[0]  # the base model is evaluated with the first iteration's settings
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
    _check_prompt_room_of_every_iteration(raw, iterations, fields, path)

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
        check_prompt_room(groups["training"])
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
        base=base,
        **built,
    )
    if recipe.training.get("output_dir") in (None, ""):
        raise SELMError(f"{path}: 'output_dir' (the run directory) is required")
    if recipe.model.model_name_or_path in (None, ""):
        raise SELMError(f"{path}: 'model_name_or_path' (the base model) is required")
    recipe.gradient_accumulation_steps()  # fail early on an impossible batch split
    from selm.prefix_sharing import check_attention  # prefix sharing needs a kernel that takes a 4-D mask

    check_attention(recipe.model.attn_implementation, recipe.training.get("prefix_sharing", "false"), source=str(path))
    return recipe, dry_run


def _check_prompt_room_of_every_iteration(raw: dict, iterations: list[int], fields: dict, path) -> None:
    """`check_prompt_room` on each iteration's recipe values (per-iteration lists included; a key the recipe does not
    set has its default), so a dry run of iteration 1 already refuses iteration 3's lengths."""
    keys = ("max_length", "max_prompt_length")
    if not any(isinstance(raw.get(key), list) for key in keys):
        return  # the same values for every iteration: checked once below, with the command line's overrides
    for position, k in enumerate(iterations):
        values = {}
        for key in keys:
            value = raw.get(key, fields[key].default)
            values[key] = typed(key, value[position] if isinstance(value, list) else value, int)
        try:
            check_prompt_room(values, f" for iteration {k}")
        except BadValue as e:
            raise SELMError(f"{path}: {e}") from None


def _plan_value(path, key: str, value, convert):
    """A value that shapes the plan (num_iterations, dpo_iteration_zero, ...), converted as argparse will convert it."""
    if convert is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise SELMError(f"{path}: '{key}' is {value!r}; expected a whole number")
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise SELMError(f"{path}: '{key}' is {value!r}; expected {'a whole number' if convert is int else 'true or false'}") from None


def _raise_parse_error(path):
    """argparse prints its usage (hundreds of lines here) and exits; say the one thing that is wrong instead."""

    def error(message):
        raise SELMError(f"{path} (or its command-line overrides): {message}")

    return error


def merge_recipe_sources(argv: list[str], usage: str) -> tuple[Path, dict, str]:
    """`RECIPE.yaml [--overlay PATH ...] [--key value ...]` -> (recipe path, merged mapping, where it came from).

    Later sources win: the recipe, then each overlay file (e.g. recipes/rehearsal.yaml), then the command line.
    Command-line values are YAML scalars or flow lists (`--learning_rate [5e-7,3e-7]`), never evaluated.
    """
    if not argv or argv[0].startswith("--"):
        raise SELMError(f"usage: {usage}")
    source = Path(argv[0])
    recipe = load_recipe_yaml(source)
    described = str(source)
    overrides = split_cli(argv[1:])
    for key, value in overrides:
        if key == "overlay":
            if value is None:
                raise SELMError("command line: --overlay needs a recipe file")
            recipe.update(load_recipe_yaml(value))
            described += f" + {value}"
    if [k for k, _ in overrides].count("output_dir") > 1:
        raise SELMError("command line: 'output_dir' is the run directory; set it with RUN_DIR (or RUN_ROOT), not in ARGS")
    for key, value in overrides:
        if key != "overlay":
            recipe[key] = True if value is None else yaml.safe_load(value)
    if any(k not in ("overlay", "output_dir") for k, _ in overrides):
        described += " (with overrides)"
    if not recipe.get("output_dir"):
        raise SELMError(f"{source}: 'output_dir' (the run directory) is required")
    return source, recipe, described


FREEZE_USAGE = "python scripts/freeze_recipe.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR [--key value ...]"


def freeze_recipe(argv: list[str]) -> tuple[Path, str]:
    """Merge RECIPE, overlays and `--key value` overrides into `<output_dir>/recipe.yaml` (scripts/freeze_recipe.py).

    Returns (frozen path, what happened). Raises SELMError for unknown keys, bad values or per-iteration lists (every
    iteration is parsed before the file gets its final name), or a frozen recipe that differs from this one.
    """
    from selm.io import atomic_path

    source, recipe, described = merge_recipe_sources(argv, FREEZE_USAGE)
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

    check_every_iteration(recipe, described)  # before anything is written
    with atomic_path(frozen) as tmp:
        tmp.write_text(f"# Frozen from {described}; every stage of this run reads this file.\n"
                       + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return frozen, "frozen"


def check_every_iteration(recipe: dict, described: str) -> None:
    """Parse a merged recipe mapping for each of its iterations (every key, type and per-iteration list)."""
    for k in _plan_of(recipe, described)["iterations"]:
        parse_recipe([described, "--iteration", str(k)], stage="freeze", raw=recipe)


def _to_bool(value) -> bool:
    """Recipe booleans as argparse reads them (transformers' string_to_bool): yes/no, true/false, t/f, y/n, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(value)


def _plan_of(recipe: dict, described: str) -> dict:
    """The iteration structure of a merged recipe mapping: what the Makefile plans and parse_recipe resolves."""
    n_iter = _plan_value(described, "num_iterations", recipe.get("num_iterations", PipelineConfig.num_iterations), int)
    if n_iter < 1:
        raise SELMError(f"{described}: 'num_iterations' is {n_iter}; it must be at least 1")
    zero = _plan_value(described, "dpo_iteration_zero", recipe.get("dpo_iteration_zero", False), _to_bool)
    iterations = list(range(0 if zero else 1, n_iter + 1))

    def per_iteration(key, default, convert):
        value = recipe.get(key, default)
        values = value if isinstance(value, list) else [value] * len(iterations)
        if len(values) != len(iterations):
            raise SELMError(f"{described}: '{key}' has {len(values)} per-iteration values but the recipe has "
                            f"{len(iterations)} iterations {iterations}")
        return {k: _plan_value(described, key, v, convert) for k, v in zip(iterations, values)}

    return {"iterations": iterations, "dpo_iteration_zero": zero,
            "iteration_zero_dir": recipe.get("iteration_zero_dir"),
            "evaluate": per_iteration("evaluate", False, _to_bool),
            "tensor_parallel_size": per_iteration("tensor_parallel_size", 1, int)}
