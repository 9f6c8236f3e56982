"""Exploration diagnostics (selm/exploration.py, selm/policy_kl.py) against values computed by hand or exactly."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selm import layout
from selm.exploration import answer_diversity, held_out_answers, iteration_costs, ranking_diagnostics
from selm.layout import RunLayout


def good_reward(prompt, response):
    """A test 'true reward': 1 for the answer "good", 0.5 for "ok", else 0."""
    return {"good": 1.0, "ok": 0.5}.get(response, 0.0)


def _msg(prompt, answer=None):
    return [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": answer}] if answer else [])


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _ranked_row(prompt, candidates, scores, chosen, rejected):
    return {"prompt": prompt, "prompt_id": prompt, "chosen": _msg(prompt, candidates[chosen]),
            "rejected": _msg(prompt, candidates[rejected]), "candidates": candidates, "scores": scores,
            "chosen_index": chosen, "rejected_index": rejected}


@pytest.fixture
def tiny_run(tmp_path):
    """Iteration 1 with n = 2 generated responses per prompt and the dataset's pair as candidates 2 and 3."""
    run = RunLayout(tmp_path / "run")
    generated = [
        {"prompt": "a", "prompt_id": "a", "chosen": _msg("a", "ok"), "rejected": _msg("a", "bad"),
         "reference_response": "good", "responses": ["good", "good"]},
        {"prompt": "b", "prompt_id": "b", "chosen": _msg("b", "good"), "rejected": _msg("b", "bad"),
         "reference_response": "bad", "responses": ["bad", "ok"]},
        {"prompt": "c", "prompt_id": "c", "chosen": _msg("c", "ok"), "rejected": _msg("c", "ok"),
         "reference_response": "ok", "responses": ["ok", "ok"]},
    ]
    _write(run.generated(1), generated)
    # the scores are deliberately not the true reward: the diagnostics must recompute it
    _write(run.ranked(1), [_ranked_row("a", ["good", "good", "ok", "bad"], [9, 9, 5, 0], 0, 3),
                           _ranked_row("b", ["bad", "ok", "good", "bad"], [1, 2, 7, 1], 2, 3)])
    _write(run.ranking_dropped(1), [{**_ranked_row("c", ["ok", "ok", "ok", "ok"], [3, 3, 3, 3], 0, 3),
                                     "reason": "tie"}])
    run.train_log(1).write_text(json.dumps([{"loss": 0.7, "num_tokens": 120.0, "step": 1},
                                            {"loss": 0.6, "num_tokens": 250.0, "step": 2},
                                            {"train_loss": 0.65, "step": 2}]), encoding="utf-8")
    return run


def test_ranking_diagnostics_by_hand(tiny_run):
    d = ranking_diagnostics(tiny_run, 1, good_reward)
    assert d["num_responses"] == 2 and d["rows_ranked"] == 2 and d["rows_generated"] == 3
    assert d["generated_chosen"] == pytest.approx(1 / 2)  # row a chose candidate 0 (generated), row b candidate 2
    # generated: good good / bad ok / ok ok -> (1 + 1 + 0 + 0.5 + 0.5 + 0.5) / 6
    assert d["true_reward"]["generated"] == pytest.approx(3.5 / 6)
    assert d["true_reward"]["chosen"] == pytest.approx((1.0 + 1.0) / 2)  # "good", "good"
    assert d["true_reward"]["rejected"] == pytest.approx(0.0)  # "bad", "bad"
    assert d["distinct_samples"] == pytest.approx((1 + 2 + 1) / 3)


def test_ranking_diagnostics_without_the_dataset_pair(tmp_path):
    """Candidates that are all generated (`candidates: generated`): every chosen index < n is generated."""
    run = RunLayout(tmp_path / "run")
    _write(run.generated(1), [{"prompt": "a", "prompt_id": "a", "chosen": _msg("a", "ok"), "rejected": _msg("a", "x"),
                               "reference_response": "bad", "responses": ["bad", "good"]}])
    _write(run.ranked(1), [_ranked_row("a", ["bad", "good"], [0, 1], 1, 0)])
    d = ranking_diagnostics(run, 1, good_reward)
    assert d["generated_chosen"] == 1.0 and d["true_reward"]["chosen"] == 1.0 and d["true_reward"]["rejected"] == 0.0


def test_rest_rows_one_per_kept_response(tmp_path):
    """ReST writes a ranked row per kept response: the kept share, and each prompt's candidates scored once."""
    run = RunLayout(tmp_path / "run")
    _write(run.generated(1), [
        {"prompt": "a", "prompt_id": "a", "chosen": _msg("a", "x"), "rejected": _msg("a", "y"),
         "reference_response": "good", "responses": ["good", "ok", "bad"]},
        {"prompt": "b", "prompt_id": "b", "chosen": _msg("b", "x"), "rejected": _msg("b", "y"),
         "reference_response": "bad", "responses": ["bad", "bad", "bad"]}])
    kept = [{**_ranked_row("a", ["good", "ok", "bad"], [1.0, 0.5, 0.0], i, 2), "num_generated": 3} for i in (0, 1)]
    _write(run.ranked(1), kept)
    _write(run.ranking_dropped(1), [{**_ranked_row("b", ["bad", "bad", "bad"], [0, 0, 0], 0, 2), "num_generated": 3,
                                     "reason": "below_threshold"}])
    d = ranking_diagnostics(run, 1, good_reward, update_rule="rest")
    assert d["kept"] == pytest.approx(2 / 6) and d["generated_chosen"] == 1.0
    assert d["true_reward"]["chosen"] == pytest.approx(0.75) and d["true_reward"]["rejected"] is None
    assert iteration_costs(run, 1)["ranker_calls"] == 2 * 3  # not 3 rows x 3: prompt a was scored once


