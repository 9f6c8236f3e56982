"""Tiny rankers built offline, for tests and benchmarks: a PairRM-architecture checkpoint and a reward model.

Random weights: they exercise the real loading and scoring code paths, not ranking quality.

`save_tiny_pairrm(dir)` writes what llm-blender's `Blender.loadranker` reads from a ranker directory, laid out
like the hub's llm-blender/PairRM except that the backbone is a small local DeBERTa-v2 instead of the hub's
microsoft/deberta-v3-large:

    dir/config.json         llm-blender RankerConfig (ranker_type pairranker, model_type deberta, model_name backbone)
    dir/model.safetensors   the CrossCompareReranker state dict (backbone + comparison head)
    dir/backbone/           DeBERTa-v2 config, weights and a Unigram tokenizer trained here on the fixture text
"""

import json

from selm.io import atomic_path
from selm.standins.tiny import _corpus, build_tokenizer, fixture_rows

DEBERTA_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # ids 0-3 as in deberta-v3


def build_deberta_tokenizer(vocab_size: int = 400):
    """A DeBERTa-v2 (Unigram / metaspace) tokenizer trained with `tokenizers` on the fixture's text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import DebertaV2Tokenizer

    scratch = Tokenizer(models.Unigram())
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=DEBERTA_SPECIALS, unk_token="[UNK]", show_progress=False
    )
    scratch.train_from_iterator(_corpus(fixture_rows()), trainer=trainer)
    vocab = json.loads(scratch.to_str())["model"]["vocab"]  # [[piece, log-prob], ...], specials first
    return DebertaV2Tokenizer(vocab=[tuple(v) for v in vocab], unk_id=DEBERTA_SPECIALS.index("[UNK]"),
                              model_max_length=512)


def save_tiny_pairrm(out_dir, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                     source_maxlength: int = 128, candidate_maxlength: int = 64, seed: int = 0) -> None:
    """Write a tiny PairRM-architecture ranker directory (see the module docstring), atomically."""
    import torch
    from safetensors.torch import save_model
    from transformers import DebertaV2Config, DebertaV2Model

    from selm.compat.llm_blender import import_llm_blender

    import_llm_blender()
    from llm_blender.blender.blender_utils import load_ranker
    from llm_blender.pair_ranker.config import RankerConfig

    tokenizer = build_deberta_tokenizer()
    config = DebertaV2Config(  # deberta-v3 layout (relative attention, no absolute positions), scaled down
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=2 * hidden_size, max_position_embeddings=512,
        relative_attention=True, position_buckets=64, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        norm_rel_ebd="layer_norm", share_att_key=True, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # larger than 0.02 so random scores differ visibly between candidates
    )
    ranker_config = {
        "ranker_type": "pairranker", "model_type": "deberta", "model_name": "backbone",
        "source_maxlength": source_maxlength, "candidate_maxlength": candidate_maxlength,
        "n_tasks": 1, "drop_out": 0.05, "inference_mode": "bubble", "loss_type": "instructgpt", "fp16": False,
    }
    torch.manual_seed(seed)
    with atomic_path(out_dir) as tmp:
        backbone = tmp / "backbone"
        DebertaV2Model(config).save_pretrained(backbone)
        tokenizer.save_pretrained(backbone)
        # Build the ranker module with llm-blender's own code, so the saved keys are exactly what it loads.
        built = RankerConfig.from_dict({**ranker_config, "model_name": str(backbone)})
        ranker, _, _ = load_ranker(built)
        save_model(ranker, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(ranker_config, indent=2), encoding="utf-8")


def save_tiny_reward_model(out_dir, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                           seed: int = 0) -> None:
    """A tiny LlamaForSequenceClassification (num_labels=1) with the fixture tokenizer and its chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=512, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
