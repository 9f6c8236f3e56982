"""Prefix sharing: packed rows give the unshared rows' loss, gradients and metrics; what cannot share is refused."""

import copy
import re
import types

import pytest
import torch

from selm.errors import SELMError

ROWS = 8
MAX_LENGTH = 40  # cuts some rows: the packed rows must cut each completion where the unshared row would


@pytest.fixture(scope="module")
def dataset():
    """Fixture rows (a system message in row 3, a multi-turn prompt in row 4) with a generated response y_ref."""
    import datasets

    from selm.data import to_trainer_format
    from selm.standins.tiny import fixture_rows

    rows = []
    for i, row in enumerate(fixture_rows(12)):
        row["reference_response"] = f"My answer: {i * 7}" + ", or so" * (i % 4)  # lengths differ: padding
        rows.append({k: v for k, v in to_trainer_format(row).items()
                     if k in ("prompt", "chosen", "rejected", "reference_response")})
    return datasets.Dataset.from_list(rows)


def causal_lm(kind, tokenizer, seed, attn="sdpa"):
    """Tiny models of three attention layouts: Llama (full), Mistral (sliding window on every layer), Qwen2 (full and
    sliding layers mixed). The windows (6 tokens) are shorter than the rows, so they bind."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, attn_implementation=attn)
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=6, **common))
    return Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=6, max_window_layers=1, **common))


def config(tmp_path, **kw):
    from selm.trainer_config import SELMConfig

    values = dict(output_dir=str(tmp_path / "out"), beta=0.1, alpha=0.5, bf16=False, use_cpu=True,
                  gradient_checkpointing=False, per_device_train_batch_size=ROWS, report_to="none",
                  max_length=MAX_LENGTH, seed=0, save_strategy="no", disable_tqdm=True)
    values.update(kw)
    return SELMConfig(**values)


def trainer_for(policy, reference, tokenizer, data, args, **kw):
    from selm.trainer import SELMTrainer

    return SELMTrainer(copy.deepcopy(policy), ref_model=None if reference is None else copy.deepcopy(reference),
                       args=args, train_dataset=data, processing_class=tokenizer, **kw)


def loss_grads_metrics(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("case", ["llama-sdpa", "llama-eager", "llama-checkpointing", "mistral-window",
                                  "qwen2-mixed-windows"])
def test_packed_loss_gradients_and_metrics_equal_unshared(case, tmp_path, tokenizer, dataset):
    kind, variant = case.split("-", 1)
    attn = "eager" if variant == "eager" else "sdpa"
    policy, reference = causal_lm(kind, tokenizer, 0, attn), causal_lm(kind, tokenizer, 1, attn)
    results, batches = {}, {}
    for mode in ("false", "true"):
        trainer = trainer_for(policy, reference, tokenizer, dataset, config(tmp_path / mode, prefix_sharing=mode))
        if variant == "checkpointing":
            trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
        batches[mode] = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
        results[mode] = loss_grads_metrics(trainer, batches[mode])
    packed, unshared = batches["true"], batches["false"]
    assert "segment_ids" in packed and packed["input_ids"].size(0) == ROWS and "segment_ids" not in unshared
    assert unshared["attention_mask"].sum(1).max() == MAX_LENGTH  # some rows were cut to max_length
    assert unshared["attention_mask"].sum(1).min() < MAX_LENGTH  # and some padded

    (loss_u, grads_u, metrics_u), (loss_p, grads_p, metrics_p) = results["false"], results["true"]
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    worst = max((grads_p[n] - grads_u[n]).abs().max().item() for n in grads_u)
    assert worst < 1e-5, worst
    assert all(grads_u[n].abs().sum() > 0 for n in grads_u if "embed" not in n)  # every layer had a gradient
    assert metrics_p["num_tokens"] == metrics_u["num_tokens"]
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "logps/chosen",
                "logps/rejected", "logps/reference", "loss/optimism"):
        assert metrics_p[key] == pytest.approx(metrics_u[key], abs=1e-5), key

    if kind != "llama":  # the window binds: without it in the mask the packed rows would score differently
        args = config(tmp_path / "nowindow", prefix_sharing="true")
        trainer = trainer_for(policy, reference, tokenizer, dataset, args)
        for m in (trainer.model, trainer.ref_model):
            m.config.sliding_window = None
        without, _, _ = loss_grads_metrics(trainer, packed)
        assert abs(without - loss_u) > 1e-4


def test_mask_per_attention_implementation(tokenizer):
    """Against a mask written out by hand for two rows: prompt, three segments, padding."""
    from selm import prefix_sharing

    examples = [{"prompt_ids": [7, 8, 9], "chosen_ids": [10, 11], "rejected_ids": [12], "reference_ids": [13]},
                {"prompt_ids": [7], "chosen_ids": [10], "rejected_ids": [12], "reference_ids": [13, 14]}]
    batch = prefix_sharing.pack(examples, ("chosen", "rejected", "reference"), pad_token_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11, 9, 12, 9, 13], [7, 10, 7, 12, 7, 13, 14, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 2, 3], [0, 1, 0, 1, 0, 1, 2, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1, 1, 0, 0]]
    first = [  # row 0: tokens 0-1 prompt, 2-4 chosen (copy of 9, 10, 11), 5-6 rejected, 7-8 reference
        "100000000", "110000000", "111000000", "111100000", "111110000", "110001000", "110001100", "110000010",
        "110000011"]
    second = [  # row 1: no prompt token before the copies; 7-8 padding sees only itself
        "100000000", "110000000", "001000000", "001100000", "000010000", "000011000", "000011100", "000000010",
        "000000001"]
    expected = torch.tensor([[[int(c) for c in line] for line in rows] for rows in (first, second)]).bool()[:, None]
    sdpa = prefix_sharing.attention_mask(batch["segment_ids"], batch["position_ids"], "sdpa", torch.float32, None)
    assert sdpa.dtype == torch.bool and torch.equal(sdpa, expected)
    eager = prefix_sharing.attention_mask(batch["segment_ids"], batch["position_ids"], "eager", torch.float16, None)
    assert eager.dtype == torch.float16
    assert torch.equal(eager == 0, expected) and (eager[~expected] == torch.finfo(torch.float16).min).all()
    window = prefix_sharing.attention_mask(batch["segment_ids"], batch["position_ids"], "sdpa", torch.float32, 3)
    assert window[0, 0, 4].tolist() == [False, False, True, True, True, False, False, False, False]  # positions 2-4
    assert window[0, 0, 6].tolist() == [False, True, False, False, False, True, True, False, False]  # 1, 2, 3


def test_precompute_pass_packed_equals_unshared(tmp_path, tokenizer, dataset):
    policy = causal_lm("llama", tokenizer, 0)
    columns = {}
    for mode in ("false", "true"):
        trainer = trainer_for(policy, None, tokenizer, dataset, config(tmp_path / mode, prefix_sharing=mode,
                                                                      precompute_ref_log_probs=True,
                                                                      precompute_ref_batch_size=5))
        assert trainer.ref_model is None  # scripts/train.py's way: the policy before its first step scores
        columns[mode] = torch.tensor([trainer.train_dataset[f"ref_{g}_logps"]
                                      for g in ("chosen", "rejected", "reference")])
    assert columns["false"].abs().min() > 1  # real log-probs of whole completions
    # Sums of ~100 in fp32: a few ulps (1.5e-5 at magnitude 128-256) is the whole difference.
    assert torch.allclose(columns["true"], columns["false"], atol=1e-5, rtol=1e-6)


def test_three_training_steps_packed_equal_unshared(tmp_path, tokenizer, dataset, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights = {}
    for mode in ("false", "true"):
        args = config(tmp_path / mode, prefix_sharing=mode, per_device_train_batch_size=4, max_steps=3,
                      learning_rate=1e-3, lr_scheduler_type="constant", precompute_ref_log_probs=True)
        trainer = trainer_for(start, None, tokenizer, dataset, args)
        trainer.train()
        weights[mode] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        assert trainer.state.global_step == 3
    update = (weights["false"] - torch.cat([p.detach().flatten() for p in start.parameters()])).norm()
    assert update > 0.01 and (weights["true"] - weights["false"]).norm() < 1e-4 * update


MIXED_PACKING_RUN = '''
import sys, datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from selm.trainer import SELMTrainer
from selm.trainer_config import SELMConfig

model_dir, out, triples = sys.argv[1], sys.argv[2], sys.argv[3] == "selm"
rows = []
for i in range(16):
    if i % 2 == 0:  # a long prompt, short answers: packing pays
        row = {"prompt": "What is " + " plus ".join(str(k) for k in range(i, i + 12)) + "?",
               "chosen": f" {i}.", "rejected": f" {i + 1}."}
    else:  # a short prompt, two long similar answers: it does not
        answer = " ".join(f"then {k} and" for k in range(i, i + 10))
        row = {"prompt": f"Count {i}.", "chosen": answer + " done.", "rejected": answer + " stop."}
    if triples:
        row["reference_response"] = row["chosen"]
    rows.append(row)
args = SELMConfig(output_dir=out, alpha=0.1 if triples else 0.0, bf16=False, use_cpu=True, max_length=256,
                  gradient_checkpointing=False, max_steps=4, per_device_train_batch_size=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, ddp_backend="gloo", prefix_sharing="auto", logging_steps=1)
trainer = SELMTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                      train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(model_dir))
collate, packed = trainer.data_collator, []


def recording(examples):
    batch = collate(examples)
    packed.append(int("segment_ids" in batch))
    return batch


trainer.data_collator = recording
trainer.train()
print(f"rank {trainer.accelerator.process_index} trained, packed {packed}", flush=True)
'''


@pytest.mark.slow  # over 10 s here: make test-fast leaves it out
@pytest.mark.parametrize("rows", ["dpo", "selm"])
def test_ranks_that_disagree_on_packing_train_together(rows, tmp_path, tiny_model_dir):
    """prefix_sharing: auto decides per batch and per rank: at some step one rank packs and the other does not, and
    both must still issue the same collectives (DPO pairs once went through trl's metric code when unpacked)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "run.py"
    script.write_text(MIXED_PACKING_RUN)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                             str(tiny_model_dir), str(tmp_path / "out"), rows], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    done = dict(re.findall(r"(rank \d) trained, packed (\[[\d, ]*\])", result.stdout))  # lines may interleave
    assert sorted(done) == ["rank 0", "rank 1"], result.stderr[-3000:]
    assert done["rank 0"] != done["rank 1"]  # the ranks did disagree at some step


