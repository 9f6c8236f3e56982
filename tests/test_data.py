"""Data layer: loading local files, schema validation with row/column errors, portions, atomic writes."""

import json

import pyarrow.parquet as pq
import pytest

from selm.data import (ensure_portion, load_preference_data, portion_bounds, prompt_messages, select_portion,
                       to_trainer_format)
from selm.errors import SELMError
from selm.io import atomic_path, read_parquet_metadata, write_parquet
from selm.standins.tiny import fixture_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_formats_load_and_validate(tmp_path, suffix):
    rows = fixture_rows(12)
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_jsonl(path, rows)
    ds = load_preference_data(str(path), max_samples=10)
    assert len(ds) == 10 and ds[3]["prompt_id"] == rows[3]["prompt_id"] and ds[3]["chosen"] == rows[3]["chosen"]


def load_error_from_row_6(tmp_path, rows, mutate) -> tuple[str, str]:
    """(the file, the error) of loading `rows` after `mutate` spoiled rows 6 onwards."""
    for r in rows[6:]:
        mutate(r)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SELMError) as err:
        load_preference_data(str(path))
    return path, str(err.value)


@pytest.mark.parametrize("mutate, column, why", [
    (lambda r: r.pop("chosen"), "chosen", "non-empty list"),  # json fills a key missing in some rows with null
    (lambda r: r.update(chosen="just text"), "chosen", "list of"),
    (lambda r: r.update(rejected=[{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]), "rejected", "role 'robot'"),
    (lambda r: r.update(rejected=r["rejected"][:-1]), "rejected", "last message must be the assistant"),
    (lambda r: r.update(prompt_id=7), "prompt_id", "expected a string"),
])
def test_malformed_row_names_file_row_and_column(tmp_path, mutate, column, why):
    path, message = load_error_from_row_6(tmp_path, fixture_rows(10), mutate)
    assert message.startswith(f"{path}: row 6, column '{column}': ") and why in message


def test_column_missing_everywhere_is_named(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "rejected"} for r in fixture_rows(5)]
    path = write_jsonl(tmp_path / "norej.jsonl", rows)
    with pytest.raises(SELMError, match=f"{path}: missing column 'rejected'"):
        load_preference_data(str(path))


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(SELMError, match=f"dataset file not found: {tmp_path}/nope.jsonl"):
        load_preference_data(str(tmp_path / "nope.jsonl"))


def test_multi_turn_prompt_is_everything_before_the_final_answer():
    rows = fixture_rows(30)
    multi = next(r for r in rows if len(r["chosen"]) >= 5 and r["chosen"][0]["role"] == "system")
    prompt = prompt_messages(multi)
    assert prompt == multi["chosen"][:-1] and prompt[-1]["role"] == "user" and len(prompt) >= 3
    example = to_trainer_format({**multi, "reference_response": "42"})
    assert example["prompt"] == prompt
    assert example["chosen"] == [multi["chosen"][-1]] and example["rejected"] == [multi["rejected"][-1]]
    assert example["reference_response"] == [{"role": "assistant", "content": "42"}]


def test_contiguous_portions_cover_the_data_in_order():
    import datasets
    ds = datasets.Dataset.from_list([{"i": i} for i in range(10)])
    parts = [list(select_portion(ds, 3, k)["i"]) for k in range(3)]
    assert sum(parts, []) == list(range(10)) and [len(p) for p in parts] == [3, 4, 3]
    assert portion_bounds(61135, 4, 3) == (45851, 61135)
    shuffled = [list(select_portion(ds, 3, k, "shuffled", seed=1)["i"]) for k in range(3)]
    assert sorted(sum(shuffled, [])) == list(range(10)) and sum(shuffled, []) != list(range(10))
    assert shuffled == [list(select_portion(ds, 3, k, "shuffled", seed=1)["i"]) for k in range(3)]
    with pytest.raises(SELMError, match="portion 1 of 20 has zero rows"):
        select_portion(ds, 20, 0)


