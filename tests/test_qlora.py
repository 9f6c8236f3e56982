"""Chained LoRA and QLoRA iterations: iteration 2's reference is exactly the model iteration 1 trained (independent
log-probs), an nf4 train step, the AVX512-BF16 repacking trap, and `load_in_4bit` never silently ignored."""

import pytest
import torch

from conftest import script_main
from test_train_script import write_ranked


def bitsandbytes_loads() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


needs_bnb = pytest.mark.skipif(not bitsandbytes_loads(), reason="bitsandbytes does not load here (pip install -e .[qlora])")
KINDS = ["lora", pytest.param("qlora", marks=needs_bnb)]
LORA = dict(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear",
            learning_rate=5e-3)


def lora_recipe(smoke_recipe, kind, **overrides):
    four_bit = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4") if kind == "qlora" else {}
    return smoke_recipe(**LORA, **four_bit, warmup_steps=0, **overrides)


def own_model(base_dir, adapter_dir, four_bit: bool):
    """Base + adapter, loaded with peft and transformers directly (not selm's loader), as iteration 1 trained it:
    4-bit layers without CPU repacking, the adapter in bf16 on a 4-bit base (trl's QLoRA precision)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = dict(quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)) if four_bit else {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **quantization)
    for module in base.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if four_bit:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
    return model


def own_logps(model, prompt_ids, completion_ids) -> float:
    """sum_t log p(completion_t | prompt, completion_<t): one forward, log-softmax, gather."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].sum())


@pytest.mark.parametrize("kind", KINDS)
def test_iteration_two_reference_is_exactly_the_trained_iteration_one_model(smoke_recipe, tiny_model_dir, kind):
    from selm.recipe.parse import parse_recipe
    from selm.training import _build_trainer, load_training_data

    recipe_path = lora_recipe(smoke_recipe, kind)
    run = recipe_path.parent / "run"
    write_ranked(run, 1)
    assert script_main("train")([str(recipe_path), "--iteration", "1"]) == 0
    write_ranked(run, 2)
    recipe, _ = parse_recipe([str(recipe_path), "--iteration", "2"])
    args = recipe.training_config()
    trainer, _ = _build_trainer(recipe, args, recipe.start_model, load_training_data(recipe, args.alpha))
    scored = trainer.train_dataset  # the precomputed reference log-probs of iteration 2's rows
    trained = own_model(tiny_model_dir, run / "iter-1" / "model", kind == "qlora")
    gaps, moved = [], []
    for row in scored.select(range(6)):
        for group in ("chosen", "rejected", "reference"):
            expected = own_logps(trained, row["prompt_ids"], row[f"{group}_ids"])
            gaps.append(abs(row[f"ref_{group}_logps"] - expected))
            with trained.disable_adapter():  # the base model
                moved.append(abs(own_logps(trained, row["prompt_ids"], row[f"{group}_ids"]) - expected))
    # the reference is iteration 1's model (float rounding only), not the base model iteration 1 moved away from
    assert max(gaps) < 1e-4 and min(moved) > 100 * max(gaps), (max(gaps), min(moved))


def four_bit_lora(tiny_model_dir, keep_trainable: bool):
    """The tiny model in nf4 (through selm's loader) with a seeded LoRA adapter, as the first QLoRA iteration has it."""
    from peft import LoraConfig, get_peft_model
    from trl import ModelConfig

    from selm.models import load_model

    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), dtype="float32", use_peft=True, load_in_4bit=True)
    model = load_model(str(tiny_model_dir), model_args, False)
    if not keep_trainable:  # undo selm's one setting: bitsandbytes' own default on this CPU
        from bitsandbytes.functional import has_avx512bf16

        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = has_avx512bf16()
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def lora_gradients(model, ids, reference_pass: bool) -> torch.Tensor:
    """The LoRA gradients of one training step, after (or without) an eval-mode forward like the reference pass."""
    if reference_pass:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])


