"""Held-out evaluation: the stage, the PairRM formula, the implicit rewards of Fig. 4, comparisons, sweeps' ranking
and the answer files for AlpacaEval 2 and MT-Bench (CPU, tiny models, no hub)."""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from selm.recipe.parse import parse_recipe
from selm.errors import SELMError

from conftest import script_main


def run_script(name, argv) -> int:
    """scripts/<name>.py main(argv) in this process (the evaluate stage through selm.cli.run_stage); its exit code."""
    from selm.cli import run_stage
    from selm.evaluation import evaluate_stage

    main = (lambda a: run_stage("evaluate", evaluate_stage, a)) if name == "evaluate" else script_main(name)
    try:
        return main([str(a) for a in argv]) or 0
    except SystemExit as e:
        return e.code


def recipe_for(path, iteration="1", stage="evaluate", *overrides):
    return parse_recipe([str(path), "--iteration", str(iteration), *overrides], stage=stage)[0]


def save_model(path, seed):
    from selm.standins.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------- the stage
def test_evaluate_base_writes_answers_and_metrics_whose_mean_is_the_answers_mean(smoke_recipe, varied_model_dir, tmp_path):
    from selm.evaluation import evaluate_stage

    path = smoke_recipe(model_name_or_path=str(varied_model_dir), eval_max_samples=12, max_new_tokens=8)
    recipe = recipe_for(path, "base")
    assert recipe.base and recipe.iter_dir() == tmp_path / "run" / "base"
    metrics = evaluate_stage(recipe, progress=False)
    out = tmp_path / "run" / "base" / "eval"
    answers = pq.read_table(out / "answers.parquet").to_pylist()
    assert [a["prompt_id"] for a in answers] == [f"fixture-test-{i:04d}" for i in range(12)]
    from selm.standins.tiny import fixture_reward

    for a in answers:  # the oracle's score, recomputed from the stored answer
        assert a["reward"] == fixture_reward(a["prompt"], a["answer"])
        assert a["reference_reward"] == fixture_reward(a["prompt"], a["reference_answer"]) == 1.0
        assert a["win"] == (1.0 if a["reward"] > 1.0 else 0.5 if a["reward"] == 1.0 else 0.0)
    rewards = [a["reward"] for a in answers]
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["mean"] == pytest.approx(sum(rewards) / len(rewards)) and math.isfinite(metrics["sem"])
    assert metrics["win_rate"] == pytest.approx(sum(a["win"] for a in answers) / len(answers))
    assert metrics["model"] == str(varied_model_dir) and metrics["iteration"] == "base"
    assert metrics["prompts"]["rows"] == 12 and metrics["prompts"]["split"] == "test_prefs"
    assert metrics["ranker"]["oracle_reward"] == "selm.standins.tiny:fixture_reward"
    assert metrics["generation"]["greedy"] and metrics["generation"]["max_new_tokens"] == 8
    assert not (out / "answers.shards").exists() and not list(out.glob(".*"))
    mtime = (out / "metrics.json").stat().st_mtime_ns
    assert evaluate_stage(recipe, progress=False) == metrics  # finished: not redone
    assert (out / "metrics.json").stat().st_mtime_ns == mtime


def test_a_held_out_prompt_too_long_for_the_context_is_named_and_not_scored(smoke_recipe, tiny_model_dir, tmp_path):
    from selm.evaluation import evaluate_stage
    from selm.standins.tiny import fixture_splits

    held_out = fixture_splits(100, 6)["test_prefs"]
    long_question = " ".join(["seven plus seven"] * 200)  # ~600 tokens: over the tiny model's 512 with the answer
    held_out[3]["prompt"] = held_out[3]["chosen"][0]["content"] = held_out[3]["rejected"][0]["content"] = long_question
    data = tmp_path / "held-out"
    data.mkdir()
    (data / "test_prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    metrics = evaluate_stage(recipe_for(smoke_recipe(eval_dataset_name=str(data), max_new_tokens=8), "base"),
                             progress=False)
    answered = [r["prompt_id"] for i, r in enumerate(held_out) if i != 3]
    answers = pq.read_table(tmp_path / "run/base/eval/answers.parquet").to_pylist()
    assert [a["prompt_id"] for a in answers] == answered
    assert metrics["num_prompts"] == 5 and metrics["prompts"]["rows"] == 6
    (dropped,) = metrics["prompts"]["dropped_too_long"].items()
    assert dropped[0] == held_out[3]["prompt_id"] and "context of 512 tokens" in dropped[1]
    assert metrics["mean"] == pytest.approx(sum(a["reward"] for a in answers) / 5)