def test_ensure_portion_writes_the_iteration_slice_once(smoke_recipe):
    from selm.recipe.parse import parse_recipe
    recipe, _ = parse_recipe([str(smoke_recipe()), "--iteration", "2"])
    path = ensure_portion(recipe)
    table = pq.read_table(path)
    assert table.num_rows == 50 and table.column("prompt_id")[0].as_py() == "fixture-0050"
    assert read_parquet_metadata(path)["portion"] == 1
    mtime = path.stat().st_mtime_ns
    assert ensure_portion(recipe) == path and path.stat().st_mtime_ns == mtime


def test_atomic_write_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    final = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    write_parquet([{"a": 1}], final, metadata={"model": "m"})
    assert pq.read_table(final).to_pylist() == [{"a": 1}] and read_parquet_metadata(final) == {"model": "m"}
    # a directory artifact replaces a previous one whole
    with atomic_path(tmp_path / "model") as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "model" / "config.json").exists() and len(list(tmp_path.iterdir())) == 2


# ---- accepted formats: each converts to the UltraFeedback schema on load ----
def sha256_hex(text):
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def implicit_prompt_row(row):  # trl: chosen/rejected hold the whole conversation, no prompt column
    return {"chosen": row["chosen"], "rejected": row["rejected"], "score_chosen": row["score_chosen"]}


def explicit_prompt_row(row):  # trl: the prompt turns apart, chosen/rejected only the answer
    return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


FORMATS = {  # name: (row in that format from a fixture row, whether the fixture's own prompt_id is kept)
    "ultrafeedback": (lambda r: r, True),
    "ultrafeedback without prompt_id": (lambda r: {k: v for k, v in r.items() if k != "prompt_id"}, False),
    "trl implicit prompt": (implicit_prompt_row, False),
    "trl implicit prompt with prompt_id": (lambda r: {**implicit_prompt_row(r), "prompt_id": r["prompt_id"]}, True),
    "trl explicit prompt": (explicit_prompt_row, False),
}


@pytest.mark.parametrize("form", sorted(FORMATS))
def test_formats_load_as_the_ultrafeedback_schema(tmp_path, form):
    convert, keeps_id = FORMATS[form]
    rows = fixture_rows(12)  # multi-turn rows and system messages included
    ds = load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", [convert(r) for r in rows])))
    assert len(ds) == len(rows)
    for got, row in zip(ds, rows):
        # prompt = the text of the last user message, as in the fixture (and UltraFeedback, which is single-turn)
        assert (got["prompt"], got["chosen"], got["rejected"]) == (row["prompt"], row["chosen"], row["rejected"])
        assert got["prompt_id"] == (row["prompt_id"] if keeps_id else sha256_hex(row["prompt"]))


@pytest.mark.parametrize("layout", ["parquet file", "directory of splits", "json file"])
def test_conversational_format_loads_from_every_local_layout(tmp_path, layout):
    import pyarrow as pa
    rows = fixture_rows(8)
    converted = [explicit_prompt_row(r) for r in rows]
    if layout == "parquet file":
        name, split = tmp_path / "d.parquet", "train"
        pq.write_table(pa.Table.from_pylist(converted), name)
    elif layout == "json file":
        name, split = tmp_path / "d.json", "train"
        name.write_text(json.dumps(converted))
    else:
        name, split = tmp_path / "splits", "test_prefs[:5]"
        name.mkdir()
        write_jsonl(name / "test_prefs.jsonl", converted)
    ds = load_preference_data(str(name), split)
    assert ds["chosen"] == [r["chosen"] for r in rows][:len(ds)] and len(ds) == (5 if "[" in split else 8)
    assert ds["prompt"] == [r["prompt"] for r in rows][:len(ds)]


def test_derived_id_is_ultrafeedbacks():
    """The first row of UltraFeedback's train_prefs: its prompt_id is the SHA-256 of its prompt text."""
    import datasets

    from selm.data import to_ultrafeedback_schema
    row = {k: v for k, v in fixture_rows(1)[0].items() if k != "prompt_id"}
    row["prompt"] = "how can i develop a habit of drawing daily"
    ds = to_ultrafeedback_schema(datasets.Dataset.from_list([row]), "row")
    assert ds[0]["prompt_id"] == "086b3e24f29b8956a01059f79c56db35d118a06fb6b844b095737d042795cd43"


