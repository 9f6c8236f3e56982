"""Every path and artifact name of a run, in one place (docs/DESIGN.md §4).

    <run_dir>/recipe.yaml                 the frozen recipe (recipe + overlay + overrides)
    <run_dir>/run_info.json               what ran, where, with which software
    <run_dir>/summary.{json,md,png}       the run's summary; eval_metric.png, eval_rewards.png its figures
    <run_dir>/exploration.{json,md}       exploration diagnostics and costs per iteration (selm/exploration.py)
    <run_dir>/logs/<stage>.log            a stage's output when the run logs stages to files
    <run_dir>/.error-<stage>              a launched stage's error line, repeated after its launcher's report
    <iter>/portion.parquet                the iteration's slice of the preference data
    <iter>/generated.parquet              the portion + the start model's responses (generated.shards/ while running)
    <iter>/generate_report.json           what generation dropped and why
    <iter>/ranked.parquet                 the rewritten pairs (ranking_dropped.parquet, rank_report.json beside)
    <iter>/model/                         the trained model; checkpoints/ while training; train_config.yaml, train_log.json
    <iter or base>/eval/                  answers.parquet, metrics.json, implicit_rewards.parquet

<iter> is <run_dir>/iter-K, except a shared iteration 0 (`iteration_zero_dir`), which lives where the recipe says;
the base model's evaluation lives beside a shared iteration 0 (the runs sharing it share it) or in <run_dir>/base.
An artifact that exists is complete: every one is written to a temporary name and renamed (selm.io).
"""

from dataclasses import dataclass
from pathlib import Path

# Artifact file names inside an iteration directory.
PORTION = "portion.parquet"
GENERATED = "generated.parquet"
GENERATED_SHARDS = "generated.shards"
GENERATE_REPORT = "generate_report.json"
RANKED = "ranked.parquet"
RANKING_DROPPED = "ranking_dropped.parquet"
RANK_REPORT = "rank_report.json"
MODEL = "model"
CHECKPOINTS = "checkpoints"
TRAIN_CONFIG = "train_config.yaml"
TRAIN_LOG = "train_log.json"
EVAL = "eval"
EVAL_ANSWERS = "answers.parquet"
EVAL_METRICS = "metrics.json"
EVAL_ANSWER_SHARDS = "answers.shards"
IMPLICIT_REWARDS = "implicit_rewards.parquet"
# Inside a shard directory (generated.shards/, eval/answers.shards/): the settings that made it, and the shards.
SHARD_SETTINGS = "settings.json"
SHARD_FILE = "shard-{:05d}.parquet"
# Files of the run directory.
FROZEN_RECIPE = "recipe.yaml"
RUN_INFO = "run_info.json"
SUMMARY_JSON, SUMMARY_MD, SUMMARY_PNG = "summary.json", "summary.md", "summary.png"
EVAL_METRIC_PNG, EVAL_REWARDS_PNG = "eval_metric.png", "eval_rewards.png"
EXPLORATION_JSON, EXPLORATION_MD = "exploration.json", "exploration.md"
LOGS = "logs"
# Files of a comparison's output directory (selm/comparison.py: several runs side by side).
COMPARISON_JSON, COMPARISON_MD = "comparison.json", "comparison.md"
COMPARISON_METRIC_PNG, COMPARISON_REWARDS_PNG = "metric_per_iteration.png", "reward_distributions.png"
COMPARISON_IMPLICIT_PNG = "implicit_rewards.png"
ERROR_PREFIX = ".error-"
ITER_PREFIX = "iter-"
BASE = "base"
# Files of a sweep's output root (one run directory per combination beside them).
SWEEP_TABLE_MD, SWEEP_TABLE_CSV, SWEEP_REWARDS_PNG = "sweep_table.md", "sweep_table.csv", "sweep_rewards.png"


def default_run_dir(run_root, recipe) -> Path:
    """A run's directory when none is named: RUN_ROOT/<recipe's folder>-<recipe's name> (runs/smoke-selm)."""
    recipe = Path(recipe)
    return Path(run_root) / f"{recipe.resolve().parent.name}-{recipe.stem}"