@needs_bnb
def test_a_reference_pass_does_not_change_the_next_4bit_training_step(tiny_model_dir):
    from bitsandbytes.functional import has_avx512bf16

    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
    expected = lora_gradients(four_bit_lora(tiny_model_dir, True), ids, reference_pass=False)
    assert expected.norm() > 0
    got = lora_gradients(four_bit_lora(tiny_model_dir, True), ids, reference_pass=True)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here (the check above still ran)")
    # the trap itself, without selm's setting: the reference pass repacks the 4-bit weights and the step goes wrong
    trapped = lora_gradients(four_bit_lora(tiny_model_dir, False), ids, reference_pass=True)
    assert not torch.allclose(trapped, expected, rtol=1e-2, atol=1e-5)


@needs_bnb
def test_load_in_4bit_loads_a_4bit_model_and_trains_an_nf4_step(smoke_recipe, tiny_model_dir):
    from bitsandbytes.nn import Linear4bit

    from selm.recipe.parse import parse_recipe
    from selm.training import _build_trainer, load_training_data

    recipe_path = lora_recipe(smoke_recipe, "qlora", max_steps=1)
    write_ranked(recipe_path.parent / "run", 1)
    recipe, _ = parse_recipe([str(recipe_path), "--iteration", "1"])
    args = recipe.training_config()
    trainer, _ = _build_trainer(recipe, args, recipe.start_model, load_training_data(recipe, args.alpha))
    layers = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)  # not a full-precision model
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)  # only the adapter trains
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items()), "the nf4 step changed no adapter weight"
    assert all(torch.isfinite(after[n]).all() for n in before)


@pytest.mark.slow
@needs_bnb
def test_qlora_smoke_runs_two_iterations_end_to_end(tmp_path, tiny_model_dir, fixture_dir):
    import json

    import yaml
    from safetensors.torch import load_file

    from conftest import REPO
    from test_pipeline import make

    run = tmp_path / "run"
    args = (f"--model_name_or_path {tiny_model_dir} --dataset_name {fixture_dir} --load_in_4bit true "
            "--max_samples 64 --eval_max_samples 12")
    assert "run finished" in make("run", f"RECIPE={REPO / 'recipes/smoke/selm_lora.yaml'}", f"RUN_DIR={run}",
                                  f"ARGS={args}")
    for k in (1, 2):
        d = run / f"iter-{k}"
        assert yaml.safe_load((d / "train_config.yaml").read_text())["model"]["load_in_4bit"] is True
        # trl keeps a QLoRA adapter in bf16 (a LoRA adapter on the fp32 tiny model stays fp32): trained on 4 bits
        assert {t.dtype for t in load_file(str(d / "model" / "adapter_model.safetensors")).values()} == {torch.bfloat16}
        assert json.loads((d / "eval" / "metrics.json").read_text())["num_prompts"] == 12
    # Fig. 4 on the 4-bit adapters: iteration 2's reference is iteration 1's policy, row for row
    from selm.evaluation import implicit_rewards
    from selm.recipe.parse import parse_recipe

    tables = {k: implicit_rewards(parse_recipe([str(run / "recipe.yaml"), "--iteration", str(k)])[0]).to_pydict()
              for k in (1, 2)}
    assert tables[2]["chosen_logp_reference"] == pytest.approx(tables[1]["chosen_logp_policy"], abs=1e-4)
    assert tables[1]["chosen_logp_policy"] != pytest.approx(tables[1]["chosen_logp_reference"], abs=1e-3)


@needs_bnb
def test_a_bare_4bit_model_is_scored_unchanged(tiny_model_dir):
    from trl import ModelConfig

    from selm.lora import scoreable
    from selm.models import load_model

    model = load_model(str(tiny_model_dir), ModelConfig(dtype="float32", use_peft=True, load_in_4bit=True), False)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        wrapped = scoreable(model)  # what Fig. 4 scores a QLoRA run's base with
        assert wrapped is not model and torch.equal(wrapped(input_ids=ids).logits, expected)
