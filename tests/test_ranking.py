"""Ranking stage: llm-blender PairRM (real code path, tiny local checkpoint), reward model, oracle, update rules,
ties, row accounting, output schemas and scripts/rank.py end to end."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from selm.cli import run_stage
from selm.errors import SELMError
from selm.ranking import output_schema, preference_order, rank_rows, select_pair
from selm.scorers import OracleScorer, PairRMScorer, RewardModelScorer, load_function, pairrm_source
from selm.standins.tiny import fixture_rows


@pytest.fixture(scope="session")
def blender(tiny_pairrm_dir):
    from selm.compat.llm_blender import load_pairrm

    return load_pairrm(str(tiny_pairrm_dir), device="cpu")


def generated_rows(num_rows=12, responses=None):
    """Fixture rows as the generation stage writes them: reference_response = responses[0]."""
    rows = fixture_rows(num_rows)
    for i, row in enumerate(rows):
        answers = responses(i, row) if responses else [row["chosen"][-1]["content"]]
        row["reference_response"], row["responses"] = answers[0], answers
    return rows


class TableScorer:
    """Scores given per row, to pin the decision rules to exact numbers."""

    def __init__(self, table):
        self.table = table

    def __call__(self, prompts, candidates):
        assert [len(c) for c in candidates] == [len(s) for s in self.table]
        return self.table


# ---------------------------------------------------------------------------------------------------------------
# llm-blender under transformers 5
# ---------------------------------------------------------------------------------------------------------------
def test_shims_are_idempotent_and_batch_encode_plus_matches_call(tiny_rm_dir):
    import transformers.utils.hub
    from transformers import AutoTokenizer

    from selm.compat.llm_blender import apply_shims, import_llm_blender

    apply_shims()
    first = transformers.utils.hub.TRANSFORMERS_CACHE
    apply_shims()
    assert transformers.utils.hub.TRANSFORMERS_CACHE == first and isinstance(first, str)
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_dir)
    texts = ["What is 2 + 3?", "Reverse the word apple."]
    encoded = tokenizer.batch_encode_plus(texts, padding="max_length", max_length=16, truncation=True)
    assert encoded["input_ids"] == tokenizer(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    assert hasattr(import_llm_blender(), "Blender")


def test_pairrm_rank_and_compare_rank_one_is_best(blender, tiny_pairrm_dir):
    inputs = ["What is 2 + 3?", "Reverse the word apple.", "How many times does the letter p appear in apple?"]
    candidates = [
        ["2 + 3 = 5.", "2 + 3 = 6.", "The answer is five, I think."],
        ["The word apple reversed is elppa.", "elppa", "pplea"],
        ["The letter p appears 2 times in apple.", "three", "The letter p appears 3 times in apple."],
    ]
    ranks = np.asarray(blender.rank(inputs, candidates, batch_size=4))
    scores = np.asarray(blender.rank(inputs, candidates, return_scores=True, batch_size=4))
    assert ranks.shape == scores.shape == (3, 3)
    assert len({tuple(row) for row in scores.round(6)}) == 3 and all(len(set(row)) == 3 for row in scores.round(6))
    # llm-blender's convention: rank 1 = best = highest score.
    assert (ranks.argmin(axis=1) == scores.argmax(axis=1)).all()
    assert (ranks.argmax(axis=1) == scores.argmin(axis=1)).all()
    assert sorted(ranks[0].tolist()) == [1, 2, 3]

    best = [c[i] for c, i in zip(candidates, scores.argmax(axis=1))]
    worst = [c[i] for c, i in zip(candidates, scores.argmin(axis=1))]
    assert list(blender.compare(inputs, best, worst)) == [True] * 3  # True: A better than B
    assert list(blender.compare(inputs, worst, best)) == [False] * 3

    # Our scorer gives llm-blender's scores, and best_worst turns rank 1 into chosen and the last rank into rejected.
    scorer = PairRMScorer(str(tiny_pairrm_dir), batch_size=4, device="cpu")
    ours = scorer([[{"role": "user", "content": x}] for x in inputs], candidates)
    np.testing.assert_allclose(ours, scores, rtol=1e-5, atol=1e-6)
    for row_ranks, row_scores in zip(ranks, ours):
        chosen, rejected = select_pair(row_scores, 1, "best_worst")
        assert row_ranks[chosen] == 1 and row_ranks[rejected] == 3


def test_pairrm_scorer_handles_multi_turn_markers_and_mixed_candidate_counts(tiny_pairrm_dir, blender):
    scorer = PairRMScorer(str(tiny_pairrm_dir), batch_size=3, device="cpu")
    scorer.blender = blender  # the session's loaded ranker; loading is covered above
    rows = fixture_rows(10)
    prompts = [r["chosen"][:-1] for r in rows]
    assert any(len(p) > 2 for p in prompts)  # system messages and earlier turns are in there
    long_turns = [{"role": "user", "content": "What is 1 + 1? " * 200}, {"role": "assistant", "content": "2"},
                  {"role": "user", "content": "What is 2 + 2?"}]
    candidates = [[r["chosen"][-1]["content"], "<|candidate|> sneaky <|source|>"] + ([""] if i % 2 else [])
                  for i, r in enumerate(rows)]
    scores = scorer(prompts + [long_turns], candidates + [["4", "5"]])
    assert [len(s) for s in scores] == [len(c) for c in candidates] + [2]
    assert all(math.isfinite(v) for row in scores for v in row)
    # A conversation over the source limit is cut from the left: the question being answered survives.
    fitted = scorer._fit_source(pairrm_source(long_turns))
    assert fitted.endswith("What is 2 + 2?") and len(fitted) < len(pairrm_source(long_turns))


def test_load_pairrm_from_a_hub_id_in_the_hub_cache(tiny_pairrm_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from selm.compat.llm_blender import load_pairrm

    repo = tmp_path / "models--selm-test--tiny-pairrm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_pairrm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_pairrm("selm-test/tiny-pairrm", device="cpu")
    assert str(loaded.ranker_config.load_checkpoint).startswith(str(repo / "snapshots" / commit))
    scores = loaded.rank(["What is 2 + 3?"], [["5", "6"]], return_scores=True)
    assert scores.shape == (1, 2)
    with pytest.raises(SELMError, match="selm-test/absent"):
        load_pairrm("selm-test/absent", device="cpu")  # hub is off in tests: one line naming the model


@pytest.mark.parametrize("dtype, fp16", [(None, False), ("float16", True)])
def test_pairrm_dtype_on_a_gpu_is_what_the_recipe_says(dtype, fp16, tiny_pairrm_dir, monkeypatch):
    """llm-blender halves PairRM on CUDA unless given fp16=False (its RankerConfig default is True): the loader must
    always be told, float32 unless the recipe's pairrm_dtype says float16."""
    import torch
    from llm_blender.blender.blender import Blender
    from llm_blender.pair_ranker.config import RankerConfig

    from selm.recipe.schema import RankingArguments
    from selm.scorers import build_scorer

    given, real_load = [], Blender.loadranker

    def record_then_load_on_cpu(self, path, device=None, **kwargs):  # a CUDA device is only named here
        given.append((device, kwargs.get("fp16", RankerConfig().fp16)))
        return real_load(self, path, device="cpu", **kwargs)

    monkeypatch.setattr(Blender, "loadranker", record_then_load_on_cpu)
    ranking = RankingArguments(ranker="pairrm", ranker_model_name_or_path=str(tiny_pairrm_dir),
                               **({"pairrm_dtype": dtype} if dtype else {}))
    scorer = build_scorer(ranking, device="cuda", num_workers=1)
    assert given == [("cuda", fp16)]  # llm-blender: `if device in ["cuda", "mps"] and fp16: half()`
    assert {p.dtype for p in scorer.blender.ranker.parameters()} == {torch.float32}  # on CPU: float32 either way