def test_unpacked_dpo_pairs_on_the_selm_path_equal_trl(tmp_path, tokenizer, dataset, monkeypatch):
    """Under 'auto' an unpacked DPO pair batch takes the SELM path (as a packed one does): same loss, gradients and
    metrics as trl's own DPO path (prefix_sharing: false)."""
    from selm import prefix_sharing

    monkeypatch.setattr(prefix_sharing, "AUTO_THRESHOLD", 0.0)  # 'auto' never packs: the unshared layout
    pairs = dataset.remove_columns("reference_response")
    policy, reference = causal_lm("llama", tokenizer, 0), causal_lm("llama", tokenizer, 1)
    results, batches = {}, {}
    for mode in ("false", "auto"):
        trainer = trainer_for(policy, reference, tokenizer, pairs, config(tmp_path / mode, alpha=0.0,
                                                                          prefix_sharing=mode))
        batches[mode] = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
        results[mode] = loss_grads_metrics(trainer, batches[mode])
    assert "sequence_group" in batches["auto"] and "segment_ids" not in batches["auto"]
    assert "sequence_group" not in batches["false"]  # trl's own collator and loss
    (loss_t, grads_t, metrics_t), (loss_s, grads_s, metrics_s) = results["false"], results["auto"]
    assert loss_s == pytest.approx(loss_t, abs=1e-6)
    assert max((grads_s[n] - grads_t[n]).abs().max().item() for n in grads_t) < 1e-6
    assert sorted(metrics_s) == sorted(metrics_t)
    for key in metrics_t:
        assert metrics_s[key] == pytest.approx(metrics_t[key], abs=1e-5), key


