"""The other online methods (docs/methods.md): RSO's sampler (statistically), best-of-n candidates, ReST's filter,
the keys each method accepts and refuses."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from selm.errors import SELMError
from selm.methods import rest_keep, rso_pair, rso_sample
from selm.ranking import rank_rows
from selm.recipe.parse import parse_recipe

from test_ranking import TableScorer, generated_rows, run_rank, write_generated

DRAWS = 20000


def binomial_bound(p: float, n: int = DRAWS) -> float:
    """4 binomial standard errors of a frequency over n draws (a false failure about once in 15,000 runs)."""
    return 4 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------------------------------------
# RSO
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scores, beta", [([0.0, 1.0, 2.0, 0.5, 2.0], 1.0), ([3.0, -1.0, 0.2, 0.0], 0.5)])
def test_rso_first_pass_accepts_each_candidate_with_probability_exp_r_minus_rmax_over_beta(scores, beta):
    # With as many samples asked as there are candidates, the first pass visits every candidate: its acceptance
    # frequency is the sampler's acceptance probability.
    rng = np.random.default_rng(1234)
    accepted = np.zeros(len(scores))
    for _ in range(DRAWS):
        for i in rso_sample(scores, beta, rng, num_samples=len(scores))[0]:
            accepted[i] += 1
    expected = [math.exp((s - max(scores)) / beta) for s in scores]
    for frequency, p in zip(accepted / DRAWS, expected):
        assert abs(frequency - p) <= binomial_bound(p) + 1e-12, (frequency, p)


def test_rso_pair_distribution_matches_the_algorithm_worked_by_hand():
    # Candidates 0, 1, 2 with scores 0, 1, 2 and beta 1: first-pass acceptance e^-2, e^-1, 1 in that order, stopping
    # at the second acceptance; if only candidate 2 is accepted, the second pass has r_max 1 over {0, 1}: e^-1, 1.
    scores, p0, p1 = [0.0, 1.0, 2.0], math.exp(-2), math.exp(-1)
    exact = {(1, 0): p0 * p1,
             (2, 0): p0 * (1 - p1) + (1 - p0) * (1 - p1) * math.exp(-1),
             (2, 1): (1 - p0) * p1 + (1 - p0) * (1 - p1) * (1 - math.exp(-1))}
    rng = np.random.default_rng(7)
    counts = {pair: 0 for pair in exact}
    for _ in range(DRAWS):
        counts[rso_pair(scores, 1.0, rng)] += 1  # (chosen, rejected): the higher score first
    assert sum(exact.values()) == pytest.approx(1.0)
    for pair, p in exact.items():
        assert abs(counts[pair] / DRAWS - p) <= binomial_bound(p), (pair, counts[pair] / DRAWS, p)


def test_rso_needs_two_candidates_and_labels_ties_by_index():
    with pytest.raises(SELMError, match="at least 2 candidates"):
        rso_sample([1.0], 1.0, np.random.default_rng(0))
    assert rso_pair([5.0, 5.0], 1.0, np.random.default_rng(0)) == (0, 1)


@pytest.mark.parametrize("loss_type, expected", [("hinge", 1.0), ("sigmoid", math.log(2))])
def test_rso_pairs_train_with_trls_hinge_loss_at_alpha_zero(smoke_recipe, loss_type, expected):
    # Before the first step the policy is its reference: every margin is 0, so the hinge loss max(0, 1 - beta * 0)
    # is 1 and the sigmoid loss -log(sigmoid(0)) is log 2.
    from selm.artifacts import start_model
    from selm.training import _build_trainer, load_training_data
    from test_train_script import write_ranked

    recipe_path = smoke_recipe(alpha=0.0, loss_type=loss_type, update_rule="rso", rso_beta=1.0)
    write_ranked(recipe_path.parent / "run", with_reference=False)
    recipe = parse_recipe([str(recipe_path), "--iteration", "1"])[0]
    args = recipe.training_config()
    trainer, _ = _build_trainer(recipe, args, start_model(recipe), load_training_data(recipe, args.alpha))
    batch = next(iter(trainer.get_train_dataloader()))
    # hinge: trl's own DPO path, where loss_type is implemented (sigmoid pairs may take the SELM path, alpha 0)
    assert ("sequence_group" in batch) == (loss_type == "sigmoid")
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected, abs=1e-5)


def rso_rows(num_rows=40):
    rows = generated_rows(num_rows, lambda i, row: [f"a{i}", f"b{i}", f"c{i}"])
    table = [[float(i % 5), 1.0, 2.0, 0.5, float(i % 3)] for i in range(num_rows)]
    return rows, table


def test_rso_rank_rows_is_seeded_by_seed_iteration_and_row():
    rows, table = rso_rows()

    def pairs(seed):
        kept, dropped, _ = rank_rows(rows, TableScorer(table), "rso", "keep", rso_beta=1.0, rso_seed=seed)
        assert not dropped
        return [(r["chosen_index"], r["rejected_index"]) for r in kept]

    first = pairs((10, 1))
    assert pairs((10, 1)) == first  # a rerun (or a resumed stage) draws the same pairs
    assert pairs((10, 2)) != first and pairs((11, 1)) != first
    for (chosen, rejected), scores in zip(first, table):
        assert chosen != rejected and scores[chosen] >= scores[rejected]


# ---------------------------------------------------------------------------------------------------------------
# best-of-n: candidates: generated
# ---------------------------------------------------------------------------------------------------------------
def test_generated_candidates_rank_only_the_responses_and_the_report_counts_them():
    rows = generated_rows(4, lambda i, row: ["x", "y", "" if i == 3 else "z"])
    table = [[1.0, 3.0, 2.0], [0.0, 0.0, 5.0], [2.0, 2.0, 2.0], [4.0, 1.0, 0.0]]
    kept, dropped, report = rank_rows(rows, TableScorer(table), "best_worst", "drop", candidates="generated")
    assert [(r["chosen_index"], r["rejected_index"]) for r in kept] == [(1, 0), (2, 1), (0, 2)]
    assert [r["reason"] for r in dropped] == ["tie"]
    assert all(r["num_generated"] == 3 and len(r["candidates"]) == 3 for r in kept + dropped)
    assert report["generated_chosen"] == report["generated_rejected"] == 3 and report["generated_neither"] == 0
    assert report["empty_generations"] == 1 and report["empty_generation_chosen"] == 0
    assert report["mean_score"]["generated"] == pytest.approx(sum(map(sum, table)) / 12)
    assert report["mean_score"]["original_chosen"] is None
    # the paper's candidates: the dataset's pair is there and counts as not generated
    table = [[1.0, 3.0, 2.0, 9.0, 0.0]] * 4
    kept, _, report = rank_rows(rows, TableScorer(table), "best_worst", "drop")
    assert all(r["chosen_index"] == 3 and r["num_generated"] == 3 for r in kept)
    assert report["generated_chosen"] == 0 and report["generated_neither"] == 4


# ---------------------------------------------------------------------------------------------------------------
# ReST
# ---------------------------------------------------------------------------------------------------------------
def test_rest_keeps_exactly_the_responses_at_or_above_the_threshold():
    assert rest_keep([0.2, 0.5, 0.9, 0.5], 0.5) == [1, 2, 3]
    assert rest_keep([0.2, 0.4], 0.5) == []
    rows = generated_rows(3, lambda i, row: [f"a{i}", f"b{i}", f"c{i}"])
    table = [[0.9, 0.1, 0.5], [0.2, 0.3, 0.4], [0.5, 0.7, 0.6]]
    kept, dropped, report = rank_rows(rows, TableScorer(table), "rest", "drop", candidates="generated",
                                      rest_threshold=0.5)
    assert [r["chosen"][-1]["content"] for r in kept] == ["a0", "c0", "a2", "b2", "c2"]
    assert [r["rejected_index"] for r in kept] == [1, 1, 0, 0, 0]  # each row's worst response
    assert [(r["prompt_id"], r["reason"]) for r in dropped] == [(rows[1]["prompt_id"], "below_threshold")]
    assert report["rest_responses_kept"] == report["rows_out"] == 5 and report["rest_prompts_kept"] == 2
    assert report["rest_threshold"] == 0.5 and report["dropped_by_reason"] == {"below_threshold": 1}


def rest_recipe(smoke_recipe, **overrides):
    """The smoke recipe as a ReST recipe: alpha 0, generated candidates, no preference-only training key."""
    import yaml

    from selm.rest_training import DPO_ONLY

    path = smoke_recipe(update_rule="rest", candidates="generated", alpha=0.0, **overrides)
    recipe = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in DPO_ONLY}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_rest_stage_with_a_threshold_no_response_passes_is_one_line(smoke_recipe, capsys):
    recipe = rest_recipe(smoke_recipe, rest_threshold=[5.0, 5.0])
    generated, _ = write_generated(recipe, num_rows=6)
    with pytest.raises(SystemExit):
        run_rank(recipe)
    err = capsys.readouterr().err
    assert "iteration 1: no generated response scores >= rest_threshold 5.0 (the best scores 1.0)" in err
    assert not (generated.parent / "ranked.parquet").exists()
    assert json.loads((generated.parent / "rank_report.json").read_text())["rest_responses_kept"] == 0


def test_rest_stage_writes_one_row_per_kept_response(smoke_recipe):
    recipe = rest_recipe(smoke_recipe, rest_threshold=[1.0, 0.0])
    generated, rows = write_generated(recipe, num_rows=9)  # every third answer is right (oracle reward 1)
    assert run_rank(recipe) == 0
    ranked = pq.read_table(generated.parent / "ranked.parquet").to_pylist()
    assert [r["prompt_id"] for r in ranked] == [rows[i]["prompt_id"] for i in (0, 3, 6)]


def test_rest_dry_run_shows_a_kept_response_as_what_it_trains(smoke_recipe, capsys):
    from selm.cli import run_stage
    from selm.training import train_stage

    recipe = rest_recipe(smoke_recipe, rest_threshold=[1.0, 0.0])
    write_generated(recipe, num_rows=9)
    assert run_rank(recipe) == 0
    capsys.readouterr()
    assert run_stage("train", train_stage, [str(recipe), "--iteration", "1", "--dry_run"]) == 0
    preview = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# train dry run")]
    assert len(preview) == 1 and "ranked.parquet" in preview[0]
    assert "prompt + kept response (ReST: supervised loss on the response only)" in preview[0]


def test_rest_trains_the_start_model_on_the_kept_responses_with_the_loss_on_the_completion_only(smoke_recipe,
                                                                                                tiny_model_dir):
    from transformers import AutoTokenizer

    from selm.cli import run_stage
    from selm.recipe.parse import parse_recipe
    from selm.rest_training import build_sft_trainer, load_sft_data, sft_config
    from selm.training import train_stage

    recipe_path = rest_recipe(smoke_recipe, rest_threshold=[1.0, 0.0])
    generated, rows = write_generated(recipe_path, num_rows=48)  # 16 right answers are kept
    assert run_rank(recipe_path) == 0
    recipe = parse_recipe([str(recipe_path), "--iteration", "1"])[0]
    args = sft_config(recipe)
    assert type(args).__name__ == "SFTConfig" and args.completion_only_loss and args.learning_rate == 5.0e-4
    trainer, _ = build_sft_trainer(recipe, args, str(tiny_model_dir), load_sft_data(recipe, args))
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    kept = {r["chosen"][-1]["content"] for r in rows[::3]}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tokenizer.decode(ids[labels != -100])
        text = tokenizer.decode(ids[batch["attention_mask"][0].new_ones(len(ids)).bool()])
        assert any(trained.startswith(answer) for answer in kept), trained  # the completion, not the prompt
        assert "user" not in trained and len(trained) < len(text)

    assert run_stage("train", train_stage, [str(recipe_path), "--iteration", "1"]) == 0
    run = recipe_path.parent / "run" / "iter-1"
    assert (run / "model" / "config.json").is_file()
    import json as json_

    steps = [h for h in json_.loads((run / "train_log.json").read_text()) if "loss" in h]
    assert len(steps) == 1  # 16 kept responses at the global batch of 16: one optimizer step


@pytest.mark.parametrize("name, first", [("zephyr", "<s>"), ("llama3", "<|begin_of_text|>")])
def test_rest_rows_start_with_one_bos_as_generation_and_dpo_training_do(name, first, paper_standin, smoke_recipe):
    from transformers import AutoTokenizer

    from selm.rest_training import build_sft_trainer, load_sft_data, sft_config

    model = str(paper_standin(name))
    recipe_path = rest_recipe(smoke_recipe, rest_threshold=[1.0, 0.0], model_name_or_path=model)
    write_generated(recipe_path, num_rows=9)
    assert run_rank(recipe_path) == 0
    recipe = parse_recipe([str(recipe_path), "--iteration", "1"])[0]
    args = sft_config(recipe)
    trainer, _ = build_sft_trainer(recipe, args, model, load_sft_data(recipe, args))
    bos = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(first)
    for row in trainer.train_dataset:
        assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1


# ---------------------------------------------------------------------------------------------------------------
# The keys each method takes (one line each)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(update_rule="rso", candidates="generated", rso_beta=1.0, num_responses=1),
     "'update_rule' rso draws 2 of the candidates, but candidates: generated with num_responses 1"),
    (dict(update_rule="rso"), "'update_rule' rso needs 'rso_beta'"),
    (dict(update_rule="best_worst", rso_beta=1.0), "'rso_beta' is set but 'update_rule' is best_worst"),
    (dict(update_rule="rso", rso_beta=0.0), "'rso_beta' is 0.0; it must be > 0"),
    (dict(update_rule="rest", candidates="generated", alpha=0.0), "'update_rule' rest needs 'rest_threshold'"),
    (dict(update_rule="rest", rest_threshold=0.5, alpha=0.0), "rest keeps generated responses only"),
    (dict(update_rule="rest", candidates="generated", rest_threshold=0.5, alpha=0.1), "'alpha' is 0.1; set alpha: 0"),
    (dict(update_rule="rest", candidates="generated", rest_threshold=0.5, alpha=0.0),
     "'max_prompt_length' is a preference-loss key; update_rule rest trains with the supervised loss"),
    (dict(update_rule="rest", candidates="generated", rest_threshold=[0.1, 0.2, 0.3], alpha=0.0),
     "'rest_threshold' has 3 per-iteration values but the recipe has 2 iterations"),
    (dict(update_rule="replace", candidates="generated"), "needs the dataset's pair among the candidates"),
    (dict(loss_type="hinge", alpha=0.1), "supports only DPO's sigmoid loss"),
    (dict(reference_model="fixed"), "'reference_model' is 'fixed'; expected one of"),
    (dict(use_peft=True, reference_model="initial"), "'reference_model' initial with 'use_peft' is not supported"),
    (dict(use_peft=True, update_rule="rest", candidates="generated", rest_threshold=0.5, alpha=0.0),
     "'use_peft' with 'update_rule' rest is not supported"),
])
def test_method_settings_are_refused_in_one_line(smoke_recipe, overrides, message):
    recipe = smoke_recipe(**overrides)
    with pytest.raises(SELMError) as error:
        parse_recipe([str(recipe), "--iteration", "1"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_method_settings_that_are_accepted(smoke_recipe):
    recipe = rest_recipe(smoke_recipe, rest_threshold=[0.5, 0.75])
    assert parse_recipe([str(recipe), "--iteration", "2"])[0].ranking.rest_threshold == 0.75
    recipe = smoke_recipe(update_rule="rso", rso_beta=0.5, candidates="generated", num_responses=2, temperature=1.0,
                          alpha=0.0, loss_type="hinge")
    parsed = parse_recipe([str(recipe), "--iteration", "1"])[0]
    assert parsed.ranking.rso_beta == 0.5 and parsed.pipeline.reference_model == "previous_iteration"


# ---------------------------------------------------------------------------------------------------------------
# reference_model
# ---------------------------------------------------------------------------------------------------------------
def completion_logps_by_hand(model_dir, rows):
    """Token-summed log-probs of each row's chosen_ids after its prompt_ids, from one plain forward each."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            start = len(row["prompt_ids"]) - 1
            out.append(logprobs[start:].gather(1, targets[start:, None]).sum().item())
    return out


