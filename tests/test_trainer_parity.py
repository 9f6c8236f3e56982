"""SELMTrainer(alpha=0) is a drop-in DPOTrainer: the same runs log the same losses and metrics, step by step.

Each configuration runs through trl's DPOTrainer and through SELMTrainer with prefix sharing off (trl's own loss path
behind SELM's collator) and on (DPO pairs packed into one row per example, scored by SELM's loss path).
"""

import copy

import pytest
import torch

from selm.errors import SELMError

STEPS = 3
BATCH = 4
# Keys of the log entries that are not results: timings, and total_flos (an estimate from the input sizes, which packed
# rows make smaller).
NOT_RESULTS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second", "total_flos"}


def conversational(n=BATCH * STEPS, offset=0):
    from selm.data import to_trainer_format
    from selm.standins.tiny import fixture_rows

    rows = fixture_rows(n + offset)[offset:]
    return [{k: v for k, v in to_trainer_format(r).items() if k in ("prompt", "chosen", "rejected")} for r in rows]


def standard(n=BATCH * STEPS):
    return [{"prompt": r["prompt"][-1]["content"], "chosen": " " + r["chosen"][0]["content"],
             "rejected": " " + r["rejected"][0]["content"]} for r in conversational(n)]


def implicit_prompt(n=BATCH * STEPS):
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conversational(n)]


CASES = {  # name: (rows, extra config)
    "conversational": (conversational, {}),
    "standard": (standard, {}),
    "implicit_prompt": (implicit_prompt, {}),
    "truncation": (conversational, {"max_length": 24}),
    "precompute": (conversational, {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 3}),
    "eval_dataset": (conversational, {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 3}),
}


def common_args(tmp_path, extra):
    values = dict(output_dir=str(tmp_path), beta=0.1, bf16=False, use_cpu=True, gradient_checkpointing=False,
                  per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-3, logging_steps=1,
                  report_to="none", save_strategy="no", seed=0, disable_tqdm=True, max_length=64)
    values.update(extra)
    return values


def logged(trainer):
    return [{k: v for k, v in entry.items() if k not in NOT_RESULTS} for entry in trainer.state.log_history]


def assert_same_logs(dpo_logs, selm_logs):
    assert len(selm_logs) == len(dpo_logs) >= STEPS
    for dpo_entry, selm_entry in zip(dpo_logs, selm_logs):
        for key, value in dpo_entry.items():
            assert key in selm_entry, key
            assert selm_entry[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, dpo_entry["step"])


def run_dpo(models, processing_class, data, args, eval_data=None):
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(copy.deepcopy(models[0]), ref_model=copy.deepcopy(models[1]), args=DPOConfig(**args),
                         train_dataset=data, eval_dataset=eval_data, processing_class=processing_class)
    trainer.train()
    return trainer


def run_selm(models, processing_class, data, args, eval_data=None, **kw):
    from selm.trainer import SELMTrainer
    from selm.trainer_config import SELMConfig

    trainer = SELMTrainer(copy.deepcopy(models[0]), ref_model=copy.deepcopy(models[1]),
                          args=SELMConfig(alpha=0.0, **args, **kw), train_dataset=data, eval_dataset=eval_data,
                          processing_class=processing_class)
    trainer.train()
    return trainer


@pytest.mark.parametrize("case", sorted(CASES))
def test_logged_losses_and_metrics_equal_dpo_trainer(case, tmp_path, models, tokenizer):
    import datasets

    make_rows, extra = CASES[case]
    data = datasets.Dataset.from_list(make_rows())
    eval_data = datasets.Dataset.from_list(conversational(5, offset=20)) if case == "eval_dataset" else None
    dpo = run_dpo(models, tokenizer, data, common_args(tmp_path / "dpo", extra), eval_data)
    dpo_logs = logged(dpo)
    assert {"loss", "rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy"} <= set(dpo_logs[0])
    if case == "eval_dataset":
        assert any("eval_loss" in entry for entry in dpo_logs)
    for sharing in ("false", "true"):
        selm = run_selm(models, tokenizer, data, common_args(tmp_path / sharing, extra), eval_data,
                        prefix_sharing=sharing)
        packed = "segment_ids" in selm.data_collator([selm.train_dataset[i] for i in range(BATCH)])
        assert packed == (sharing == "true")  # the packed pairs really took SELM's loss path
        assert_same_logs(dpo_logs, logged(selm))


def test_defaults_pad_token_and_kept_reference(tmp_path, models, tokenizer, monkeypatch):
    """args=None builds a default config; a pad token outside the vocabulary is refused; an explicitly passed
    ref_model survives precompute, so evaluate() can score a dataset it has not seen."""
    import datasets

    import selm.trainer
    from selm.trainer import SELMTrainer
    from selm.trainer_config import SELMConfig

    class CPUConfig(SELMConfig):  # the default config wants bf16, which this CPU machine refuses (as for DPOConfig)
        def __init__(self, output_dir, **kw):
            super().__init__(output_dir, use_cpu=True, bf16=False, report_to="none", **kw)

    monkeypatch.setattr(selm.trainer, "SELMConfig", CPUConfig)
    data = datasets.Dataset.from_list(conversational())
    trainer = SELMTrainer(copy.deepcopy(models[0]), ref_model=copy.deepcopy(models[1]), train_dataset=data,
                          processing_class=tokenizer)
    assert isinstance(trainer.args, CPUConfig) and trainer.args.output_dir == "tiny-llama-SELM"
    monkeypatch.undo()

    bad = SELMConfig(**common_args(tmp_path / "bad", {"pad_token": "<not-a-token>"}))
    with pytest.raises(SELMError, match="'<not-a-token>' is not in the vocabulary"):
        SELMTrainer(copy.deepcopy(models[0]), ref_model=copy.deepcopy(models[1]), args=bad, train_dataset=data,
                    processing_class=copy.deepcopy(tokenizer))

    args = common_args(tmp_path / "pre", {"precompute_ref_log_probs": True})
    dpo = run_dpo(models, tokenizer, data, args)
    selm = run_selm(models, tokenizer, data, args)
    assert selm.ref_model is not None
    unseen = datasets.Dataset.from_list(conversational(6, offset=30))
    dpo_metrics, selm_metrics = dpo.evaluate(unseen), selm.evaluate(unseen)
    assert selm_metrics["eval_loss"] == pytest.approx(dpo_metrics["eval_loss"], abs=1e-5)
    assert selm_metrics["eval_rewards/margins"] == pytest.approx(dpo_metrics["eval_rewards/margins"], abs=1e-5)