@dataclass(frozen=True)
class RunLayout:
    """The directories of one run. `iteration_zero_dir` is a shared iteration 0 (None: <run_dir>/iter-0)."""

    run_dir: Path
    iteration_zero_dir: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.iteration_zero_dir is not None:
            object.__setattr__(self, "iteration_zero_dir", Path(self.iteration_zero_dir))

    # ---- directories ----
    def iter_dir(self, k: int) -> Path:
        if k == 0 and self.iteration_zero_dir is not None:
            return self.iteration_zero_dir
        return self.run_dir / f"{ITER_PREFIX}{k}"

    def base_dir(self) -> Path:
        """The base model's directory (only its evaluation lives there)."""
        return (self.iteration_zero_dir if self.iteration_zero_dir is not None else self.run_dir) / BASE

    def stage_dir(self, k: "int | str") -> Path:
        """An iteration's directory, or the base directory for k == 'base'."""
        return self.base_dir() if k == BASE else self.iter_dir(int(k))

    # ---- per-iteration artifacts ----
    def portion(self, k: int) -> Path:
        return self.iter_dir(k) / PORTION

    def generated(self, k: int) -> Path:
        return self.iter_dir(k) / GENERATED

    def generated_shards(self, k: int) -> Path:
        return self.iter_dir(k) / GENERATED_SHARDS

    def generate_report(self, k: int) -> Path:
        return self.iter_dir(k) / GENERATE_REPORT

    def ranked(self, k: int) -> Path:
        return self.iter_dir(k) / RANKED

    def ranking_dropped(self, k: int) -> Path:
        return self.iter_dir(k) / RANKING_DROPPED

    def rank_report(self, k: int) -> Path:
        return self.iter_dir(k) / RANK_REPORT

    def model(self, k: int) -> Path:
        return self.iter_dir(k) / MODEL

    def checkpoints(self, k: int) -> Path:
        return self.iter_dir(k) / CHECKPOINTS

    def train_config(self, k: int) -> Path:
        return self.iter_dir(k) / TRAIN_CONFIG

    def train_log(self, k: int) -> Path:
        return self.iter_dir(k) / TRAIN_LOG

    def eval_dir(self, k: "int | str") -> Path:
        return self.stage_dir(k) / EVAL

    def eval_answers(self, k: "int | str") -> Path:
        return self.eval_dir(k) / EVAL_ANSWERS

    def eval_metrics(self, k: "int | str") -> Path:
        return self.eval_dir(k) / EVAL_METRICS

    def implicit_rewards(self, k: int) -> Path:
        return self.eval_dir(k) / IMPLICIT_REWARDS

    # ---- run-level files ----
    @property
    def frozen_recipe(self) -> Path:
        return self.run_dir / FROZEN_RECIPE

    @property
    def run_info(self) -> Path:
        return self.run_dir / RUN_INFO

    def summary(self, suffix: str = "json") -> Path:
        return self.run_dir / {"json": SUMMARY_JSON, "md": SUMMARY_MD, "png": SUMMARY_PNG}[suffix]

    @property
    def eval_metric_figure(self) -> Path:
        return self.run_dir / EVAL_METRIC_PNG

    @property
    def eval_rewards_figure(self) -> Path:
        return self.run_dir / EVAL_REWARDS_PNG

    def log(self, stage: str) -> Path:
        return self.run_dir / LOGS / f"{stage}.log"

    def error_file(self, stage: str) -> Path:
        return self.run_dir / f"{ERROR_PREFIX}{stage}"

    def iterations_present(self) -> list[tuple[int, Path]]:
        """(k, directory) of the iteration directories under run_dir, in order (a shared iteration 0 first)."""
        found = {}
        if self.iteration_zero_dir is not None and self.iteration_zero_dir.is_dir():
            found[0] = self.iteration_zero_dir
        if self.run_dir.is_dir():
            for path in self.run_dir.iterdir():
                suffix = path.name[len(ITER_PREFIX):]
                if path.name.startswith(ITER_PREFIX) and suffix.isdigit() and path.is_dir():
                    found.setdefault(int(suffix), path)
        return sorted(found.items())