def test_costs_by_hand(tiny_run):
    c = iteration_costs(tiny_run, 1)
    assert c == {"generated_responses": 3 * 2, "ranker_calls": 4 + 4 + 4, "training_tokens": 250}


def test_distinct_held_out_answers(tmp_path):
    run = RunLayout(tmp_path / "run")
    evaluations = {layout.BASE: ["1 2", "3", "x"], 1: ["1 2", " 4 ", "y"], 2: ["1 2 ", "3", "z"]}
    for name, answers in evaluations.items():
        _write(run.eval_answers(name), [{"prompt_id": f"p{i}", "answer": a} for i, a in enumerate(answers)])
    answers = held_out_answers(run, [1, 2])
    one, two = answer_diversity(answers, 1), answer_diversity(answers, 2)
    # per prompt over base..1: {1 2} {3, 4} {x, y} -> 1, 2, 2; over base..2: 1, 2, 3
    assert one["held_out_distinct"] == pytest.approx(5 / 3) and two["held_out_distinct"] == pytest.approx(2.0)
    # new at 1: prompts 1 and 2; new at 2: prompt 2 only ("3" was the base's answer; "1 2 " strips to "1 2")
    assert one["held_out_new"] == pytest.approx(2 / 3) and two["held_out_new"] == pytest.approx(1 / 3)


# ---- the KL estimator ----
def _tiny_pair(tmp_path, scale: float, conversation):
    """Two tiny Llamas over the tiny tokenizer (different seeds, embeddings scaled to make them peaked). Their
    generation config adds the first model's likeliest first token as a stop id, so that responses stop often
    (at random, these models would always run to max_new_tokens and the stop term would go untested)."""
    import torch

    from selm.chat import ConversationTokens
    from selm.standins.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    models = [build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64, seed=seed)
              for seed in (0, 1)]
    prompt = ConversationTokens(tokenizer).encode(conversation, add_generation_prompt=True)
    with torch.no_grad():
        for model in models:
            model.model.embed_tokens.weight.mul_(scale)  # tied: the output logits scale with it
        likeliest = models[0](torch.tensor([prompt])).logits[0, -1].topk(1).indices.tolist()
    paths = []
    for seed, model in enumerate(models):
        model.generation_config.eos_token_id = [tokenizer.eos_token_id] + likeliest
        path = tmp_path / f"model{seed}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def _exact_kl_two_tokens(p_path, q_path, conversation):
    """KL(P ‖ Q) and Var_P[log P/Q] over every response of at most 2 tokens, by enumeration: stop at once, one token
    then stop, or two tokens without a stop (cut at max_new_tokens = 2)."""
    import torch
    from transformers import AutoModelForCausalLM

    from selm.generation import Generator
    from selm.recipe.schema import GenerationArguments

    with Generator(p_path, GenerationArguments(generation_backend="hf", max_new_tokens=2)) as gen:
        prompt, stops = gen.encode([conversation])[0], list(gen.eos_ids)
    dists = []
    for path in (p_path, q_path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        with torch.no_grad():
            first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
            seconds = torch.stack([torch.softmax(model(torch.tensor([prompt + [t]])).logits[0, -1].double(), -1)
                                   for t in range(vocab)])
        is_stop = torch.zeros(vocab, dtype=torch.bool)
        is_stop[stops] = True
        probs = [first[is_stop].sum()]  # stop at once
        probs += list(first[~is_stop] * seconds[~is_stop][:, is_stop].sum(-1))  # one token, then stop
        probs += list((first[~is_stop, None] * seconds[~is_stop][:, ~is_stop]).flatten())  # two tokens, cut
        dists.append(torch.stack(probs))
    p, q = dists
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)
    log_ratio = torch.log(p) - torch.log(q)
    kl = float((p * log_ratio).sum())
    return kl, float((p * log_ratio ** 2).sum()) - kl ** 2


def test_kl_of_identical_models_is_zero(tmp_path):
    from selm.policy_kl import estimate_kl

    p_path, _ = _tiny_pair(tmp_path, 10.0, _msg("apple river"))
    result = estimate_kl(p_path, p_path, [_msg("apple river")], samples=50, max_new_tokens=4)
    assert result["kl"] == 0.0 and result["samples"] == 50


def test_kl_estimate_matches_exact_enumeration(tmp_path):
    from selm.policy_kl import estimate_kl

    conversation = _msg("apple river")
    p_path, q_path = _tiny_pair(tmp_path, 10.0, conversation)
    exact, variance = _exact_kl_two_tokens(p_path, q_path, conversation)
    assert exact > 0.1  # the two policies differ: the check below has something to find
    n = 4000
    result = estimate_kl(p_path, q_path, [conversation], samples=n, max_new_tokens=2, seed=3, batch_size=n)
    assert result["samples"] == n and 0.1 * n < result["truncated"] < 0.9 * n  # both kinds of response occur
    assert abs(result["kl"] - exact) < 4 * math.sqrt(variance / n), (result, exact, variance)
