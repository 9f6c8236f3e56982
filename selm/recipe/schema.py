"""The recipe's dataclasses, each constraint beside its field, and the one pass that checks them (trl style).

A field's `metadata` holds its help text and, where the value is restricted, `choices` (the allowed values), `min`
(lowest allowed), `above` (exclusive lower bound), `max` (highest allowed) and `note` (why, appended to the error).
`check_fields` enforces them when a dataclass is built (`CheckedArguments.__post_init__`, like trl's
`DPOConfig.__post_init__`); `check_value` is the same rule for one value, which the parser applies to every element
of a per-iteration list and to the training values (a dict until `SELMConfig` is built, which dry runs never do).
Fields inherited from trl cannot carry our metadata, so their constraints sit in `TRL_FIELDS`.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from selm.errors import SELMError

CONSTRAINT_KEYS = ("choices", "min", "above", "max", "note")


class BadValue(SELMError):
    """A value outside its field's constraints or of the wrong type; the parser prefixes where it came from."""

    def __init__(self, key: str, value, why: str, where: str = ""):
        self.key = key
        super().__init__(f"'{key}' is {value!r}{where}; {why}")


def _bounds_text(rule: dict) -> str:
    low, above, high = rule.get("min"), rule.get("above"), rule.get("max")
    if above is not None and high is not None:
        text = f"it must be in ({above}, {high}]"
    elif above is not None:
        text = f"it must be > {above}"
    elif low == 0:
        text = "it must be >= 0"
    else:
        text = f"it must be at least {low}"
    return f"{text} ({rule['note']})" if rule.get("note") else text


def check_value(key: str, value, rule: dict, where: str = "") -> None:
    """Raise BadValue when `value` breaks `rule` (a field's constraint metadata). None means "unset": not checked."""
    if value is None:
        return
    if "choices" in rule and value not in rule["choices"]:
        raise BadValue(key, value, f"expected one of {list(rule['choices'])}", where)
    if not any(k in rule for k in ("min", "above", "max")):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return  # a wrong type is the converter's error (selm.recipe.parse.typed), reported before this
    ok = math.isfinite(value)
    ok = ok and ("min" not in rule or value >= rule["min"]) and ("above" not in rule or value > rule["above"])
    if not (ok and ("max" not in rule or value <= rule["max"])):
        raise BadValue(key, value, _bounds_text(rule), where)


def rules_of(cls) -> dict:
    """{field name: constraint metadata} of a dataclass (TRL_FIELDS for the fields trl declares)."""
    rules = {}
    for f in dataclasses.fields(cls):
        rule = {k: v for k, v in {**f.metadata, **TRL_FIELDS.get(f.name, {})}.items() if k in CONSTRAINT_KEYS}
        if rule:
            rules[f.name] = rule
    return rules


def check_fields(obj) -> None:
    """The one check pass: every constrained field of a built dataclass."""
    for name, rule in rules_of(type(obj)).items():
        check_value(name, getattr(obj, name), rule)


def check_prompt_room(values: dict, where: str = "") -> None:
    """Cross-key limit: `max_prompt_length` must leave room for the answer within `max_length` (trl keeps the
    prompt's last max_prompt_length tokens, then cuts prompt + answer to max_length: no answer token would remain)."""
    prompt, total = values.get("max_prompt_length"), values.get("max_length")
    if prompt is not None and total is not None and prompt >= total:
        raise BadValue("max_prompt_length", prompt, f"it must be below max_length ({total}), which holds prompt and "
                       "answer together: nothing of the answer would be trained on", where)


class CheckedArguments:
    """Mixin: a dataclass whose fields are checked against their constraint metadata when it is built."""

    def __post_init__(self):
        check_fields(self)


# Constraints (and, for output_dir, the help text a recipe needs) of fields that trl's DPOConfig declares.
TRL_FIELDS = {
    "output_dir": {"help": "The run directory (RUN_DIR): iter-K/ for each iteration, the frozen recipe.yaml, the "
                           "summary. The trainer's own output_dir is iter-K/checkpoints, set per iteration."},
    "beta": {"above": 0, "note": "beta <= 0 flips or removes the preference objective"},
    "learning_rate": {"above": 0},
    "num_train_epochs": {"above": 0},
    "per_device_train_batch_size": {"min": 1},
    "gradient_accumulation_steps": {"min": 1},
    "max_length": {"min": 1, "note": "or null for no limit"},
    "warmup_steps": {"min": 0, "note": "a value below 1 is a fraction of the steps"},
}


def iteration_list(num_iterations: int, dpo_iteration_zero: bool) -> list[int]:
    """The iterations of a run: 1..N, with 0 first when iteration 0 is plain DPO on the original pairs."""
    return list(range(0 if dpo_iteration_zero else 1, num_iterations + 1))


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
        default=None,
        metadata={"help": "Keep only the first N rows before splitting (CI uses 100).", "min": 1,
                  "note": "or null for all rows"},
    )
    num_iterations: int = field(
        default=3, metadata={"help": "Number of SELM (or iterative DPO) iterations.", "min": 1}
    )
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
        metadata={"help": "'contiguous' (the paper: consecutive slices) or 'shuffled' (seeded permutation first).",
                  "choices": ("contiguous", "shuffled")},
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the permutation when portion_split is 'shuffled'."})
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "Keep iter-K/checkpoints after iter-K/model is saved (they hold the optimizer states)."},
    )
    reference_model: str = field(
        default="previous_iteration",
        metadata={"help": "pi_ref of each iteration: 'previous_iteration' (SELM's pi_{t-1}, the iteration's start "
                  "model) or 'initial' (the fixed pi_0: the base model, model_name_or_path). Training and the "
                  "implicit rewards follow it.", "choices": ("previous_iteration", "initial")},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per optimizer step over all processes. When set, gradient_accumulation_steps is "
            "derived from it and the process count, so changing the GPU count does not change the batch.",
            "min": 1,
        },
    )

    @property
    def first_iteration(self) -> int:
        return 0 if self.dpo_iteration_zero else 1

    @property
    def iterations(self) -> list[int]:
        return iteration_list(self.num_iterations, self.dpo_iteration_zero)