def test_load_pairrm_bad_directories(tiny_pairrm_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from selm.compat.llm_blender import load_pairrm

    with pytest.raises(SELMError, match="not found: .*no-such-ranker"):
        load_pairrm(str(tmp_path / "no-such-ranker"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SELMError, match="no config.json"):
        load_pairrm(str(empty))
    # A .bin checkpoint is loaded by llm-blender with strict=False: a missing weight must still be an error.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pairrm_dir, broken)
    state = load_file(broken / "model.safetensors")
    (broken / "model.safetensors").unlink()
    del state["head_layer.1.weight"]
    torch.save(state, broken / "pytorch_model.bin")
    with pytest.raises(SELMError, match="missing .*head_layer.1.weight"):
        load_pairrm(str(broken), device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Reward model and oracle
# ---------------------------------------------------------------------------------------------------------------
def test_reward_model_batched_scores_match_one_by_one(tiny_rm_dir):
    rows = fixture_rows(6)
    prompts = [r["chosen"][:-1] for r in rows]
    candidates = [[r["chosen"][-1]["content"], r["rejected"][-1]["content"], "", "a much longer answer " * 5]
                  for r in rows]
    batched = RewardModelScorer(str(tiny_rm_dir), batch_size=8, max_length=512, device="cpu")
    single = RewardModelScorer(str(tiny_rm_dir), batch_size=1, max_length=512, device="cpu")
    a, b = np.array(batched(prompts, candidates)), np.array(single(prompts, candidates))
    assert a.shape == (6, 4)
    np.testing.assert_allclose(a, b, atol=1e-4)  # padding and pooling do not change a score
    assert np.unique(a.round(5)).size > 6  # the scores depend on the text
    # The chat template is applied once: BOS/role markers are not doubled.
    text = batched.tokenizer.apply_chat_template(prompts[0] + [{"role": "assistant", "content": "x"}], tokenize=False)
    assert batched.encode(prompts[0], "x") == batched.tokenizer(text, add_special_tokens=False)["input_ids"]

    short = RewardModelScorer(str(tiny_rm_dir), batch_size=4, max_length=16, device="cpu")
    short(prompts, candidates)
    assert short.truncated > 0


# slow: two worker processes, each loading torch and the model (23 s here, on shared cores)
@pytest.mark.slow
def test_sharded_scorer_matches_one_process(tiny_rm_dir):
    """The multi-GPU path (one process per shard, merged in order), run here with 2 CPU processes."""
    from selm.recipe.schema import RankingArguments
    from selm.scorers import ShardedScorer, build_scorer

    ranking = RankingArguments(ranker="reward_model", ranker_model_name_or_path=str(tiny_rm_dir),
                               ranker_batch_size=4, ranker_max_length=24)
    rows = fixture_rows(5)
    prompts = [r["chosen"][:-1] for r in rows]
    candidates = [[r["chosen"][-1]["content"], r["rejected"][-1]["content"], str(i)] for i, r in enumerate(rows)]
    sharded = build_scorer(ranking, num_workers=2)
    assert isinstance(sharded, ShardedScorer)
    single = build_scorer(ranking, device="cpu", num_workers=1)
    np.testing.assert_allclose(sharded(prompts, candidates), single(prompts, candidates), atol=1e-4)
    assert sharded.truncated == single.truncated > 0


def test_reward_model_without_chat_template_is_refused(tiny_rm_dir, tmp_path):
    copy = tmp_path / "rm"
    shutil.copytree(tiny_rm_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in copy.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(SELMError, match="no chat template"):
        RewardModelScorer(str(copy), device="cpu")
    with pytest.raises(SELMError, match="directory not found: .*no-rm"):
        RewardModelScorer(str(tmp_path / "no-rm"), device="cpu")
    with pytest.raises(SELMError, match="'selm-test/absent-rm' could not be loaded"):
        RewardModelScorer("selm-test/absent-rm", device="cpu")  # the hub is off in tests


def test_oracle_scorer_and_function_spec_errors():
    rows = fixture_rows(8)
    scorer = OracleScorer("selm.standins.tiny:fixture_reward")
    scores = scorer([r["chosen"][:-1] for r in rows], [[r["chosen"][-1]["content"], r["rejected"][-1]["content"], ""]
                                                      for r in rows])
    assert scores == [[1.0, 0.0, 0.0]] * 8
    with pytest.raises(SELMError, match="expected 'module:function'"):
        load_function("selm.standins.tiny.fixture_reward")
    with pytest.raises(SELMError, match="module 'selm.nope' not found"):
        load_function("selm.nope:f")
    with pytest.raises(SELMError, match="no function 'nope'"):
        load_function("selm.standins.tiny:nope")


def test_oracle_must_return_a_number(tmp_path, monkeypatch):
    (tmp_path / "bad_oracle.py").write_text("def reward(prompt, response):\n    return 'good'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SELMError, match="returned 'good' .*row 0, candidate 0"):
        OracleScorer("bad_oracle:reward")([[{"role": "user", "content": "q"}]], [["a", "b", "c"]])


# ---------------------------------------------------------------------------------------------------------------
# Update rules and ties
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scores, expected", [
    ([0.1, 0.9, 0.5], (1, 0)),       # generated is worst
    ([0.9, 0.5, 0.1], (0, 2)),       # generated is best
    ([1.0, 1.0, 0.0], (0, 2)),       # tie at the top: the lower index (generated) ranks higher
    ([0.0, 1.0, 0.0], (1, 2)),       # tie at the bottom: the higher index (original rejected) is worst
    ([0.5, 0.5, 0.5], (0, 2)),       # full tie: still deterministic
    ([0.2, 0.7, 0.9, 0.1], (2, 3)),  # two generated responses: original chosen index 2, rejected 3
])
def test_best_worst(scores, expected):
    assert select_pair(scores, len(scores) - 2, "best_worst") == expected


def test_preference_order_breaks_ties_by_index():
    assert preference_order([0.5, 0.9, 0.5, 0.9, 0.1]) == [1, 3, 0, 2, 4]


@pytest.mark.parametrize("scores, expected", [
    ([0.9, 0.5, 0.1], (0, 2)),  # y_ref better than y_w: it replaces the chosen
    ([0.3, 0.5, 0.1], (1, 0)),  # y_ref worse than y_w: it replaces the rejected (even though better than y_l)
    ([0.0, 0.5, 0.1], (1, 0)),
    ([0.5, 0.5, 0.1], (0, 2)),  # tie with y_w: y_ref wins by index
    ([0.1, 0.99, 0.5, 0.2], (2, 0)),  # only y_ref (candidate 0) takes part: response 1, the best, is ignored
])
def test_replace(scores, expected):
    assert select_pair(scores, len(scores) - 2, "replace") == expected


def test_original_keeps_the_dataset_pair():
    assert select_pair([9.0, 0.0, 5.0], 1, "original") == (1, 2)
    assert select_pair([9.0, 8.0, 0.0, 5.0], 2, "original") == (2, 3)


def test_rank_rows_accounting_ties_and_multi_turn():
    def answers(i, row):
        return ["   "] if i % 4 == 1 else [f"answer {i}"]

    rows = generated_rows(12, answers)
    table = [[0.5, 0.5, 0.5] if i % 3 == 0 else [float(i), 5.0, 1.0] for i in range(12)]
    kept, dropped, report = rank_rows(rows, TableScorer(table), "best_worst", "drop")
    assert [r["prompt_id"] for r in dropped] == [rows[i]["prompt_id"] for i in (0, 3, 6, 9)]
    assert {r["reason"] for r in dropped} == {"tie"}
    assert sorted(r["prompt_id"] for r in kept + dropped) == sorted(r["prompt_id"] for r in rows)
    assert report["rows_in"] == 12 and report["rows_out"] == 8 and report["dropped_by_reason"] == {"tie": 4}
    assert report["rows_in"] == report["rows_out"] + report["rows_dropped"]
    # kept rows i = 1,2,4,5,7,8,10,11: generated score i vs chosen 5 and rejected 1
    assert report["generated_chosen"] == 5        # i = 5 (ties the chosen, wins by index), 7, 8, 10, 11
    assert report["generated_rejected"] == 0      # never below 1 (i = 1 ties rejected: rejected is lower-ranked)
    assert report["generated_neither"] == 3
    assert report["empty_generations"] == 3       # i = 1, 5, 9 are whitespace
    assert report["rows_with_empty_generation"] == 3
    assert report["generated_chosen"] + report["generated_neither"] + report["generated_rejected"] == len(kept)
    for row in kept:
        source = next(r for r in rows if r["prompt_id"] == row["prompt_id"])
        assert row["chosen"][:-1] == source["chosen"][:-1] == row["rejected"][:-1]  # multi-turn prompt intact
        assert row["chosen"][-1] == {"role": "assistant", "content": row["candidates"][row["chosen_index"]]}
        assert row["candidates"] == source["responses"] + [source["chosen"][-1]["content"],
                                                           source["rejected"][-1]["content"]]
    assert any(len(r["chosen"]) > 2 for r in kept)

    kept_all, dropped_none, report_keep = rank_rows(rows, TableScorer(table), "best_worst", "keep")
    assert len(kept_all) == 12 and not dropped_none and report_keep["rows_dropped"] == 0
    assert report_keep["ties"] == report["ties"] == 4  # counted whether kept or dropped
    assert [(r["chosen_index"], r["rejected_index"]) for r in kept_all[::3]] == [(0, 2)] * 4

    kept_orig, dropped_orig, _ = rank_rows(rows, TableScorer(table), "original", "drop")
    assert not dropped_orig and all((r["chosen_index"], r["rejected_index"]) == (1, 2) for r in kept_orig)
    assert [r["chosen"] for r in kept_orig] == [r["chosen"] for r in rows]


def test_rank_rows_bad_input(tmp_path):
    import datasets

    from selm.artifacts import read_generated
    from selm.io import write_parquet

    rows = generated_rows(3)
    rows[1]["responses"] = ["something else", rows[1]["reference_response"]]
    write_parquet(datasets.Dataset.from_list(rows), tmp_path / "generated.parquet")
    with pytest.raises(SELMError, match="row 1: 'reference_response' is not the first of 'responses'"):
        read_generated(tmp_path / "generated.parquet")  # the artifact's reader: rank_rows trusts what it passed
    rows = generated_rows(3)
    with pytest.raises(SELMError, match="non-finite score nan .*row 2"):
        rank_rows(rows, TableScorer([[0, 1, 2], [0, 1, 2], [0, float("nan"), 2]]))
    with pytest.raises(SELMError, match="update_rule"):
        rank_rows(rows, TableScorer([[0, 1, 2]] * 3), update_rule="best")


# ---------------------------------------------------------------------------------------------------------------
# scripts/rank.py end to end
# ---------------------------------------------------------------------------------------------------------------
def write_generated(recipe_path, iteration=1, num_rows=50):
    """iter-K/generated.parquet as the generation stage writes it: fixture rows, every third answer wrong or empty."""
    import datasets
    import yaml

    from selm.io import write_parquet

    def answers(i, row):
        return [[row["chosen"][-1]["content"], row["rejected"][-1]["content"], ""][i % 3]]

    rows = generated_rows(num_rows, answers)
    run_dir = Path(yaml.safe_load(recipe_path.read_text())["output_dir"])  # absolute: the fixture's tmp dir
    path = run_dir / f"iter-{iteration}" / "generated.parquet"
    write_parquet(datasets.Dataset.from_list(rows), path)
    return path, rows


def run_rank(recipe, *args):
    from selm.ranking import run_ranking_stage

    return run_stage("rank", run_ranking_stage, [str(recipe), "--iteration", "1", *args])


def test_rank_script_oracle_end_to_end(smoke_recipe, capsys):
    recipe = smoke_recipe()  # ranker: oracle (selm.standins.tiny:fixture_reward), update_rule best_worst, on_tie keep
    generated, rows = write_generated(recipe)
    iter_dir = generated.parent
    assert run_rank(recipe) == 0
    ranked = pq.read_table(iter_dir / "ranked.parquet")
    dropped = pq.read_table(iter_dir / "ranking_dropped.parquet")
    assert ranked.schema.remove_metadata() == output_schema()
    assert dropped.schema.remove_metadata() == output_schema(with_reason=True)
    report = json.loads((iter_dir / "rank_report.json").read_text())
    assert report["rows_in"] == 50 == ranked.num_rows + dropped.num_rows
    assert report["rows_out"] == ranked.num_rows
    out = ranked.to_pylist()
    assert [r["prompt_id"] for r in out] == [r["prompt_id"] for r in rows]  # input order kept
    # The oracle knows the answers: the chosen answer is always right, the rejected always wrong.
    assert all(r["scores"][r["chosen_index"]] == 1.0 and r["scores"][r["rejected_index"]] == 0.0 for r in out)
    assert report["generated_chosen"] == 17 and report["empty_generations"] == 16  # i % 3 == 0 right, == 2 empty
    assert report["generated_rejected"] == 0  # a wrong generation ties the original rejected, which ranks lower
    assert "rows_in" in capsys.readouterr().out  # the report is in the log

    before = (iter_dir / "ranked.parquet").stat().st_mtime_ns
    assert run_rank(recipe) == 0
    assert "exists" in capsys.readouterr().out
    assert (iter_dir / "ranked.parquet").stat().st_mtime_ns == before


def test_rank_script_pairrm_override_drop_ties(smoke_recipe, tiny_pairrm_dir):
    recipe = smoke_recipe()
    generated, rows = write_generated(recipe, num_rows=12)
    assert run_rank(recipe, "--ranker", "pairrm", "--ranker_model_name_or_path", str(tiny_pairrm_dir),
                    "--on_tie", "drop", "--ranker_batch_size", "8") == 0
    ranked = pq.read_table(generated.parent / "ranked.parquet").to_pylist()
    dropped = pq.read_table(generated.parent / "ranking_dropped.parquet").to_pylist()
    assert len(ranked) + len(dropped) == 12
    # A generation equal to the original chosen (or rejected) gets exactly its score: PairRM is symmetric in order.
    for row in ranked + dropped:
        assert len(row["scores"]) == 3
        if row["candidates"][0] == row["candidates"][1]:
            assert row["scores"][0] == pytest.approx(row["scores"][1], abs=1e-6)
    assert all(r["reason"] == "tie" for r in dropped)
    report = json.loads((generated.parent / "rank_report.json").read_text())
    assert report["ranker"] == "pairrm" and report["rows_dropped"] == len(dropped)


def test_rank_script_errors_leave_nothing_behind(smoke_recipe, tmp_path, monkeypatch, capsys):
    recipe = smoke_recipe()
    with pytest.raises(SystemExit) as exit_info:
        run_rank(recipe)
    assert exit_info.value.code == 2
    assert "iter-1/generated.parquet" in capsys.readouterr().err

    import datasets

    from selm.io import write_parquet

    empty = datasets.Dataset.from_list(generated_rows(2)).select([])
    write_parquet(empty, tmp_path / "run" / "iter-1" / "generated.parquet")
    with pytest.raises(SystemExit):
        run_rank(recipe)
    assert "generated.parquet: no rows" in capsys.readouterr().err

    generated, _ = write_generated(recipe, num_rows=6)
    with pytest.raises(SystemExit):
        run_rank(recipe, "--ranker", "pairrm", "--ranker_model_name_or_path", str(tmp_path / "missing-pairrm"))
    assert "missing-pairrm" in capsys.readouterr().err

    # Every row tied (a constant reward) and on_tie drop: an error, the drops and report written, no ranked.parquet.
    (tmp_path / "constant_oracle.py").write_text("def reward(prompt, response):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit):
        run_rank(recipe, "--oracle_reward", "constant_oracle:reward", "--on_tie", "drop")
    assert "all 6 rows" in capsys.readouterr().err
    assert pq.read_table(generated.parent / "ranking_dropped.parquet").num_rows == 6
    assert not (generated.parent / "ranked.parquet").exists()
    for name in ("ranking_dropped.parquet", "rank_report.json"):
        (generated.parent / name).unlink()

    # A reward function that fails half way: the error shows, and no output exists under a final name.
    (tmp_path / "flaky_oracle.py").write_text(
        "def reward(prompt, response):\n    if 'appears' in response:\n        raise RuntimeError('oracle broke')\n"
        "    return 1.0\n")
    with pytest.raises(RuntimeError, match="oracle broke"):
        run_rank(recipe, "--oracle_reward", "flaky_oracle:reward")
    assert sorted(p.name for p in generated.parent.iterdir()) == ["generated.parquet"]
