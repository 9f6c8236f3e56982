"""`SELMConfig`: trl's `DPOConfig` plus SELM's optimism coefficient.

Its constraints (and those of the DPOConfig fields a recipe sets) are checked by the recipe's one check pass
(`selm.recipe.schema.check_fields`): when a recipe is parsed, and again when the config is built directly (benchmarks,
tests and library callers construct it without a recipe).
"""

from dataclasses import dataclass, field

from trl import DPOConfig

from selm.prefix_sharing import parse_mode
from selm.recipe.schema import check_fields


@dataclass
class SELMConfig(DPOConfig):
    """DPOConfig with the SELM optimism term (docs/DESIGN.md §1).

    loss = -log σ(β·Δ) + alpha·β·(log πθ(y_ref) − log πref(y_ref)), with y_ref the `reference_response` column.
    """

    alpha: float = field(
        default=0.0,
        metadata={
            "help": "SELM optimism coefficient. The term is alpha * beta * (log pi(y_ref) - log ref(y_ref)), as in "
            "the official code (the paper's Algorithm 1 omits beta). 0 gives plain DPO (sigmoid loss).",
            "min": 0,
            "note": "0 is plain DPO",
        },
    )
    # Nothing leaves the machine by surprise: when a recipe does set push_to_hub, the repository is private.
    hub_private_repo: bool | None = field(
        default=True,
        metadata={"help": "Create the hub repository as private (push_to_hub is off unless the recipe sets it)."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the last N prompt tokens (the paper: 512). None: the prompt is only cut by max_length.",
            "min": 1,
            "note": "or null for no prompt cut",
        },
    )

    prefix_sharing: str = field(
        default="auto",
        metadata={
            "help": "Score each prompt once for all its completions: one packed row per example with a 4-D attention "
            "mask, exact (README, Performance). 'auto' (default): per batch, only when the estimate from its token "
            "counts and attention area says it is at least 10%% cheaper, and never where 'true' would refuse (so "
            "never with flash_attention_2). 'true': every batch (needs attn_implementation sdpa or eager; refuses "
            "flash_attention_2, truncation_mode keep_end, prompt-learning PEFT, an MoE auxiliary loss and "
            "compute_metrics). 'false': one row per completion, as trl does.",
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.prefix_sharing = parse_mode(self.prefix_sharing)
        check_fields(self)
