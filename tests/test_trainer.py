"""SELMTrainer against trl's DPOTrainer and against the formula computed from plain model forwards."""

import copy

import pytest
import torch
import torch.nn.functional as F

from selm.errors import SELMError

ROWS = 8


@pytest.fixture(scope="module")
def rows():
    """Fixture rows (a system message in row 3, multi-turn in row 4) with a generated reference response."""
    from selm.data import to_trainer_format
    from selm.standins.tiny import fixture_rows

    raw = fixture_rows(ROWS)
    for i, row in enumerate(raw):
        # Row 0's y_ref equals its chosen answer: it must then tokenize exactly like chosen.
        row["reference_response"] = row["chosen"][-1]["content"] if i == 0 else f"My answer: {i * 7} or so."
    return [to_trainer_format(r) for r in raw]


def dataset(rows, with_reference=True):
    import datasets

    keep = ("prompt", "chosen", "rejected") + (("reference_response",) if with_reference else ())
    return datasets.Dataset.from_list([{k: r[k] for k in keep} for r in rows])


def config(tmp_path, **kw):
    from selm.trainer_config import SELMConfig

    values = dict(output_dir=str(tmp_path / "out"), beta=0.1, bf16=False, use_cpu=True, gradient_checkpointing=False,
                  per_device_train_batch_size=ROWS, report_to="none", max_length=64, seed=0, save_strategy="no",
                  disable_tqdm=True, prefix_sharing="false")  # packed rows: the same tests in test_prefix_sharing.py
    values.update(kw)
    return SELMConfig(**values)


def selm_trainer(models, tokenizer, ds, args, copy_policy=True):
    from selm.trainer import SELMTrainer

    policy, reference = models
    return SELMTrainer(copy.deepcopy(policy) if copy_policy else policy, ref_model=copy.deepcopy(reference),
                       args=args, train_dataset=ds, processing_class=tokenizer)


def batch_of(trainer, indices=None):
    data = trainer.train_dataset
    examples = [data[i] for i in (indices if indices is not None else range(len(data)))]
    return trainer.data_collator(examples)


def loss_of(trainer, batch):
    trainer.model.train()  # metrics land under "train"; dropout is off (disable_dropout)
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


# ---- the independent computation: chat template + plain forward + log_softmax ----
def tokenized(tokenizer, prompt, completion, max_prompt_length, max_length):
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids  # true for this template; the test relies on it
    completion_ids = full[len(prompt_ids):]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    ids = (prompt_ids + completion_ids)[:max_length]
    return ids, len(prompt_ids)