def test_repeated_prompts_and_prompt_ids_are_rows_of_their_own(tmp_path):
    from selm.data import repeat_counts
    rows = fixture_rows(6)
    rows += [dict(rows[1]), {**rows[1], "chosen": rows[1]["chosen"][:-1] + [{"role": "assistant", "content": "z"}]},
             {**rows[2], "prompt_id": rows[0]["prompt_id"]}]  # same row twice, same prompt other pair, same id
    ds = load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert ds["prompt_id"] == [r["prompt_id"] for r in rows] and ds["chosen"] == [r["chosen"] for r in rows]
    counts = repeat_counts(ds["prompt_id"], [prompt_messages(r) for r in ds])
    assert counts == {"rows": 9, "distinct_prompts": 6, "distinct_prompt_ids": 6}


def _conversation_mutations():
    def last(column, change):
        return lambda r: change(r[column][-1])
    return {  # name: (row format, mutation of rows 6.., column named, fragment)
        "implicit: empty conversation": (implicit_prompt_row, lambda r: r.update(chosen=[]), "chosen", "non-empty list"),
        "implicit: last turn is the user's": (implicit_prompt_row, lambda r: r.update(rejected=r["rejected"][:-1]),
                                              "rejected", "the last message must be the assistant's"),
        "implicit: non-string content": (implicit_prompt_row, last("chosen", lambda m: m.update(content=3)), "chosen",
                                         "content is not a string"),
        "implicit: chosen and rejected prompts differ": (
            implicit_prompt_row, lambda r: r.update(rejected=[{"role": "user", "content": "other"}] + r["rejected"][-1:]),
            "rejected", "its prompt messages differ from 'chosen'"),
        "explicit: empty prompt": (explicit_prompt_row, lambda r: r.update(prompt=[]), "prompt", "non-empty list"),
        "explicit: non-string prompt content": (explicit_prompt_row, last("prompt", lambda m: m.update(content=3)),
                                                "prompt", "content is not a string"),
        "explicit: empty answer": (explicit_prompt_row, lambda r: r.update(rejected=[]), "rejected", "non-empty list"),
        "explicit: last turn is the user's": (
            explicit_prompt_row, lambda r: r.update(chosen=[{"role": "user", "content": "q"}]), "chosen",
            "the last message must be the assistant's"),
        "explicit: prompt without a user turn": (
            explicit_prompt_row, lambda r: r.update(prompt=[{"role": "system", "content": "s"}]), "chosen",
            "the assistant's answer must follow a user message"),
    }


CONVERSATION_CASES = _conversation_mutations()


@pytest.mark.parametrize("case", sorted(CONVERSATION_CASES))
def test_malformed_conversational_row_names_file_row_and_column(tmp_path, case):
    convert, mutate, column, why = CONVERSATION_CASES[case]
    path, message = load_error_from_row_6(tmp_path, [convert(r) for r in fixture_rows(10)], mutate)
    assert message.startswith(f"{path}: row 6, column '{column}': ") and why in message, message
    assert "\n" not in message


def test_plain_text_pairs_are_refused_in_one_line(tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"][-1]["content"], "rejected": r["rejected"][-1]["content"]}
            for r in fixture_rows(4)]  # trl's standard format: no messages, so no chat template to apply
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    with pytest.raises(SELMError, match=rf"^{path}: column 'chosen' holds plain text \(trl's standard preference"):
        load_preference_data(str(path))


def test_conversational_set_missing_a_column_is_named(tmp_path):
    rows = [{"chosen": r["chosen"]} for r in fixture_rows(4)]
    path = write_jsonl(tmp_path / "norej.jsonl", rows)
    with pytest.raises(SELMError, match=rf"{path}: missing column 'rejected' \(expected the UltraFeedback schema"):
        load_preference_data(str(path))


# ---- a portion with repeated prompts and prompt_ids through every stage ----
def with_repeats(rows):
    """rows[:-1] + the same row again, the same prompt with another pair, and the last row (a prompt of its own)
    under a repeated prompt_id."""
    rows, last = rows[:-1], rows[-1]
    other = {**rows[1], "rejected": rows[1]["rejected"][:-1] + [{"role": "assistant", "content": "no idea"}]}
    return rows + [dict(rows[0]), other, {**last, "prompt_id": rows[2]["prompt_id"]}]


