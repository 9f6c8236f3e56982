"""`SELMConfig`: trl's `DPOConfig` plus SELM's optimism coefficient."""

from dataclasses import dataclass, field

from trl import DPOConfig


@dataclass
class SELMConfig(DPOConfig):
    """DPOConfig with the SELM optimism term (DESIGN.md §1).

    loss = -log σ(β·Δ) + alpha·β·(log πθ(y_ref) − log πref(y_ref)), with y_ref the `reference_response` column.
    """

    alpha: float = field(
        default=0.0,
        metadata={
            "help": "SELM optimism coefficient. The term is alpha * beta * (log pi(y_ref) - log ref(y_ref)), as in "
            "the official code (the paper's Algorithm 1 omits beta). 0 gives plain DPO (sigmoid loss)."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the last N prompt tokens (the paper: 512). None: the prompt is only cut by max_length."
        },
    )
