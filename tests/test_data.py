"""Data layer: loading local files, schema validation with row/column errors, portions, atomic writes."""

import json

import pyarrow.parquet as pq
import pytest

from selm.data import (ensure_portion, load_preference_data, portion_bounds, prompt_messages, select_portion,
                       to_trainer_format)
from selm.errors import SELMError
from selm.io import atomic_path, read_parquet_metadata, write_parquet
from selm.tiny import fixture_rows


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


@pytest.mark.parametrize("mutate, column, why", [
    (lambda r: r.pop("chosen"), "chosen", "non-empty list"),  # json fills a key missing in some rows with null
    (lambda r: r.update(chosen="just text"), "chosen", "list of"),
    (lambda r: r.update(rejected=[{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]), "rejected", "role 'robot'"),
    (lambda r: r.update(rejected=r["rejected"][:-1]), "rejected", "last message must be the assistant"),
    (lambda r: r.update(prompt_id=7), "prompt_id", "expected a string"),
])
def test_malformed_row_names_file_row_and_column(tmp_path, mutate, column, why):
    rows = fixture_rows(10)
    for r in rows[6:]:
        mutate(r)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SELMError) as err:
        load_preference_data(str(path))
    message = str(err.value)
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
    from selm.configs import parse_recipe
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