def summed_logp(model, ids, start):
    """log p(ids[start:] | ids[:start]) summed over tokens, from the full-vocabulary logits."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp[start - 1:].sum()


def independent_loss(policy, reference, tokenizer, rows, alpha, beta, max_prompt_length, max_length):
    losses = []
    for row in rows:
        logps = {}
        for key in ("chosen", "rejected", "reference_response"):
            ids, start = tokenized(tokenizer, row["prompt"], row[key], max_prompt_length, max_length)
            with torch.no_grad():
                ref = summed_logp(reference, ids, start)
            logps[key] = summed_logp(policy, ids, start) - ref
        dpo = -F.logsigmoid(beta * (logps["chosen"] - logps["rejected"]))
        losses.append(dpo + alpha * beta * logps["reference_response"])
    return torch.stack(losses).mean()


# ---- tests ----
def test_alpha_zero_equals_dpo_trainer(tmp_path, models, tokenizer, rows):
    from trl import DPOConfig, DPOTrainer

    policy, reference = models
    selm = selm_trainer(models, tokenizer, dataset(rows), config(tmp_path, alpha=0.0, max_length=40))
    dpo_args = DPOConfig(output_dir=str(tmp_path / "dpo"), beta=0.1, bf16=False, use_cpu=True, max_length=40,
                         gradient_checkpointing=False, report_to="none", save_strategy="no")
    dpo = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=dpo_args,
                     train_dataset=dataset(rows, with_reference=False), processing_class=tokenizer)
    selm_batch, dpo_batch = batch_of(selm), batch_of(dpo)
    n = len(selm.train_dataset)
    assert selm_batch["input_ids"].shape[0] == 3 * n and dpo_batch["input_ids"].shape[0] == 2 * n  # SELM path ran
    width = dpo_batch["input_ids"].shape[1]
    assert torch.equal(selm_batch["input_ids"][: 2 * n, :width], dpo_batch["input_ids"])
    assert loss_of(selm, selm_batch) == pytest.approx(loss_of(dpo, dpo_batch), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert selm._metrics["train"][key][-1] == pytest.approx(dpo._metrics["train"][key][-1], abs=1e-4)
    assert selm._metrics["train"]["loss/optimism"][-1] == 0.0


@pytest.mark.parametrize("prefix_sharing", ["false", "true"])
def test_alpha_positive_equals_independent_formula(prefix_sharing, tmp_path, models, tokenizer, rows):
    alpha, beta, max_prompt_length, max_length = 0.7, 0.3, 12, 40
    trainer = selm_trainer(models, tokenizer, dataset(rows),
                           config(tmp_path, alpha=alpha, beta=beta, max_prompt_length=max_prompt_length,
                                  max_length=max_length, prefix_sharing=prefix_sharing))
    batch = batch_of(trainer)
    assert ("segment_ids" in batch) == (prefix_sharing == "true")
    assert batch["input_ids"].shape[1] <= (3 if prefix_sharing == "true" else 1) * max_length
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    policy = copy.deepcopy(models[0])
    expected = independent_loss(policy, models[1], tokenizer, rows, alpha, beta, max_prompt_length, max_length)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # Same gradient too: the πref(y_ref) part carries none, and the α·β term is where the formula puts it.
    got = trainer.model.get_input_embeddings().weight.grad
    want = policy.get_input_embeddings().weight.grad
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    metrics = trainer._metrics["train"]
    assert metrics["loss/dpo"][-1] + metrics["loss/optimism"][-1] == pytest.approx(loss.item(), abs=1e-5)
    assert metrics["logps/reference"][-1] != metrics["ref_logps/reference"][-1]


def test_reference_tokenized_like_chosen_and_prompt_cut_from_the_left(tmp_path, models, tokenizer, rows):
    trainer = selm_trainer(models, tokenizer, dataset(rows), config(tmp_path, alpha=0.1, max_prompt_length=5))
    first = trainer.train_dataset[0]
    assert first["reference_ids"] == first["chosen_ids"]  # same text -> same tokens, end-of-turn included
    assert first["reference_ids"][-2:] == tokenizer.encode("</s>\n")[-2:]
    for i, row in enumerate(rows):
        full_prompt, _ = tokenized(tokenizer, row["prompt"], row["chosen"], None, 10_000)
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        assert trainer.train_dataset[i]["prompt_ids"] == prompt_ids[-5:]


def test_alpha_step_lowers_reference_logp_more(tmp_path, models, tokenizer, rows):
    def reference_logp_after_one_step(alpha):
        args = config(tmp_path / f"a{alpha}", alpha=alpha, max_steps=1, learning_rate=0.01, optim="sgd",
                      lr_scheduler_type="constant", max_grad_norm=0.0)
        trainer = selm_trainer(models, tokenizer, dataset(rows), args)
        trainer.train()
        with torch.no_grad():
            return sum(summed_logp(trainer.model, *tokenized(tokenizer, r["prompt"], r["reference_response"], None, 64))
                       for r in rows).item()

    with torch.no_grad():
        before = sum(summed_logp(models[0], *tokenized(tokenizer, r["prompt"], r["reference_response"], None, 64))
                     for r in rows).item()
    drop_selm = before - reference_logp_after_one_step(1.0)
    drop_dpo = before - reference_logp_after_one_step(0.0)
    assert drop_selm > drop_dpo + 1e-3, (drop_selm, drop_dpo)


def test_precompute_on_and_off_give_the_same_loss(tmp_path, models, tokenizer, rows):
    kw = dict(alpha=0.5, max_prompt_length=16, max_length=48, precompute_ref_batch_size=3)
    off = selm_trainer(models, tokenizer, dataset(rows), config(tmp_path / "off", **kw))
    on = selm_trainer(models, tokenizer, dataset(rows), config(tmp_path / "on", precompute_ref_log_probs=True, **kw))
    assert on.ref_model is not None  # passed explicitly, so kept (as DPOTrainer does): evaluate() may need it
    assert {"ref_chosen_logps", "ref_rejected_logps", "ref_reference_logps"} <= set(on.train_dataset.column_names)
    # Rows in an order unlike the precompute's length order, so a mis-scattered cache would show.
    indices = [5, 0, 7, 2, 3]
    batch_on = batch_of(on, indices)
    assert "ref_reference_logps" in batch_on
    assert loss_of(on, batch_on) == pytest.approx(loss_of(off, batch_of(off, indices)), abs=1e-5)
    assert on._metrics["train"]["ref_logps/reference"][-1] == pytest.approx(
        off._metrics["train"]["ref_logps/reference"][-1], abs=1e-4)


def test_alpha_without_reference_column_names_it(tmp_path, models, tokenizer, rows):
    with pytest.raises(SELMError, match="'reference_response'"):
        selm_trainer(models, tokenizer, dataset(rows, with_reference=False), config(tmp_path, alpha=0.01),
                     copy_policy=False)


def test_non_finite_loss_stops_naming_the_step(tmp_path, models, tokenizer, rows):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    model.get_input_embeddings().weight.fill_(float("nan"))

    args = config(tmp_path, alpha=0.1, max_steps=4, per_device_train_batch_size=4, save_strategy="steps",
                  save_steps=1, learning_rate=1e-4)
    trainer = selm_trainer(models, tokenizer, dataset(rows), args)
    trainer.add_callback(Poison())
    with pytest.raises(SELMError, match="at step 3") as err:
        trainer.train()
    assert "checkpoint-2" in str(err.value)
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()


def test_config_rejects_negative_alpha_and_empty_prompt(tmp_path):
    with pytest.raises(SELMError, match="'alpha'"):
        config(tmp_path, alpha=-0.001)
    with pytest.raises(SELMError, match="'max_prompt_length'"):
        config(tmp_path, max_prompt_length=0)


def test_non_finite_gradient_is_not_applied(tmp_path, models, tokenizer, rows):
    """A NaN gradient with a finite loss (fp16 weights at a high learning rate, say) never reaches the weights."""
    from transformers import TrainerCallback

    class PoisonGradient(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2:  # step 3's backward gives one weight a NaN gradient
                model.model.layers[0].mlp.up_proj.weight.register_hook(lambda grad: grad * float("nan"))

    args = config(tmp_path, alpha=0.1, max_steps=4, per_device_train_batch_size=2, save_strategy="steps",
                  save_steps=1, learning_rate=1e-3, max_grad_norm=0.0)
    trainer = selm_trainer(models, tokenizer, dataset(rows), args)
    trainer.add_callback(PoisonGradient())
    with pytest.raises(SELMError, match="at step 3") as err:
        trainer.train()
    message = str(err.value)
    assert "gradient norm is nan" in message and "not applied" in message and "\n" not in message
    assert str(tmp_path / "out") in message and "checkpoint-2" in message
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint-2")
    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param).all(), name
        assert torch.equal(param, saved.get_parameter(name)), name  # the weights are still those after step 2
    assert not (tmp_path / "out" / "checkpoint-3").exists()


NAN_GRADIENT_RUN = '''
import os, sys, torch, datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from selm.data import to_trainer_format
from selm.errors import SELMError
from selm.standins.tiny import fixture_rows
from selm.trainer import SELMTrainer
from selm.trainer_config import SELMConfig

model_dir, out = sys.argv[1], sys.argv[2]
rows = fixture_rows(16)
for i, row in enumerate(rows):
    row["reference_response"] = f"The answer is {i}."
args = SELMConfig(output_dir=out, alpha=0.1, bf16=False, use_cpu=True, gradient_checkpointing=False, max_steps=4,
                  per_device_train_batch_size=2, save_strategy="steps", save_steps=1, learning_rate=1e-3,
                  report_to="none", disable_tqdm=True, precompute_ref_log_probs=True, ddp_backend="gloo")


class NaNGradient(TrainerCallback):
    """From step 3 on, rank 0's first MLP output has an infinite gradient (its forward value is unchanged)."""

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 2 and trainer.accelerator.process_index == 0:
            mlp = trainer.accelerator.unwrap_model(trainer.model).model.layers[0].mlp
            mlp.register_forward_hook(lambda module, inputs, out: out + torch.sqrt(out - out.detach()))