# ---- a processor-backed model: a tiny LLaVA (CLIP vision tower + Llama) with a locally assembled processor ----
VLM_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """Model and processor saved together, so that `processing_class=None` loads the processor as a user's would."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from selm.standins.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VLM_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-llava"
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def image_rows(n=BATCH * STEPS):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [{"images": [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))], **row}
            for row in conversational(n)]


@pytest.mark.parametrize("with_images", [True, False])
def test_processor_backed_model_equals_dpo_trainer(with_images, vlm_dir, tmp_path):
    """processing_class=None: both trainers load the processor; with images DPOTrainer's vision collator serves."""
    import datasets
    from transformers import LlavaForConditionalGeneration

    policy = LlavaForConditionalGeneration.from_pretrained(vlm_dir)
    reference = LlavaForConditionalGeneration.from_pretrained(vlm_dir)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    data = datasets.Dataset.from_list(image_rows() if with_images else conversational())
    args = common_args(tmp_path / "dpo", {})
    dpo = run_dpo((policy, reference), None, data, args)
    selm = run_selm((policy, reference), None, data, common_args(tmp_path / "selm", {}),
                    prefix_sharing="auto")  # auto: a processor-backed model is never packed
    if with_images:
        assert type(selm.data_collator) is type(dpo.data_collator)  # trl's vision collator
    else:
        assert selm.data_collator.prefix_sharing == "false"
    assert_same_logs(logged(dpo), logged(selm))


# ---- streaming datasets (datasets.IterableDataset), as train and as eval dataset ----
@pytest.mark.parametrize("stream_train", [False, True])
def test_streaming_datasets_equal_dpo_trainer(stream_train, tmp_path, models, tokenizer):
    """A streaming eval dataset (and train dataset) gives DPOTrainer's logs, eval entries included, packed or not."""
    import datasets

    extra = {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 3}
    data = datasets.Dataset.from_list(conversational())
    data = data.to_iterable_dataset() if stream_train else data
    eval_data = datasets.Dataset.from_list(conversational(5, offset=20)).to_iterable_dataset()
    dpo_logs = logged(run_dpo(models, tokenizer, data, common_args(tmp_path / "dpo", extra), eval_data))
    assert sum("eval_loss" in entry for entry in dpo_logs) == STEPS
    for sharing in ("false", "true"):
        selm = run_selm(models, tokenizer, data, common_args(tmp_path / sharing, extra), eval_data,
                        prefix_sharing=sharing)
        assert selm.data_collator.prefix_sharing == sharing
        assert_same_logs(dpo_logs, logged(selm))


def _dataset(streaming=False):
    import datasets

    data = datasets.Dataset.from_list(conversational())
    return data.to_iterable_dataset() if streaming else data


# name: (train data, config overrides, whether ref_model is the policy itself)
BAD_SETTINGS = {
    "pad_token outside the vocabulary": (_dataset, {"pad_token": "<not-a-token>"}, False),
    "precompute with a streaming dataset": (lambda: _dataset(streaming=True), {"precompute_ref_log_probs": True},
                                            False),
    "no train dataset": (lambda: None, {}, False),
    "train dataset of the wrong type": (conversational, {}, False),  # a plain list of rows
    "ref_model is the model": (_dataset, {}, True),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_setting_raises_dpo_trainers_exception_type(case, tmp_path, models, tokenizer):
    """Where DPOTrainer raises for a bad setting, SELMTrainer raises the same type (its own errors subclass it)."""
    from trl import DPOConfig, DPOTrainer

    from selm.trainer import SELMTrainer
    from selm.trainer_config import SELMConfig

    make_data, extra, same_model = BAD_SETTINGS[case]
    raised = {}
    for name, trainer, config in (("dpo", DPOTrainer, DPOConfig), ("selm", SELMTrainer, SELMConfig)):
        policy = copy.deepcopy(models[0])
        reference = policy if same_model else copy.deepcopy(models[1])
        with pytest.raises(Exception) as err:
            trainer(policy, ref_model=reference, args=config(**common_args(tmp_path / name, extra)),
                    train_dataset=make_data(), processing_class=copy.deepcopy(tokenizer))
        raised[name] = err.value
    assert type(raised["dpo"]) in (ValueError, TypeError), repr(raised["dpo"])
    assert isinstance(raised["selm"], type(raised["dpo"])), (repr(raised["dpo"]), repr(raised["selm"]))
