"""Prefix sharing (docs/DESIGN.md §8): one packed row per example, its prompt computed once for all its completions.

Row of a prompt p (P tokens) and completions y_1..y_G (G = 3 for SELM, 2 for DPO pairs):

    [p_1 .. p_{P-1} | p_P y_1 | p_P y_2 | ... | p_P y_G | padding]

Each completion segment starts with a copy of the prompt's last token at position P-1, so the logits that predict a
completion's first token come from inside its own segment: trl's fused log-prob head and its one-step label shift work
unchanged, and the copies are not completion tokens. `segment_ids` say where a token belongs (0 prompt, g completion g,
-1 padding); `position_ids` continue the prompt's positions in every segment. The 4-D attention mask lets a token see
the earlier prompt tokens and the earlier tokens of its own segment (within the sliding window, measured on positions);
a padding token sees only itself, so no attention row is empty.
"""

import torch

from selm.errors import SELMError

MODES = ("false", "true", "auto")
# Attention implementations that take a dense 4-D mask: sdpa (bool, True = attend) and eager (additive float).
SHAREABLE_ATTENTION = ("sdpa", "eager")
# How much dearer a multiply-add of attention (two matmuls per head, with the mask and softmax around them) is than one
# of the dense layers: `auto` prices the packed row's quadratic attention area against the tokens it saves with it.
# `auto` packs a batch when its estimated cost is at most AUTO_THRESHOLD of the unshared batch's. Both fitted on CPU
# (benchmarks/train_throughput.py --calibrate, 24 batch shapes): factor 1 is the best fit (rms error 0.1; rows of
# ~1000 tokens cost up to 0.1 more than estimated), and with threshold 0.9 every shape got the right decision: each
# batch it packed ran at most 0.89x the unshared time, and each it left unshared would have gained under 7%.
ATTENTION_COST_FACTOR = 1.0
AUTO_THRESHOLD = 0.9


def parse_mode(value) -> str:
    """'false' | 'true' | 'auto' from a recipe value (YAML gives booleans for true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in MODES:
        return text
    raise SELMError(f"training config: 'prefix_sharing' is {value!r}; expected true, false or auto")


def check_attention(attn_implementation, mode, source="training config") -> None:
    """prefix_sharing: true with an attention kernel that cannot take the 4-D mask is an error (used at --dry_run)."""
    if parse_mode(mode) == "true" and attn_implementation not in (None, *SHAREABLE_ATTENTION):
        raise SELMError(f"{source}: prefix_sharing: true cannot run with attn_implementation '{attn_implementation}' "
                        "(its kernel cannot express a shared prefix); set attn_implementation: sdpa, or "
                        "prefix_sharing: auto/false")


def area_weight(config) -> float:
    """Cost of one (query, key) pair of the attention relative to one token through the rest of the model."""
    text = config.get_text_config()
    hidden, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    # Multiply-adds per token: q/o and k/v projections, a gated MLP, the LM head; per pair: QK^T and AV of every head.
    per_layer = hidden * head_dim * 2 * (heads + kv_heads) + 3 * hidden * intermediate
    per_token = layers * per_layer + hidden * text.vocab_size
    per_pair = layers * 2 * heads * head_dim
    return ATTENTION_COST_FACTOR * per_pair / per_token


def _completions(example, groups, max_length):
    """The completions as the unshared rows would hold them: truncated so that prompt + completion fits max_length."""
    budget = None if max_length is None else max_length - len(example["prompt_ids"])
    return [example[f"{g}_ids"][:budget] for g in groups]


def can_pack(examples, max_length) -> bool:
    """Every prompt has a last token to copy, and fits max_length (trl drops rows whose prompt fills it)."""
    return all(0 < len(ex["prompt_ids"]) and (max_length is None or len(ex["prompt_ids"]) < max_length)
               for ex in examples)


def packed_cost_ratio(examples, groups, max_length, weight: float) -> float:
    """Estimated cost of the packed batch over the unshared one: tokens + weight · attention area, rows padded to the
    batch's longest (what the dense kernels compute)."""
    unshared_width, packed_width = 0, 0
    for ex in examples:
        lengths = [len(c) for c in _completions(ex, groups, max_length)]
        prompt = len(ex["prompt_ids"])
        unshared_width = max(unshared_width, prompt + max(lengths))
        packed_width = max(packed_width, prompt - 1 + sum(lengths) + len(groups))
    packed = packed_width * (1 + weight * packed_width)
    unshared = len(groups) * unshared_width * (1 + weight * unshared_width)
    return packed / unshared


