"""The demo's sorting task: exact graded reward, seeded data in the UltraFeedback schema, a cached SFT base model."""

import json
from fractions import Fraction

import pytest

from selm.errors import SELMError
from selm.standins.sorting_task import read_split, reward, task_splits, tokenizer_corpus, write_preference_data

PROMPT = [{"role": "user", "content": "Sort in ascending order: 42 7 93 15 7 60"}]  # sorted: 7 7 15 42 60 93


def test_reward_grades_answers_by_how_wrong_they_are():
    # Expected values by hand: longest common subsequence with 7 7 15 42 60 93 over the longer length.
    graded = [
        ("7 7 15 42 60 93", Fraction(6, 6)),
        ("7 7 15 42 60 93 93", Fraction(6, 7)),  # one extra number
        ("7 7 15 42 93 60", Fraction(5, 6)),  # one neighbour swap
        ("7 15 7 42 93 60", Fraction(4, 6)),  # two swaps
        ("15 7 42 7 93 60", Fraction(3, 6)),  # three swaps
        ("93 60 42 15 7 7", Fraction(2, 6)),  # reversed: only the two 7s keep their order
        ("7 8", Fraction(1, 6)),
        ("1 2 3 4 5 6", Fraction(0)),  # well formed, no right number
    ]
    for answer, expected in graded:
        assert reward(PROMPT, answer) == pytest.approx(float(expected)), answer
    values = [reward(PROMPT, a) for a, _ in graded]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)  # strictly ordered
    assert reward(PROMPT, "  7 7 15\n42 60 93 ") == 1.0  # whitespace is whitespace
    assert reward(PROMPT, "7 7 15 42") == pytest.approx(4 / 6)  # two numbers missing
    assert reward(PROMPT, "7 7 15 42 60 93 1 2") == pytest.approx(6 / 8)  # two numbers too many


@pytest.mark.parametrize("answer", ["", "   ", "seven", "7, 7, 15, 42, 60, 93", "7 7 15 42 60 93.", "-7 7 15"])
def test_malformed_answers_score_zero(answer):
    assert reward(PROMPT, answer) == 0.0


def test_reward_refuses_a_prompt_of_another_task():
    with pytest.raises(SELMError, match="not a sorting prompt: 'What is 2 \\+ 3\\?'"):
        reward([{"role": "user", "content": "What is 2 + 3?"}], "5")


def _prompts(rows):
    return [r["prompt"] for r in rows]


def test_data_is_seeded_disjoint_and_imperfect_like_ultrafeedback():
    a, b = task_splits(5, 400, 300, 200, 50), task_splits(5, 400, 300, 200, 50)
    assert a == b and task_splits(6, 400, 300, 200, 50)["train_prefs"] != a["train_prefs"]
    held_out = set(_prompts(a["test_prefs"]))
    others = (set(_prompts(a["train_prefs"])) | {r["prompt"][0]["content"] for r in a["sft"]}
              | {v[0]["content"] for v in a["validation"]})
    assert len(held_out) == 300 and not held_out & others
    assert len({r["prompt_id"] for r in a["train_prefs"]}) == 400
    # train_prefs is drawn last: a longer train split keeps the same first rows, and the base's prompts are unchanged
    longer = task_splits(5, 600, 300, 200, 50)
    assert longer["train_prefs"][:400] == a["train_prefs"] and longer["sft"] == a["sft"]

    def true(row, column):
        return reward(row[column][:-1], row[column][-1]["content"])

    train = a["train_prefs"]
    better = sum(true(r, "chosen") > true(r, "rejected") for r in train) / len(train)
    worse = sum(true(r, "chosen") < true(r, "rejected") for r in train) / len(train)
    perfect = sum(true(r, "chosen") == 1 for r in train) / len(train)
    assert 0.6 < better < 0.95 and worse > 0.03 and 0.05 < perfect < 0.35
    assert all(r["score_chosen"] >= r["score_rejected"] for r in train)
    assert all(true(r, "chosen") == 1 and true(r, "rejected") < 1 for r in a["test_prefs"])  # reference answers
    assert all(reward(r["prompt"], r["completion"][0]["content"]) == 1 for r in a["sft"])


def test_written_splits_load_with_the_pipeline_schema_check(tmp_path):
    from selm.data import load_preference_data

    splits = task_splits(1, 30, 20)
    write_preference_data(tmp_path / "data", splits, {"seed": 1})
    for split, rows in (("train_prefs", 30), ("test_prefs", 20)):
        dataset = load_preference_data(str(tmp_path / "data" / f"{split}.jsonl"))  # validates the schema
        assert len(dataset) == rows and dataset[0]["messages"] == dataset[0]["chosen"]
        assert read_split(tmp_path / "data", split) == splits[split]