# ---- refusals ----
def flash_model(tokenizer):
    model = causal_lm("llama", tokenizer, 0)
    model.config._attn_implementation = "flash_attention_2"  # never run here: refused before any forward
    return model


def moe_model(tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            num_local_experts=2, pad_token_id=tokenizer.pad_token_id))


REFUSALS = {  # case: (model, extra config, extra trainer kwargs, words the message must hold)
    "flash_attention_2": (flash_model, {}, {}, "attn_implementation: sdpa"),
    "keep_end": (None, {"truncation_mode": "keep_end"}, {}, "keep_end"),
    "moe_aux_loss": (moe_model, {}, {}, "router_aux_loss_coef: 0"),
    "compute_metrics": (None, {}, {"compute_metrics": lambda prediction: {}}, "return_outputs"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_true_refuses_and_auto_does_not_pack(case, tmp_path, tokenizer, dataset):
    build, extra, kwargs, words = REFUSALS[case]
    policy = (build or (lambda t: causal_lm("llama", t, 0)))(tokenizer)
    with pytest.raises(SELMError, match="prefix_sharing: true") as error:
        trainer_for(policy, None, tokenizer, dataset, config(tmp_path, prefix_sharing="true", **extra), **kwargs)
    assert words in str(error.value) and "\n" not in str(error.value)
    args = config(tmp_path, prefix_sharing="auto", **extra)
    trainer = trainer_for(policy, policy, tokenizer, dataset, args, **kwargs)
    assert trainer.data_collator.prefix_sharing == "false"
    assert "segment_ids" not in trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def test_prompt_learning_peft_is_refused(tmp_path, tokenizer, dataset):
    """peft is not installed here: a config carrying peft's `is_prompt_learning` flag stands in for a prefix-tuning
    config; the refusal comes before trl would build the PEFT model."""
    from selm.trainer import SELMTrainer

    prefix_tuning = types.SimpleNamespace(is_prompt_learning=True)
    policy = causal_lm("llama", tokenizer, 0)
    with pytest.raises(SELMError, match="prompt-learning PEFT"):
        trainer_for(policy, None, tokenizer, dataset, config(tmp_path, prefix_sharing="true"),
                    peft_config=prefix_tuning)
    mode, _ = SELMTrainer._prefix_sharing_mode(policy, None, config(tmp_path, prefix_sharing="auto"), tokenizer,
                                               {"peft_config": prefix_tuning})
    assert mode == "false"


def test_return_outputs_on_a_packed_batch_is_refused(tmp_path, tokenizer, dataset):
    policy = causal_lm("llama", tokenizer, 0)
    trainer = trainer_for(policy, policy, tokenizer, dataset, config(tmp_path, prefix_sharing="true"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with pytest.raises(SELMError, match="prefix_sharing: false"):
        trainer.compute_loss(trainer.model, batch, return_outputs=True)


def test_recipe_with_flash_attention_and_prefix_sharing_fails_at_dry_run(smoke_recipe):
    from selm.recipe.parse import parse_recipe

    recipe = smoke_recipe(attn_implementation="flash_attention_2", prefix_sharing=True)
    with pytest.raises(SELMError, match="attn_implementation: sdpa") as error:
        parse_recipe([str(recipe), "--iteration", "1", "--dry_run"])
    assert str(recipe) in str(error.value)
    parse_recipe([str(recipe), "--iteration", "1", "--dry_run", "--prefix_sharing", "auto"])  # auto: never packs
    with pytest.raises(SELMError, match="'prefix_sharing' is 'sometimes'"):
        parse_recipe([str(smoke_recipe(prefix_sharing="sometimes")), "--iteration", "1", "--dry_run"])
