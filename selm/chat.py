"""How a conversation becomes tokens: one rule for generation, evaluation, answer export, training and log-probs.

The rule. A conversation is rendered with the model's chat template and tokenized without the tokenizer's special
tokens; then the sequence starts with exactly one copy of what the tokenizer puts before every text by default (its
BOS, when it adds one):
- Zephyr / Mistral (`add_bos_token` true, a template that writes no BOS): `<s>` is prepended, as the SFT model was
  trained (transformers' `apply_chat_template(tokenize=True)`, which trl uses, adds none);
- Llama 3 (the template writes `<|begin_of_text|>`, the tokenizer would add it again): it stays once, never twice;
- a tokenizer that adds nothing (the repository's tiny one): the template's tokens as they are.
What a tokenizer appends by default (an EOS) is not added: the template closes each turn itself.

A prompt cut to `max_prompt_length` keeps its BOS: the BOS, then the prompt's last `max_prompt_length - 1` tokens
(the model never saw a sequence without it). The assistant turn closes with the template's end-of-turn token
(`end_of_turn_id`), at which generation stops besides the model's EOS ids.
"""

from selm.errors import SELMError

_PROBE = "a"
_MARK = "SELM-END-OF-TURN-PROBE"


class ConversationTokens:
    """The rule above for one tokenizer (its default prefix is found once, from the tokenizer itself)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_prefix = default_prefix(tokenizer)

    def with_bos(self, ids: list[int]) -> list[int]:
        """`ids` starting with exactly one default prefix (none when the tokenizer adds none)."""
        p, n = self.bos_prefix, len(self.bos_prefix)
        ids = list(ids)
        if not n:
            return ids
        while ids[:2 * n] == p + p:  # written by the template and added by the tokenizer
            ids = ids[n:]
        return ids if ids[:n] == p else p + ids

    def encode(self, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
        """Token ids of a conversation rendered by the chat template (with the generation prompt when asked)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **template_kwargs)
        return self.with_bos(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def keep_prompt_end(self, ids: list[int], max_prompt_length: int | None) -> list[int]:
        """The prompt cut from the left to `max_prompt_length` tokens, keeping its BOS."""
        if max_prompt_length is None or len(ids) <= max_prompt_length:
            return list(ids)
        if max_prompt_length <= 0:
            return []
        n = len(self.bos_prefix)
        if n and ids[:n] == self.bos_prefix and max_prompt_length > n:
            return self.bos_prefix + list(ids[len(ids) - (max_prompt_length - n):])
        return list(ids[-max_prompt_length:])


def default_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (e.g. [BOS]); [] when it adds none in front."""
    with_special = tokenizer(_PROBE)["input_ids"]
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    raise SELMError(f"{type(tokenizer).__name__}: the tokenizer's default special tokens change the text's own tokens "
                    f"({with_special} vs {plain} for {_PROBE!r}); cannot tell where its BOS is")


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the chat template (Llama 3: <|eot_id|>, Zephyr: </s>).

    Found by rendering a short conversation: the first special token after the assistant's text. None when the
    template closes turns with plain text, or rewrites the assistant's text: then the model's EOS ids alone stop
    generation, as before."""
    if not tokenizer.chat_template:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}],
                                         tokenize=False)
    if _MARK not in text:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text.split(_MARK, 1)[1], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special), None)


# ---- what `--dry_run` shows: the first row's tokens, to check BOS and end of turn before a long run ----
def show_tokens(tokenizer, ids: list[int], first: int = 40, last: int = 8) -> list[str]:
    """The first ids, their tokens (the vocabulary's own pieces), and the last tokens (where the turn ends)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [f"  ids[:{first}]:    {ids[:first]}", f"  tokens[:{first}]: {pieces[:first]}",
            f"  tokens[-{last}:]: {pieces[-last:]}"]


def dry_run_preview(recipe, stage: str) -> str:
    """The first row of what `stage` ('train' or 'generate') would read, as its tokens (selm.chat's rule), in YAML
    comment lines (the dry run's output stays the recipe's YAML).

    Reads the iteration's own data when it exists, else the first row of the recipe's dataset; the tokenizer is the
    iteration's start model's, or the base model's (every iteration saves it unchanged) before that model exists."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from selm.data import load_preference_data, prompt_messages, to_trainer_format
    from selm.artifacts import check_model_path

    p = recipe.pipeline
    reads_portion = stage == "generate" or recipe.is_generation_free
    from selm import layout

    own = recipe.iter_dir() / (layout.PORTION if reads_portion else layout.RANKED)
    try:
        if own.is_file():
            from selm.data import read_parquet_dataset

            row, source = read_parquet_dataset(own)[0], str(own)
        else:
            row, source = load_preference_data(p.dataset_name, p.dataset_split, p.dataset_config, 1)[0], (
                f"{p.dataset_name}:{p.dataset_split} (this iteration's data is not written yet)")
        model = recipe.start_model if Path(recipe.start_model).exists() else recipe.model.model_name_or_path
        check_model_path(model)
        trust = bool(recipe.training.get("trust_remote_code", False))
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust)
    except (OSError, SELMError) as e:  # a dry run on a machine without the model or data: the config is still shown
        return f"# {stage} dry run: the first row's tokens are not shown ({str(e).splitlines()[0]})"
    tokens = ConversationTokens(tokenizer)
    if stage == "generate":
        what, ids = "prompt with the generation prompt", tokens.encode(prompt_messages(row), add_generation_prompt=True)
    else:
        from selm.rest_training import is_rest

        example = to_trainer_format(row)  # ReST's row: its chosen is the kept response, trained with the SFT loss
        what = ("prompt + kept response (ReST: supervised loss on the response only)" if is_rest(recipe)
                else "prompt + chosen")
        ids = tokens.encode(example["prompt"] + example["chosen"])
    bos = (f"starts with {tokenizer.decode(tokens.bos_prefix)!r} once (the tokenizer adds it by default)"
           if tokens.bos_prefix else "no BOS (the tokenizer adds none by default)")
    end = end_of_turn_id(tokenizer)
    end_text = f"{tokenizer.decode([end])!r} (id {end})" if end is not None else "none found in the chat template"
    lines = [f"{stage} dry run: the first row (prompt_id {row.get('prompt_id')}, from {source}), {what}, through the "
             f"chat template of {model}: {len(ids)} tokens; {bos}; end of turn {end_text}"]
    lines += show_tokens(tokenizer, ids)
    return "\n".join(f"# {line}" for line in lines)