@dataclass
class GenerationArguments(CheckedArguments):
    """How the starting model of an iteration answers the prompts of its portion."""

    generation_backend: str = field(
        default="vllm",
        metadata={"help": "'vllm' (GPU) or 'hf' (transformers generate).", "choices": ("vllm", "hf")},
    )
    temperature: float = field(
        default=0.0, metadata={"help": "0 means greedy decoding (the paper).", "min": 0, "note": "0 is greedy decoding"}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass.", "above": 0, "max": 1})
    num_responses: int = field(
        default=1, metadata={"help": "Responses per prompt; the first is reference_response.", "min": 1}
    )
    max_new_tokens: int = field(default=1024, metadata={"help": "Generated tokens per response at most.", "min": 1})
    generation_seed: int = field(default=0, metadata={"help": "Sampling seed."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per batch of the hf backend.", "min": 1})
    generation_shard_size: int = field(
        default=2048,
        metadata={"help": "Prompts per saved shard: an interrupted generation resumes at a shard.", "min": 1},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model replica.", "min": 1})
    data_parallel_size: int = field(
        default=1,
        metadata={"help": "vLLM: replicas, one process each over a contiguous shard of the prompts.", "min": 1},
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vLLM: fraction of GPU memory it may use.", "above": 0, "max": 1}
    )
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "vLLM: context length; prompt + max_new_tokens must fit.", "min": 1,
                  "note": "or null for the model's own context length"},
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

    ranker: str = field(
        default="pairrm",
        metadata={"help": "'pairrm', 'reward_model' or 'oracle'.", "choices": ("pairrm", "reward_model", "oracle")},
    )
    ranker_model_name_or_path: str = field(
        default="llm-blender/PairRM", metadata={"help": "Hub id or local directory of the ranker model."}
    )
    ranker_batch_size: int = field(default=16, metadata={"help": "Candidates or pairs per ranker forward.", "min": 1})
    ranker_max_length: int = field(default=2048, metadata={"help": "Token limit of one ranker input.", "min": 1})
    pairrm_dtype: str = field(
        default="float32",
        metadata={"help": "PairRM's weights on a GPU: 'float32', or 'float16' (llm-blender's own default there, which "
                  "this project never ran; a NaN score stops the stage). On CPU always float32.",
                  "choices": ("float32", "float16")},
    )
    oracle_reward: str | None = field(
        default=None, metadata={"help": "'module:function' scoring (prompt_messages, response_text) -> float."}
    )
    update_rule: str = field(
        default="best_worst",
        metadata={
            "help": "'best_worst' (paper: best candidate chosen, worst rejected), 'replace' (Appendix C: the "
            "generated response replaces chosen if better, rejected if worse), 'original' (keep the dataset pair), "
            "'rso' (the pair drawn by statistical rejection sampling, rso_beta) or 'rest' (ReST: the generated "
            "responses scoring >= rest_threshold, trained with the supervised loss). docs/methods.md.",
            "choices": ("best_worst", "replace", "original", "rso", "rest"),
        },
    )
    candidates: str = field(
        default="generated_and_pair",
        metadata={"help": "What is scored and ranked: 'generated_and_pair' (the paper: the generated responses and "
                  "the dataset's chosen and rejected) or 'generated' (best-of-n over the generated responses only).",
                  "choices": ("generated_and_pair", "generated")},
    )
    rso_beta: float | None = field(
        default=None,
        metadata={"help": "RSO's beta_r: a candidate is accepted with probability exp((r - r_max) / rso_beta) "
                  "(update_rule: rso only).", "above": 0},
    )
    rest_threshold: float | None = field(
        default=None,
        metadata={"help": "ReST's threshold: generated responses scoring >= it are trained on (update_rule: rest "
                  "only; a per-iteration list raises it step by step)."},
    )
    on_tie: str = field(
        default="drop",
        metadata={"help": "Rows whose best and worst score tie: 'drop' or 'keep'.", "choices": ("drop", "keep")},
    )


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
        default=None,
        metadata={"help": "Evaluate on the first N held-out rows only (more than the split is an error).", "min": 1,
                  "note": "or null for all rows"},
    )


def recipe_classes() -> dict:
    """The dataclasses whose fields are a recipe's keys, by group (trl's are imported only when asked for)."""
    from trl import ModelConfig

    from selm.trainer_config import SELMConfig

    return {"model": ModelConfig, "pipeline": PipelineConfig, "generation": GenerationArguments,
            "ranking": RankingArguments, "evaluation": EvaluationArguments, "training": SELMConfig}
