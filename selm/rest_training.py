"""ReST's Improve step (docs/methods.md): the train stage of an `update_rule: rest` iteration.

The kept responses of iter-K/ranked.parquet (one row each: the prompt and its kept response as `chosen`) are
fine-tuned on with trl's `SFTTrainer`, conversational prompt-completion rows on the model's chat template, the loss on
the completion tokens only (completion_only_loss), from the iteration's start model (the previous iteration's).
The rows are tokenized by selm/chat.py's rule (the one generation and DPO training use: one BOS where the tokenizer
adds one), and handed to SFTTrainer as input_ids + completion_mask, from which it builds its labels.
The training keys are the recipe's, as for DPO, minus the preference-only ones (DPO_ONLY: refused when set).
"""

from selm.errors import SELMError

# SELMConfig keys with no meaning for the supervised loss. beta stays: the evaluation's implicit rewards use it.
DPO_ONLY = ("max_prompt_length", "precompute_ref_log_probs", "precompute_ref_batch_size", "loss_type",
            "label_smoothing", "f_divergence_type", "ld_alpha", "use_weighting", "loss_weights", "sync_ref_model",
            "ref_model_sync_steps", "ref_model_mixup_alpha", "discopop_tau", "f_alpha_divergence_coef",
            "prefix_sharing")


def is_rest(recipe) -> bool:
    return recipe.ranking.update_rule == "rest" and not recipe.is_generation_free


def check_rest_keys(recipe) -> None:
    """A preference-only training key set in a ReST recipe would be accepted and ignored: refuse it."""
    stray = [k for k in DPO_ONLY if k in recipe.explicit_keys]
    if stray:
        raise SELMError(f"{recipe.path}: '{stray[0]}' is a preference-loss key; update_rule rest trains with the "
                        "supervised loss, which does not use it: remove it")


def sft_config(recipe):
    """The iteration's trl SFTConfig: the recipe's training values SFTConfig takes, the loss on completions only."""
    from trl import SFTConfig

    # loss_type: both configs have the key, with other values (the recipe's is DPO's, refused when set for ReST)
    return recipe.training_config(config_class=SFTConfig, completion_only_loss=True, loss_type="nll")


def load_sft_data(recipe, args):
    """iter-K/ranked.parquet as trl's conversational prompt-completion rows (the global main process first)."""
    from selm import layout
    from selm.artifacts import read_ranked

    with args.main_process_first(local=False, desc="training data"):
        dataset = read_ranked(recipe.iter_dir() / layout.RANKED, 0.0)
        return dataset.map(lambda r: {"prompt": r["chosen"][:-1], "completion": r["chosen"][-1:]},
                           remove_columns=dataset.column_names, desc="Prompt-completion format")


def build_sft_trainer(recipe, args, start: str, dataset):
    """(SFTTrainer, tokenizer) on the iteration's start model; train_config.yaml written first, as for DPO."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer
    from trl.data_utils import common_prefix_length

    from selm import layout
    from selm.chat import ConversationTokens
    from selm.io import write_text
    from selm.models import load_model

    if args.should_save:
        write_text(recipe.iter_dir() / layout.TRAIN_CONFIG, recipe.to_yaml())
    tokenizer = AutoTokenizer.from_pretrained(start, trust_remote_code=args.trust_remote_code)
    if tokenizer.chat_template is None:
        raise SELMError(f"{start}: the tokenizer has no chat template; ReST's supervised loss trains on it")
    policy = load_model(start, recipe.model, args.trust_remote_code)
    tokens = ConversationTokens(tokenizer)

    def tokenize(row):  # the completion starts where prompt and prompt + completion diverge, as trl finds it
        prompt = tokens.encode(row["prompt"], add_generation_prompt=True)
        full = tokens.encode(row["prompt"] + row["completion"])
        start = common_prefix_length(prompt, full)
        return {"input_ids": full, "completion_mask": [0] * start + [1] * (len(full) - start)}

    dataset = dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing (selm.chat)")
    return SFTTrainer(policy, args=args, train_dataset=dataset, processing_class=tokenizer), tokenizer