data = datasets.Dataset.from_list([to_trainer_format(r) for r in rows])
trainer = SELMTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[NaNGradient()])
try:
    trainer.train()
except SELMError as e:
    rank = trainer.accelerator.process_index
    if not trainer.is_deepspeed_enabled:  # DDP: every rank holds the weights; they are still those of step 2
        saved = AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2"))
        model = trainer.accelerator.unwrap_model(trainer.model)
        unchanged = all(torch.equal(p, saved.get_parameter(n)) for n, p in model.named_parameters())
        print(f"rank {rank}: weights unchanged: {unchanged}")
    print(f"rank {rank} stopped: {e}", flush=True)
    sys.exit(3)
'''


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "zero3"])
def test_non_finite_gradient_on_one_rank_stops_every_process(launcher, tmp_path, tiny_model_dir):
    """DDP reduces the gradients and DeepSpeed the norm before the check, so all ranks stop at the same step (no
    hang); DDP's weights stay those of step 2; ZeRO-3 reports DeepSpeed's skipped step (norm set to inf)."""
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "run.py"
    script.write_text(NAN_GRADIENT_RUN)
    zero3 = str(REPO / "recipes/accelerate_configs/cpu_zero3.yaml")
    launch = (["-m", "torch.distributed.run", "--nproc_per_node", "2"] if launcher == "ddp" else
              ["-m", "accelerate.commands.launch", "--config_file", zero3, "--num_processes", "2"])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, *launch, str(script), str(tiny_model_dir), str(out)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    # The two ranks share one pipe: a line of one may be written into the middle of the other's, so find the stops
    # in the whole output, each up to the next rank's stop or the end of its line.
    stops = re.findall(r"(rank \d) stopped: (training stopped at step 3 .*?)(?=rank \d stopped:|\n|$)", result.stdout)
    assert sorted(rank for rank, _ in stops) == ["rank 0", "rank 1"], result.stderr[-3000:]
    stops = [message for _, message in stops]
    assert result.returncode != 0 and (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()
    if launcher == "ddp":
        assert result.stdout.count("weights unchanged: True") == 2
    else:
        assert all("the gradient norm is inf" in line for line in stops)


def test_stop_message_names_the_checkpoint_a_resume_would_use(tmp_path):
    """One "last complete checkpoint" rule: a half-written checkpoint (no trainer_state.json, which transformers
    writes last) is not named as the last good one, as the resume skips it too."""
    from types import SimpleNamespace

    from selm.trainer import SELMTrainer
    from selm.training import last_complete_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-3").mkdir()  # a crash while it was being saved
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=3, epoch=0.5), model=SimpleNamespace(training=True),
                              args=SimpleNamespace(output_dir=str(tmp_path)))
    message = str(SELMTrainer._stopped(trainer, "the loss is nan"))
    assert message.endswith(f"last good checkpoint {tmp_path / 'checkpoint-2'}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