def test_tokenizer_has_one_token_per_number_and_trl_trains_the_template_text():
    from selm.standins.tiny import train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(), 600)
    for n in range(100):
        assert len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1, n
        assert len(tok(f" {n}", add_special_tokens=False)["input_ids"]) == 1, n
    row = task_splits(2, 0, 0, 1)["sft"][0]
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    assert full == prompt + row["completion"][0]["content"] + "</s>\n"  # the newline after EOS is trained on too


def test_trl_sft_trains_the_completion_dpo_scores(tmp_path):
    """The SFT base learns exactly the tokens DPO later scores as the completion: answer, EOS and the newline."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from selm.standins.tiny import build_model, train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(), 600)
    row = task_splits(2, 0, 0, 1)["sft"][0]
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to="none")
    trainer = SFTTrainer(model=build_model(tok, hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64),
                         args=args, train_dataset=Dataset.from_list([row]), processing_class=tok)
    example = trainer.train_dataset[0]
    completion = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]  # trained on
    assert tok.decode(completion) == row["completion"][0]["content"] + "</s>\n"
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    assert tok.decode(example["input_ids"][:len(example["input_ids"]) - len(completion)]) == prompt


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """Two builds of one tiny configuration (the SFT stop never triggers: all 6 steps run, with 2 checks)."""
    from selm.standins.demo_task import DemoTaskSettings, build_demo_task

    settings = DemoTaskSettings(seed=3, train_rows=24, test_rows=12, hidden_size=64, num_heads=1, num_layers=1,
                                intermediate_size=64, sft_max_steps=6, sft_batch_size=4, sft_target_reward=0.99,
                                sft_check_every=3, validation_prompts=8)
    root = tmp_path_factory.mktemp("demo")
    results = [build_demo_task(settings, root / f"data{i}", root / f"base{i}", log=lambda m: None) for i in (0, 1)]
    return settings, root, results


def test_base_build_is_deterministic_and_an_ordinary_model_directory(tiny_build):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    settings, root, results = tiny_build
    assert all(r["data"] and r["model"] for r in results)
    a, b = load_file(root / "base0/model.safetensors"), load_file(root / "base1/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("train_prefs.jsonl", "test_prefs.jsonl"):
        assert (root / "data0" / name).read_text() == (root / "data1" / name).read_text()
    log = json.loads((root / "base0/sft_log.json").read_text())
    assert log["steps"] == 6 and [step for step, _ in log["checks"]] == [3, 6]

    tok = AutoTokenizer.from_pretrained(root / "base0")
    model = AutoModelForCausalLM.from_pretrained(root / "base0")
    assert tok.chat_template and model.config.vocab_size == len(tok)
    assert GenerationConfig.from_pretrained(root / "base0").eos_token_id == [tok.eos_token_id]
    from selm.standins.tiny import build_model

    untrained = build_model(tok, hidden_size=64, num_layers=1, num_heads=1, intermediate_size=64,
                            max_position_embeddings=128, seed=3).state_dict()
    assert not torch.equal(untrained["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # SFT moved it


def test_build_is_skipped_when_settings_match_and_redone_when_they_change(tiny_build):
    import dataclasses

    from selm.standins.demo_task import build_demo_task, is_built

    settings, root, _ = tiny_build
    again = build_demo_task(settings, root / "data0", root / "base0", log=lambda m: None)
    assert not again["data"] and not again["model"]
    more_rows = dataclasses.replace(settings, train_rows=30)  # data only: the base does not depend on it
    assert build_demo_task(more_rows, root / "data0", root / "base0", log=lambda m: None) == {
        "data": True, "model": False, "seconds": pytest.approx(0, abs=60)}
    assert len(read_split(root / "data0", "train_prefs")) == 30
    assert not is_built(root / "base0", dataclasses.replace(settings, sft_learning_rate=5e-4).model_settings())


def test_sft_stops_at_the_first_check_that_reaches_the_target(tmp_path, monkeypatch):
    from selm.standins import demo_task

    scores = iter([[0.2], [0.7], [0.9]])
    monkeypatch.setattr(demo_task, "greedy_rewards", lambda path, prompts: next(scores))
    settings = demo_task.DemoTaskSettings(seed=4, train_rows=8, test_rows=4, hidden_size=64, num_heads=1,
                                          num_layers=1, intermediate_size=64, sft_max_steps=12, sft_batch_size=2,
                                          sft_target_reward=0.5, sft_check_every=2, validation_prompts=2)
    demo_task.build_demo_task(settings, tmp_path / "data", tmp_path / "base", log=lambda m: None)
    log = json.loads((tmp_path / "base/sft_log.json").read_text())
    assert log["steps"] == 4 and log["checks"] == [[2, 0.2], [4, 0.7]] and log["validation_reward"] == 0.7