def test_held_out_questions_never_occur_in_the_training_split(fixture_dir):
    from selm.data import load_preference_data

    train = load_preference_data(str(fixture_dir), "train_prefs")
    test = load_preference_data(str(fixture_dir), "test_prefs")
    assert len(test) == 40 and not set(test["prompt"]) & set(train["prompt"])
    assert not set(test["prompt_id"]) & set(train["prompt_id"])


@pytest.mark.parametrize("overrides, message", [
    ({"eval_split": "validation"}, "no split 'validation' (looked for validation.jsonl"),
    ({"eval_max_samples": 41}, "'eval_max_samples' is 41 but the held-out split"),
    ({"eval_split": "train_prefs"}, "every held-out prompt of eval_split 'train_prefs' is also in the training data"),
])
def test_bad_held_out_settings_are_one_line_errors(smoke_recipe, tmp_path, overrides, message):
    from selm.evaluation import evaluate_stage

    recipe = recipe_for(smoke_recipe(**overrides), "base")
    with pytest.raises(SELMError, match=message.replace("(", r"\(")):
        evaluate_stage(recipe, progress=False)
    assert not (tmp_path / "run" / "base" / "eval" / "metrics.json").exists()


def test_a_single_data_file_has_no_held_out_split(smoke_recipe, fixture_file):
    from selm.evaluation import evaluate_stage

    recipe = recipe_for(smoke_recipe(dataset_name=str(fixture_file)), "base")
    with pytest.raises(SELMError, match="is a single file, which has no held-out split 'test_prefs'"):
        evaluate_stage(recipe, progress=False)