def pack(examples, groups, pad_token_id, max_length=None, pad_to_multiple_of=None) -> dict:
    """input_ids, position_ids, segment_ids and completion_mask of one packed row per example (see the module doc)."""
    from trl.trainer.utils import pad  # here: it imports model code, which a --dry_run must not load

    rows = {"input_ids": [], "position_ids": [], "segment_ids": [], "completion_mask": []}
    for ex in examples:
        prompt = ex["prompt_ids"]
        start = len(prompt) - 1
        ids, positions, segments, completion = list(prompt[:-1]), list(range(start)), [0] * start, [0] * start
        for g, tokens in enumerate(_completions(ex, groups, max_length), start=1):
            ids += [prompt[-1]] + list(tokens)
            positions += range(start, start + len(tokens) + 1)
            segments += [g] * (len(tokens) + 1)
            completion += [0] + [1] * len(tokens)
        for key, values in zip(rows, (ids, positions, segments, completion)):
            rows[key].append(torch.tensor(values, dtype=torch.long))
    padding = {"input_ids": pad_token_id, "position_ids": 0, "segment_ids": -1, "completion_mask": 0}
    return {key: pad(values, padding_value=padding[key], padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
            for key, values in rows.items()}


def layer_windows(config) -> dict[str, int | None] | int | None:
    """The sliding window of every attention layer: one window (None = full) for all layers, or, for models that mix
    layer types, {layer type: window} (such models take a mask per layer type)."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    kinds = set(getattr(text, "layer_types", None) or [])
    if not kinds:
        return window
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        raise SELMError(f"layer types {sorted(unknown)} of {type(text).__name__} are not supported by prefix sharing")
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    return {"full_attention": None, "sliding_attention": window}


def attention_mask(segment_ids, position_ids, attn_implementation, dtype, windows):
    """The 4-D mask (batch, 1, L, L) of packed rows: bool for sdpa, additive float of `dtype` for eager; a dict of them
    per layer type when `windows` is one (see `layer_windows`)."""
    if isinstance(windows, dict):
        return {kind: attention_mask(segment_ids, position_ids, attn_implementation, dtype, w)
                for kind, w in windows.items()}
    if attn_implementation not in SHAREABLE_ATTENTION:
        raise SELMError(f"prefix sharing needs attn_implementation sdpa or eager, the model has "
                        f"'{attn_implementation}'; load it with attn_implementation: sdpa, or set prefix_sharing: false")
    length = segment_ids.size(1)
    index = torch.arange(length, device=segment_ids.device)
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = (index[:, None] >= index[None, :]) & (key >= 0) & ((key == 0) | (key == query))
    if windows is not None:
        visible &= (position_ids[:, :, None] - position_ids[:, None, :]) < windows
    visible |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    visible = visible[:, None]
    if attn_implementation == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


def group_sums(token_values, segment_ids, num_groups: int):
    """(num_groups * batch,) sums of per-label values over each completion, group-major like the unshared rows.

    `token_values` are per label (the label shift drops the first position); they are zero off the completions.
    """
    labels = segment_ids[:, 1:]
    return torch.cat([(token_values * (labels == g)).sum(dim=1) for g in range(1, num_groups + 1)])


def group_token_views(inputs, num_groups: int):
    """Per completion group: (rows, label mask), so `values[rows][mask]` are that group's completion tokens, for the
    packed and the unshared layout alike (metrics over the same tokens either way)."""
    completion = inputs["completion_mask"][:, 1:].bool()
    if "segment_ids" in inputs:
        labels = inputs["segment_ids"][:, 1:]
        return [(slice(None), completion & (labels == g)) for g in range(1, num_groups + 1)]
    batch = completion.size(0) // num_groups
    return [(slice(g * batch, (g + 1) * batch), completion[g * batch:(g + 1) * batch]) for g in range(num_groups)]


def unshared_token_count(inputs, num_groups: int):
    """Tokens the unshared rows of this packed batch would hold (trl's `num_tokens` counts those)."""
    segments = inputs["segment_ids"]
    prompts = (segments == 0).sum() + segments.size(0)  # + each row's last prompt token, copied into every segment
    return num_groups * prompts + inputs["completion_mask"].sum()