@pytest.mark.parametrize("reference", ["initial", "previous_iteration"])
def test_iteration_two_trains_against_the_reference_the_key_names(smoke_recipe, tiny_model_dir, reference,
                                                                 monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selm.artifacts import start_model
    from selm.training import _build_trainer, load_training_data
    from test_train_script import write_ranked

    recipe_path = smoke_recipe(reference_model=reference)  # precompute_ref_log_probs: true, as the demo recipes
    run = recipe_path.parent / "run"
    previous = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # iteration 1's model: the base, moved
    torch.manual_seed(0)
    with torch.no_grad():
        for p in previous.parameters():
            p.add_(0.05 * torch.randn_like(p))
    previous.save_pretrained(run / "iter-1" / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "iter-1" / "model")
    write_ranked(run, iteration=2)

    recipe = parse_recipe([str(recipe_path), "--iteration", "2"])[0]
    assert recipe.reference_model == str(tiny_model_dir if reference == "initial" else run / "iter-1" / "model")
    args = recipe.training_config()
    trainer, _ = _build_trainer(recipe, args, start_model(recipe), load_training_data(recipe, args.alpha))
    rows = trainer.train_dataset.select(range(6)).to_list()
    stored = [r["ref_chosen_logps"] for r in rows]
    base, moved = completion_logps_by_hand(tiny_model_dir, rows), completion_logps_by_hand(run / "iter-1" / "model", rows)
    expected, other = (base, moved) if reference == "initial" else (moved, base)
    assert stored == pytest.approx(expected, abs=1e-3)
    assert min(abs(a - b) for a, b in zip(stored, other)) > 1e-2  # the two references really differ
    policy = dict(trainer.model.named_parameters())  # the policy starts from iteration 1's model either way
    assert all(torch.equal(policy[name], p) for name, p in previous.named_parameters())

    # The implicit rewards (Fig. 4) score iteration 2's model against the same reference.
    import shutil

    from selm import evaluation

    shutil.copytree(run / "iter-1" / "model", run / "iter-2" / "model")
    scored = []

    def fake_logps(recipe, model_path, data):
        scored.append(model_path)
        return {"row": list(range(len(data))), "prompt_id": data["prompt_id"], "chosen": [0.0] * len(data),
                "rejected": [0.0] * len(data)}

    monkeypatch.setattr(evaluation, "completion_logps", fake_logps)
    table = evaluation.implicit_rewards(parse_recipe([str(recipe_path), "--iteration", "2"])[0])
    assert scored == [str(run / "iter-2" / "model"), str(tiny_model_dir if reference == "initial"
                                                          else run / "iter-1" / "model")]
    assert table.num_rows > 0


# ---------------------------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------------------------
METHOD_RECIPES = {  # recipe: (the keys that differ from its dpo.yaml besides output_dir and comments, method keys)
    # the demo's method settings: chosen on development seeds (benchmarks/demo_dev_sweep.md)
    "recipes/demo/best_of_n.yaml": dict(temperature=0.1, num_responses=8, candidates="generated"),
    "recipes/demo/rso.yaml": dict(temperature=0.1, num_responses=4, candidates="generated", update_rule="rso",
                                  rso_beta=0.2),
    "recipes/demo/rest.yaml": dict(temperature=0.1, num_responses=4, candidates="generated", update_rule="rest",
                                   rest_threshold=[1.0, 1.0, 1.0], on_tie=None, max_prompt_length=None,
                                   precompute_ref_log_probs=None),
    "recipes/demo/dpo_fixed_ref.yaml": dict(reference_model="initial"),
    "recipes/zephyr-7b-sft/best_of_n.yaml": dict(temperature=1.0, num_responses=4, candidates="generated"),
    "recipes/llama-3-8b-instruct/best_of_n_rm.yaml": dict(
        temperature=1.0, num_responses=8, candidates="generated", ranker="reward_model",
        ranker_model_name_or_path="sfairXC/FsfairX-LLaMA3-RM-v0.1", ranker_max_length=2048, pairrm_dtype=None),
}


@pytest.mark.parametrize("recipe", sorted(METHOD_RECIPES))
def test_method_recipes_are_their_dpo_recipe_with_the_method_keys_and_make_plans_them(recipe, tmp_path):
    import subprocess

    import yaml

    from conftest import REPO

    method = yaml.safe_load((REPO / recipe).read_text())
    dpo = yaml.safe_load((REPO / recipe).with_name("dpo.yaml").read_text())
    differing = {k: method.get(k) for k in method.keys() | dpo.keys() if method.get(k) != dpo.get(k)}
    assert differing.pop("output_dir") != dpo["output_dir"]
    assert differing == METHOD_RECIPES[recipe]
    iterations = [0, 1, 2, 3] if method.get("dpo_iteration_zero") else [1, 2, 3]
    for k in iterations:  # every iteration resolves (per-iteration lists, the method's cross-key checks)
        processes = "1" if "demo" in recipe else "8"
        parsed = parse_recipe([str(REPO / recipe), "--iteration", str(k), "--num_processes", processes])[0]
        assert parsed.training["alpha"] == 0.0
    plan = subprocess.run(["make", "-n", "run", f"RECIPE={recipe}", f"RUN_DIR={tmp_path / 'run'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    for k in (1, 2, 3):
        for stage in ("generate", "rank", "train", "evaluate"):
            assert f"scripts/{stage}.py {tmp_path / 'run' / 'recipe.yaml'} --iteration {k}" in plan.stdout
    assert not (tmp_path / "run").exists()  # a plan writes nothing


def test_a_shared_iteration_zero_is_shared_whatever_reference_model_says(smoke_recipe, tmp_path):
    # iteration 0 trains against the base model under either choice: the fixed-reference run reuses it
    from selm.training import check_shared_iteration_zero

    shared = tmp_path / "shared-iter0"
    common = dict(dpo_iteration_zero=True, learning_rate=[5.0e-4, 5.0e-4, 2.0e-4], iteration_zero_dir=str(shared),
                  alpha=0.0)
    first = parse_recipe([str(smoke_recipe(**common)), "--iteration", "0"])[0]
    shared.mkdir()
    (shared / "train_config.yaml").write_text(first.to_yaml(), encoding="utf-8")
    fixed = smoke_recipe(**common, reference_model="initial", output_dir=str(tmp_path / "fixed"))
    check_shared_iteration_zero(parse_recipe([str(fixed), "--iteration", "0"])[0])
    other = smoke_recipe(**common, reference_model="initial", beta=0.05, output_dir=str(tmp_path / "other"))
    with pytest.raises(SELMError, match=r"other settings \(training.beta\)"):
        check_shared_iteration_zero(parse_recipe([str(other), "--iteration", "0"])[0])


def test_zephyr_best_of_n_reuses_the_iteration_zero_of_zephyr_selm(tmp_path):
    # make zephyr-best-of-n passes zephyr-selm's iteration_zero_dir: nothing iteration 0 trains with may differ
    from conftest import REPO
    from selm.io import write_text
    from selm.training import check_shared_iteration_zero

    shared = ["--iteration", "0", "--iteration_zero_dir", str(tmp_path / "iter0"), "--num_processes", "8"]
    selm = parse_recipe([str(REPO / "recipes/zephyr-7b-sft/selm.yaml"), *shared])[0]
    best_of_n = parse_recipe([str(REPO / "recipes/zephyr-7b-sft/best_of_n.yaml"), *shared])[0]
    write_text(selm.iter_dir() / "train_config.yaml", selm.to_yaml())  # as zephyr-selm's iteration 0 leaves it
    check_shared_iteration_zero(best_of_n)
    assert best_of_n.iter_dir() == selm.iter_dir() and best_of_n.generation.num_responses == 4