def test_an_iteration_that_was_not_trained_is_named(smoke_recipe, capsys):
    code = run_script("evaluate", [smoke_recipe(), "--iteration", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iter-2/model" in err[0] and "not trained yet" in err[0]


def test_iteration_base_is_only_for_evaluation_and_export(smoke_recipe):
    with pytest.raises(SELMError, match="--iteration base is for evaluate and export only"):
        parse_recipe([str(smoke_recipe()), "--iteration", "base"], stage="train")


# ---------------------------------------------------------------- PairRM: s(y) - s(y*), both orders
def test_pairrm_reward_is_antisymmetric_and_zero_against_itself(tiny_pairrm_dir):
    from selm.evaluation import score_against_reference
    from selm.scorers import PairRMScorer
    from selm.standins.tiny import fixture_rows

    rows = fixture_rows(6)
    prompts = [r["chosen"][:-1] for r in rows]
    y = [r["rejected"][-1]["content"] for r in rows]
    y_star = [r["chosen"][-1]["content"] for r in rows]
    scorer = PairRMScorer(str(tiny_pairrm_dir), batch_size=4, device="cpu")
    d, ref, wins = score_against_reference(scorer, "pairrm", prompts, y, y_star)
    swapped, _, swapped_wins = score_against_reference(scorer, "pairrm", prompts, y_star, y)
    same, _, same_wins = score_against_reference(scorer, "pairrm", prompts, y_star, y_star)
    assert ref == [0.0] * 6 and max(abs(v) for v in d) > 1e-3  # the random ranker still has opinions
    assert swapped == pytest.approx([-v for v in d], abs=1e-5)
    assert same == [0.0] * 6 and same_wins == [0.5] * 6  # both orders see identical inputs: exactly 0, a tie
    assert wins == [1.0 if v > 0 else 0.5 if v == 0 else 0.0 for v in d]
    assert [a + b for a, b in zip(wins, swapped_wins)] == pytest.approx([1.0] * 6)
    # Independently, through llm-blender's one-order comparison: d = l(y > y*) - l(y* > y).
    from selm.scorers import pairrm_source

    sources = [pairrm_source(p) for p in prompts]
    ab = scorer.blender.compare(sources, y, y_star, mode="[A,B]", return_logits=True, disable_tqdm=True)
    ba = scorer.blender.compare(sources, y_star, y, mode="[A,B]", return_logits=True, disable_tqdm=True)
    assert d == pytest.approx([float(a - b) for a, b in zip(ab, ba)], abs=1e-4)


# ---------------------------------------------------------------- Fig. 4: implicit rewards
def independent_logp(model, tokenizer, prompt, completion):
    """log p(completion | prompt) summed over its tokens: chat template, one plain forward, log_softmax."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(full[1:])[:, None])[:, 0]
    return logp[len(prompt_ids) - 1:].sum().item()


def test_implicit_rewards_match_an_independent_forward_computation(smoke_recipe, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selm.evaluation import implicit_rewards
    from selm.standins.tiny import fixture_splits

    path = smoke_recipe(eval_max_samples=6, beta=0.3, max_length=256, max_prompt_length=None)
    save_model(tmp_path / "run" / "iter-1" / "model", seed=5)  # the iteration's model; its reference: the base
    table = implicit_rewards(recipe_for(path, "1")).to_pydict()
    rows = fixture_splits(100, 40)["test_prefs"][:6]
    assert table["prompt_id"] == [r["prompt_id"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "iter-1" / "model")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for i, row in enumerate(rows):
        for group in ("chosen", "rejected"):
            prompt, completion = row[group][:-1], row[group][-1:]
            want = 0.3 * (independent_logp(policy, tokenizer, prompt, completion)
                          - independent_logp(reference, tokenizer, prompt, completion))
            assert table[f"{group}_reward"][i] == pytest.approx(want, abs=1e-4)
    assert (tmp_path / "run" / "iter-1" / "eval" / "implicit_rewards.parquet").exists()  # cached for the next call


def test_fig4_log_probs_use_one_device_when_the_process_sees_eight_gpus(smoke_recipe, tiny_model_dir, monkeypatch):
    """`make compare` runs Fig. 4's pass in a plain process: with 8 visible GPUs Trainer would pick nn.DataParallel,
    which trl refuses after loading the model. The trainer must be given one device. (8 GPUs are simulated: the
    trainer itself cannot then run here, so a stand-in records what it was given.)"""
    import datasets

    from selm import evaluation, trainer

    given = {}

    class RecordingTrainer:
        def __init__(self, model, ref_model=None, args=None, train_dataset=None, processing_class=None):
            given.update(n_gpu=args.n_gpu, device=str(args.device), precompute=args.precompute_ref_log_probs)
            self.train_dataset = {"row": [], "prompt_id": [], "ref_chosen_logps": [], "ref_rejected_logps": []}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(trainer, "SELMTrainer", RecordingTrainer)
    recipe = recipe_for(smoke_recipe(use_cpu=False), "1")
    assert recipe.training_config(output_dir="unused", report_to="none").n_gpu == 8  # what Trainer would wrap
    evaluation.completion_logps(recipe, str(tiny_model_dir), datasets.Dataset.from_list([]))
    assert given == {"n_gpu": 1, "device": "cuda:0", "precompute": True}


# ---------------------------------------------------------------- answers for the public judges
def test_alpaca_eval_export_keeps_the_question_order_and_every_field(smoke_recipe, varied_model_dir, tmp_path):
    from selm.export import export_answers

    questions = tmp_path / "alpaca.json"
    questions.write_text(json.dumps([{"instruction": "What is 3 + 4?", "dataset": "helpful_base"},
                                     {"instruction": "Reverse the word stone."},
                                     {"instruction": "What is 5 * 6?", "dataset": "oasst"}]))
    recipe = recipe_for(smoke_recipe(model_name_or_path=str(varied_model_dir), max_new_tokens=6), "base", "export")
    out = tmp_path / "out" / "model_outputs.json"
    assert export_answers(recipe, "alpaca_eval", out, str(questions)) == 3
    records = json.loads(out.read_text())
    assert [r["instruction"] for r in records] == ["What is 3 + 4?", "Reverse the word stone.", "What is 5 * 6?"]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in records)
    assert [r["dataset"] for r in records] == ["helpful_base", "alpaca", "oasst"]
    assert all(r["generator"] == "run-base" and isinstance(r["output"], str) and r["output"] for r in records)
    # greedy and through the model's chat template: the same answers as the generation code gives
    from selm.recipe.schema import GenerationArguments
    from selm.generation import generate_responses

    expected = generate_responses(str(varied_model_dir), [[{"role": "user", "content": r["instruction"]}] for r in records],
                                  GenerationArguments(generation_backend="hf", max_new_tokens=6), progress=False)
    assert [r["output"] for r in records] == [e[0] for e in expected]


def test_mt_bench_export_answers_two_turns_with_the_first_answer_in_context(smoke_recipe, varied_model_dir, tmp_path):
    from selm.recipe.schema import GenerationArguments
    from selm.export import export_answers
    from selm.generation import generate_responses

    questions = tmp_path / "question.jsonl"
    rows = [{"question_id": 81 + i, "category": "math", "turns": [f"What is {i} + 2?", "And times 3?"]} for i in range(3)]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_for(smoke_recipe(model_name_or_path=str(varied_model_dir), max_new_tokens=6), "base", "export")
    out = tmp_path / "answers.jsonl"
    export_answers(recipe, "mt_bench", out, str(questions), model_id="my-model")
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82, 83]
    assert all(set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} for a in answers)
    assert all(a["model_id"] == "my-model" and len(a["choices"]) == 1 and a["choices"][0]["index"] == 0 for a in answers)
    assert len({a["answer_id"] for a in answers}) == 3
    settings = GenerationArguments(generation_backend="hf", max_new_tokens=6)
    for row, answer in zip(rows, answers):
        first, second = answer["choices"][0]["turns"]
        conversation = [{"role": "user", "content": row["turns"][0]}]
        assert first == generate_responses(str(varied_model_dir), [conversation], settings, progress=False)[0][0]
        conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": row["turns"][1]}]
        assert second == generate_responses(str(varied_model_dir), [conversation], settings, progress=False)[0][0]


@pytest.mark.parametrize("fmt, content, message", [
    ("mt_bench", '{"question_id": 81, "category": "x", "turns": ["only one"]}\n', "'turns' must be two non-empty strings"),
    ("mt_bench", '{"question_id": 81, "turns": ["a", "b"]}\n', "question 0: missing 'category'"),
    ("mt_bench", '{"question_id": 81, "category": "x", "turns": ["a", "b"]}\n{"question_id": 81, "category": "x", '
                 '"turns": ["a", "b"]}\n', "question_id 81 appears twice"),
    ("mt_bench", '{"question_id": 81,\n', "line 1 is not valid JSON"),
    ("alpaca_eval", '[{"instruction": "ok"}, {"output": "no instruction"}]', "question 1: needs a non-empty string 'instruction'"),
])
def test_bad_question_files_are_named_and_nothing_is_written(smoke_recipe, tmp_path, capsys, fmt, content, message):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(content)
    out = tmp_path / "answers.out"
    code = run_script("export_answers", [smoke_recipe(), "--iteration", "base", "--format", fmt,
                                         "--questions", questions, "--output", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and str(questions) in err[0]
    assert not out.exists() and not list(tmp_path.glob(".answers.out*"))


@pytest.mark.parametrize("hub", ["offline", "script-based"])
def test_unloadable_alpaca_eval_hub_dataset_is_one_line_naming_it_and_the_option(smoke_recipe, tmp_path, capsys,
                                                                                  monkeypatch, hub):
    """Offline, datasets raises ConnectionError; where it finds the dataset's loading script (tatsu-lab/alpaca_eval
    is script-based), datasets >= 4 raises RuntimeError. Here a local script at the same path triggers the real one."""
    recipe = smoke_recipe()
    if hub == "script-based":
        script = tmp_path / "tatsu-lab" / "alpaca_eval" / "alpaca_eval.py"
        script.parent.mkdir(parents=True)
        script.write_text("import datasets\n")
        monkeypatch.chdir(tmp_path)
    code = run_script("export_answers", [recipe, "--iteration", "base", "--format", "alpaca_eval",
                                         "--output", tmp_path / "model_outputs.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "tatsu-lab/alpaca_eval" in err[0] and "--questions PATH" in err[0]
    assert ("RuntimeError" if hub == "script-based" else "ConnectionError") in err[0]
    assert not (tmp_path / "model_outputs.json").exists()


def test_export_without_questions_for_mt_bench_says_what_to_pass(smoke_recipe, tmp_path, capsys):
    code = run_script("export_answers", [smoke_recipe(), "--iteration", "base", "--format", "mt_bench",
                                         "--output", tmp_path / "a.jsonl"])
    assert code == 2 and "--format mt_bench needs --questions PATH" in capsys.readouterr().err
