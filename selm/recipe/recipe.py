"""`Recipe`: a recipe resolved for one stage and one iteration, with its run layout and batch arithmetic."""

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from selm.errors import SELMError
from selm.layout import RunLayout
from selm.recipe.schema import EvaluationArguments, GenerationArguments, PipelineConfig, RankingArguments


def _selm_config_class():
    from selm.trainer_config import SELMConfig  # imports trl; kept out of module import time

    return SELMConfig


@dataclass
class Recipe:
    """A recipe resolved for one stage and one iteration.

    `model`, `pipeline`, `generation`, `ranking` and `evaluation` are dataclass instances. Training values stay a
    dict until `training_config()` builds the `SELMConfig`, because building one validates the device (bf16 needs
    a GPU), and a dry run must work on a machine without one. `training["output_dir"]` is the recipe's key: the run
    directory (`run_dir`), not the trainer's output_dir (this iteration's checkpoints, see `training_config`).
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

    # ---- run layout (docs/DESIGN.md §4): every path comes from selm.layout ----
    @property
    def run_dir(self) -> Path:
        return Path(self.training["output_dir"])

    @property
    def layout(self) -> RunLayout:
        shared = self.pipeline.iteration_zero_dir if self.pipeline.dpo_iteration_zero else None
        return RunLayout(self.run_dir, shared)

    def iter_dir(self, k: int | None = None) -> Path:
        """Iteration k's directory (default: this one's; for `--iteration base`: the base directory)."""
        if k is None and self.base:
            return self.layout.base_dir()
        return self.layout.iter_dir(self.iteration if k is None else k)

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
        return str(self.layout.model(self.iteration - 1))

    @property
    def reference_model(self) -> str:
        """π_ref of this iteration (recipe key reference_model), the one rule training and the implicit rewards
        follow: the start model (previous_iteration, SELM's π_{t−1}) or the base model (initial, the fixed π_0)."""
        if self.pipeline.reference_model == "initial":
            return self.model.model_name_or_path
        return self.start_model

    @property
    def trained_model(self) -> str:
        """The model this iteration produces (for `--iteration base`: the base model itself)."""
        return self.model.model_name_or_path if self.base else str(self.layout.model(self.iteration))

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

    def training_config(self, config_class=None, **overrides):
        """The `SELMConfig` of this iteration: its learning rate, derived accumulation, checkpoints under iter-K.
        `config_class` (ReST: trl's SFTConfig) takes the values among its own fields instead."""
        values = dict(self.training)
        values["output_dir"] = str(self.layout.checkpoints(self.iteration))  # the trainer's output_dir
        values["gradient_accumulation_steps"] = self.gradient_accumulation_steps()
        if values.get("push_to_hub") and not values.get("hub_model_id"):
            # trl would name the repository after the output dir, "checkpoints", for every iteration of every run
            values["hub_model_id"] = f"{self.run_dir.name}-iter-{self.iteration}"
        values.update(overrides)
        config_class = config_class or _selm_config_class()
        names = {f.name for f in dataclasses.fields(config_class) if f.init}
        return config_class(**{k: v for k, v in values.items() if k in names})

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
            "reference_model": self.reference_model,
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