def test_repeated_rows_go_through_generate_rank_train_evaluate_and_compare(tmp_path, tiny_model_dir):
    import pyarrow as pa

    from selm.comparison import _paired_difference, implicit_reward_differences
    from selm.recipe.parse import parse_recipe
    from selm.evaluation import evaluate_stage, implicit_rewards
    from selm.io import read_parquet
    from selm.standins.tiny import fixture_splits

    from conftest import script_main, write_smoke_recipe

    splits = fixture_splits(10, 6)
    train = [implicit_prompt_row(r) for r in with_repeats(splits["train_prefs"])]  # trl's format: ids from prompts
    test = with_repeats(splits["test_prefs"])  # UltraFeedback schema, ids repeated
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train_prefs.jsonl", train)
    write_jsonl(data / "test_prefs.jsonl", test)
    recipe = write_smoke_recipe(tmp_path, tiny_model_dir, data, max_samples=None, num_iterations=1,
                                learning_rate=5.0e-4, generation_shard_size=5, max_new_tokens=8,
                                per_device_train_batch_size=4, global_batch_size=4)
    run = tmp_path / "run"
    for stage in ("generate", "rank", "train"):
        assert script_main(stage)([str(recipe), "--iteration", "1"]) in (0, None), stage

    want_ids = [sha256_hex(r["prompt"]) for r in with_repeats(splits["train_prefs"])]
    want_chosen = [r["chosen"] for r in train]
    generated = read_parquet(run / "iter-1" / "generated.parquet").to_pydict()
    assert generated["prompt_id"] == want_ids and generated["chosen"] == want_chosen  # one row per input row
    report = json.loads((run / "iter-1" / "rank_report.json").read_text())
    assert (report["rows_in"], report["distinct_prompts"], report["distinct_prompt_ids"]) == (12, 10, 10)  # ids derived: one per prompt
    ranked = read_parquet(run / "iter-1" / "ranked.parquet").to_pydict()
    assert ranked["prompt_id"] == want_ids  # on_tie: keep, so every row stays
    log = json.loads((run / "iter-1" / "train_log.json").read_text())
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3]  # 12 rows / batch 4: every repeat trained on

    parse = lambda it: parse_recipe([str(recipe), "--iteration", it], stage="evaluate")[0]  # noqa: E731
    for it in ("base", "1"):
        metrics = evaluate_stage(parse(it), progress=False)
        assert metrics["num_prompts"] == 8
        assert {k: metrics["prompts"][k] for k in ("rows", "distinct_prompts", "distinct_prompt_ids")} == {
            "rows": 8, "distinct_prompts": 6, "distinct_prompt_ids": 5}
    answers = {it: read_parquet(run / d / "eval" / "answers.parquet").to_pydict() for it, d in
               (("base", "base"), ("1", "iter-1"))}
    assert answers["1"]["prompt_id"] == [r["prompt_id"] for r in test]
    # Paired by row: every one of the 8 rows, repeats included, gives one difference.
    paired = _paired_difference(run / "iter-1" / "eval", run / "base" / "eval")
    diffs = [a - b for a, b in zip(answers["1"]["reward"], answers["base"]["reward"])]
    assert paired["pairs"] == 8 and paired["mean"] == pytest.approx(sum(diffs) / 8)

    table = implicit_rewards(parse("1")).to_pydict()
    assert table["row"] == list(range(8)) and table["prompt_id"] == [r["prompt_id"] for r in test]
    (run / "recipe.yaml").write_text(recipe.read_text())  # the run's frozen recipe, as make writes it
    differences = implicit_reward_differences(run, run, "1")  # a run against itself: every row pairs with itself
    assert differences == {"chosen": [0.0] * 8, "rejected": [0.0] * 8}
    # two answer files of other rows are not paired
    other = tmp_path / "other"
    other.mkdir()
    pa_table = pa.table({"prompt_id": answers["1"]["prompt_id"][::-1], "reward": answers["1"]["reward"]})
    import pyarrow.parquet as pq_
    pq_.write_table(pa_table, other / "answers.parquet")
    with pytest.raises(SELMError, match="cannot be paired"):
        _paired_difference(other, run / "base" / "eval")
