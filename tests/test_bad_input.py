"""Bad input, one row per case: the stage exits non-zero with one error line naming the culprit, and nothing is
half-written (no new artifact, no temporary). Stages run in this process (fast); two cases also through the real
command line for the exit code."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from selm.standins.tiny import fixture_rows

from conftest import REPO, script_main

# What a refused launch may leave: the run's lock file and its launch record (which then says "failed").
BOOKKEEPING = {".selm.lock", ".run_info.lock", "run_info.json"}


def nan_reward(prompt, response):
    """An oracle ranker that fails to score (a broken reward model)."""
    return math.nan


# ---- recipe values: (stage, recipe overrides, command-line arguments, fragments of the error line) ----
# "{recipe}" in a fragment stands for the recipe file's path.
RECIPE_CASES = {
    "unknown key": ("train", {"alpah": 0.1}, [], ["{recipe}: unknown key 'alpah' (did you mean 'alpha'?)"]),
    "unknown key, command line": ("generate", {}, ["--temprature", "1"], ["command line: unknown key 'temprature'"]),
    "wrong type, float": ("train", {"alpha": "high"}, [], ["{recipe}", "--alpha", "invalid float value: 'high'"]),
    "wrong type, int": ("generate", {"num_responses": 1.5}, [], ["{recipe}: 'num_responses' is 1.5; expected a whole"]),
    "wrong type, string": ("rank", {"oracle_reward": 3}, [], ["{recipe}: 'oracle_reward' is 3; expected a string"]),
    "wrong type, per-iteration": ("train", {"learning_rate": [5.0e-4, "fast"]}, [],
                                  ["{recipe}: 'learning_rate' is 'fast' for iteration 2; expected a number"]),
    "beta = 0": ("train", {"beta": 0}, [], ["{recipe}: 'beta' is 0; it must be > 0"]),
    "beta < 0, command line": ("train", {}, ["--beta", "-0.1"], ["command line: 'beta' is -0.1; it must be > 0"]),
    "alpha < 0": ("train", {"alpha": -0.001}, [], ["{recipe}: 'alpha' is -0.001; it must be >= 0"]),
    "learning rate 0": ("train", {"learning_rate": 0.0}, [], ["{recipe}: 'learning_rate' is 0.0; it must be > 0"]),
    "learning rate < 0 in a later iteration": ("train", {"learning_rate": [5.0e-4, -1.0e-4]}, [],
                                               ["{recipe}: 'learning_rate' is -0.0001 for iteration 2; it must be > 0"]),
    "global batch not divisible": ("train", {"global_batch_size": 20}, [],
                                   ["{recipe}: global_batch_size 20 is not a multiple of per_device_train_batch_size 8"]),
    "global batch < 1": ("train", {"global_batch_size": 0}, [], ["'global_batch_size' is 0; it must be at least 1"]),
    "num_responses < 1": ("generate", {"num_responses": 0}, [], ["{recipe}: 'num_responses' is 0; it must be at least"]),
    "temperature < 0": ("generate", {}, ["--temperature", "-0.5"], ["command line: 'temperature' is -0.5; it must be >= 0"]),
    "top_p 0": ("generate", {"temperature": 1.0, "top_p": 0.0}, [], ["{recipe}: 'top_p' is 0.0; it must be in (0, 1]"]),
    "top_p > 1": ("generate", {"top_p": 1.5}, [], ["{recipe}: 'top_p' is 1.5; it must be in (0, 1]"]),
    "max_new_tokens < 1": ("generate", {"max_new_tokens": 0}, [], ["{recipe}: 'max_new_tokens' is 0"]),
    "generation shard < 1": ("generate", {"generation_shard_size": 0}, [], ["'generation_shard_size' is 0"]),
    "generation batch < 1": ("generate", {"generation_batch_size": -4}, [], ["'generation_batch_size' is -4"]),
    "ranker batch < 1": ("rank", {"ranker_batch_size": 0}, [], ["{recipe}: 'ranker_batch_size' is 0"]),
    "tensor parallel < 1": ("generate", {"tensor_parallel_size": 0}, [], ["'tensor_parallel_size' is 0"]),
    "data parallel < 1": ("generate", {}, ["--data_parallel_size", "0"], ["command line: 'data_parallel_size' is 0"]),
    "gpu memory 0": ("generate", {"gpu_memory_utilization": 0.0}, [], ["'gpu_memory_utilization' is 0.0; it must be in (0, 1]"]),
    "gpu memory > 1": ("generate", {"gpu_memory_utilization": 1.2}, [], ["'gpu_memory_utilization' is 1.2"]),
    "num_iterations < 1": ("train", {"num_iterations": 0}, [], ["{recipe}: 'num_iterations' is 0; it must be at least 1"]),
    "max_samples < 1": ("generate", {"max_samples": 0}, [], ["{recipe}: 'max_samples' is 0; it must be at least 1"]),
    "eval_max_samples < 1": ("train", {"eval_max_samples": 0}, [], ["{recipe}: 'eval_max_samples' is 0"]),
    "epochs 0": ("train", {"num_train_epochs": 0}, [], ["{recipe}: 'num_train_epochs' is 0; it must be > 0"]),
    "per-device batch < 1": ("train", {"per_device_train_batch_size": 0}, [], ["'per_device_train_batch_size' is 0"]),
    "max_length < 1": ("train", {"max_length": 0}, [], ["{recipe}: 'max_length' is 0; it must be at least 1"]),
    "warmup < 0": ("train", {"warmup_steps": -0.1}, [], ["{recipe}: 'warmup_steps' is -0.1; it must be >= 0"]),
    "prompt fills max_length": ("train", {"max_prompt_length": 128}, [],
                                ["{recipe}: 'max_prompt_length' is 128; it must be below max_length (128)"]),
    "prompt over max_length, command line": ("generate", {}, ["--max_length", "64"],
                                             ["'max_prompt_length' is 64; it must be below max_length (64)"]),
    "prompt fills max_length in a later iteration": (
        "train", {"max_length": [128, 64], "max_prompt_length": 64}, [],
        ["{recipe}: 'max_prompt_length' is 64 for iteration 2; it must be below max_length (64)"]),
    "iteration beyond the recipe": ("train", {}, ["--iteration", "3"], ["--iteration 3 is not one of this recipe's"]),
}


# ---- data rows: mutate fixture rows 6.. of the dataset file; the generate stage reads and checks it ----
def _drop_rejected(rows):
    for r in rows:
        r.pop("rejected")


def _from_row_6(change):
    def mutate(rows):
        for r in rows[6:]:
            change(r)
    return mutate


DATA_CASES = {
    "missing column": (_drop_rejected, ["{data}: missing column 'rejected'"]),
    "missing value": (_from_row_6(lambda r: r.update(chosen=None)), ["{data}: row 6, column 'chosen': expected a non-empty"]),
    "empty conversation": (_from_row_6(lambda r: r.update(chosen=[])), ["{data}: row 6, column 'chosen': expected a non-empty"]),
    "final turn not the assistant's": (_from_row_6(lambda r: r.update(rejected=r["rejected"][:-1])),
                                       ["{data}: row 6, column 'rejected': the last message must be the assistant's"]),
    "non-string content": (_from_row_6(lambda r: r["chosen"][-1].update(content=42)),
                           ["{data}: row 6, column 'chosen': message 1 content is not a string"]),
    "trl format, rejected prompt differs": (
        lambda rows: [r.pop("prompt") for r in rows] and rows[6].update(
            rejected=[{"role": "user", "content": "another question"}] + rows[6]["rejected"][-1:]),
        ["{data}: row 6, column 'rejected': its prompt messages differ from 'chosen'"]),
    "trl format, last turn not the assistant's": (
        lambda rows: [r.update(prompt=r["chosen"][:-1], chosen=r["chosen"][-1:], rejected=r["rejected"][-1:])
                      for r in rows] and rows[6].update(chosen=[{"role": "user", "content": "q"}]),
        ["{data}: row 6, column 'chosen': the last message must be the assistant's answer"]),
    "empty prompt_id": (lambda rows: rows[6].update(prompt_id=" "), ["{data}: row 6, column 'prompt_id': empty"]),
}


def files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def run_stage(stage, argv, capsys):
    """Run scripts/<stage>.py's main in-process; returns (exit code, error lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        script_main(stage)([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_.value.code, [line for line in err.splitlines() if line.startswith("error:")]


def assert_refused(root, before, stage, argv, fragments, capsys):
    code, errors = run_stage(stage, argv, capsys)
    assert code == 2 and len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    new = files(root) - before
    assert {p.rsplit("/", 1)[-1] for p in new} <= BOOKKEEPING, f"written by a refused launch: {new}"
    assert not [p for p in files(root) if ".tmp-" in p]
    record = root / "run" / "run_info.json"
    if record.exists():  # the launch record says what went wrong
        last = json.loads(record.read_text())["launches"][-1]
        assert last["status"] == "failed" and last["error"].split(": ", 1)[1] == errors[0][len("error: "):]


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_value(case, smoke_recipe, capsys):
    stage, overrides, cli, fragments = RECIPE_CASES[case]
    recipe = smoke_recipe(**overrides)
    argv = [recipe, "--iteration", "1", *cli] if "--iteration" not in cli else [recipe, *cli]
    fragments = [f.replace("{recipe}", str(recipe)) for f in fragments]
    assert_refused(recipe.parent, files(recipe.parent), stage, argv, fragments, capsys)


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_row(case, smoke_recipe, capsys):
    mutate, fragments = DATA_CASES[case]
    recipe = smoke_recipe()
    rows = fixture_rows(12)
    mutate(rows)
    data = recipe.parent / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = smoke_recipe(dataset_name=str(data), max_samples=None)
    fragments = [f.replace("{data}", str(data)) for f in fragments]
    assert_refused(recipe.parent, files(recipe.parent), "generate", [recipe, "--iteration", "1"], fragments, capsys)


@pytest.mark.parametrize("stage", ["generate", "train"])
def test_missing_base_model_path(stage, smoke_recipe, capsys):
    recipe = smoke_recipe(model_name_or_path="/nonexistent/model")
    if stage == "train":  # training has its data: the model is what is missing
        from test_train_script import write_ranked
        write_ranked(recipe.parent / "run")
    assert_refused(recipe.parent, files(recipe.parent), stage, [recipe, "--iteration", "1"],
                   [f"model directory not found: /nonexistent/model (model_name_or_path in {recipe})"], capsys)


# ---- damaged model files (an interrupted download or copy): (damage to a copy of the model, damaged file) ----
def _truncate(name, keep):
    def damage(model_dir):
        path = model_dir / name
        path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])
        return path
    return damage


def _delete(name):
    def damage(model_dir):
        (model_dir / name).unlink()
        return model_dir / name if name != "model.safetensors" else model_dir
    return damage


SHARD_2 = "model-00002-of-00003.safetensors"
MODEL_CASES = {  # (sharded copy?, damage)
    "truncated weights": (False, _truncate("model.safetensors", lambda size: size // 2)),
    "one byte short": (False, _truncate("model.safetensors", lambda size: size - 1)),
    "header cut": (False, _truncate("model.safetensors", lambda size: 5)),
    "no weights": (False, _delete("model.safetensors")),
    "missing shard": (True, _delete(SHARD_2)),
    "truncated shard": (True, _truncate(SHARD_2, lambda size: size - 4096)),
}


def _model_copy(tiny_model_dir, destination, sharded):
    import shutil

    if not sharded:
        shutil.copytree(tiny_model_dir, destination)
        return destination
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(destination, max_shard_size=f"{size // 2500}KB")  # three shards
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(destination)
    assert (destination / SHARD_2).is_file() and (destination / "model.safetensors.index.json").is_file()
    return destination


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
@pytest.mark.parametrize("stage", ["generate", "train"])
def test_damaged_base_model_weights(case, stage, smoke_recipe, tiny_model_dir, tmp_path, capsys):
    sharded, damage = MODEL_CASES[case]
    model_dir = _model_copy(tiny_model_dir, tmp_path / "copied-model", sharded)
    damaged = damage(model_dir)
    recipe = smoke_recipe(model_name_or_path=str(model_dir))
    if stage == "train":
        from test_train_script import write_ranked
        write_ranked(recipe.parent / "run")
    assert_refused(recipe.parent, files(recipe.parent), stage, [recipe, "--iteration", "1"],
                   [str(damaged), "re-download or re-copy"], capsys)


def test_whole_model_files_pass_the_weight_check(tiny_model_dir, tmp_path):
    """No false alarm: what transformers saves, single file or sharded, passes, and loads."""
    from transformers import AutoModelForCausalLM

    from selm.models import check_weights

    for sharded in (False, True):
        model_dir = _model_copy(tiny_model_dir, tmp_path / f"sharded-{sharded}", sharded)
        check_weights(model_dir)
        AutoModelForCausalLM.from_pretrained(model_dir)


def test_ranker_returning_nan(smoke_recipe, capsys):
    from test_ranking import write_generated

    recipe = smoke_recipe(oracle_reward="test_bad_input:nan_reward")
    write_generated(recipe)
    assert_refused(recipe.parent, files(recipe.parent), "rank", [recipe, "--iteration", "1"],
                   ["ranker gave a non-finite score nan", "row 0, prompt_id fixture-0000"], capsys)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _make_generated(recipe):
    from test_ranking import write_generated
    return write_generated(recipe)[0]


def _make_ranked(recipe):
    from test_train_script import write_ranked
    return write_ranked(recipe.parent / "run")


def _make_portion(recipe):
    from selm.recipe.parse import parse_recipe
    from selm.data import ensure_portion
    return ensure_portion(parse_recipe([str(recipe), "--iteration", "1"])[0])


def _make_shard(recipe):
    from selm.io import write_parquet
    _make_portion(recipe)  # the shard's stage has its portion: only the shard is at fault
    path = recipe.parent / "run" / "iter-1" / "generated.shards" / "shard-00000.parquet"
    write_parquet([{"prompt_id": f"fixture-{i:04d}", "responses": ["x"]} for i in range(16)], path)
    return path


# (stage that reads it, how the artifact is made, how it is damaged)
CORRUPT_CASES = {
    "truncated generated.parquet": ("rank", _make_generated, _truncate),
    "damaged ranked.parquet": ("train", _make_ranked, _flip_middle),
    "truncated portion.parquet": ("generate", _make_portion, _truncate),
    "damaged generation shard": ("generate", _make_shard, _flip_middle),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_parquet_in_the_run_directory(case, smoke_recipe, capsys):
    stage, make, damage = CORRUPT_CASES[case]
    recipe = smoke_recipe()
    path = make(recipe)
    damage(path)
    assert_refused(recipe.parent, files(recipe.parent), stage, [recipe, "--iteration", "1"],
                   [f"{path}: not a readable parquet file", "delete it and rerun the stage"], capsys)


def cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_real_exit_code_and_stderr_of_refused_commands(smoke_recipe):
    recipe = smoke_recipe()
    dry = cli("scripts/train.py", recipe, "--iteration", "1", "--beta", "-0.1", "--dry_run")
    assert dry.returncode == 2 and dry.stdout == ""
    assert dry.stderr.strip().splitlines() == [
        "error: command line: 'beta' is -0.1; it must be > 0 (beta <= 0 flips or removes the preference objective)"]

    generated = _make_generated(recipe)
    _truncate(generated)
    rank = cli("scripts/rank.py", recipe, "--iteration", "1")
    errors = [line for line in rank.stderr.splitlines() if line.startswith("error:")]
    assert rank.returncode == 2 and "Traceback" not in rank.stderr and len(errors) == 1
    assert f"{generated}: not a readable parquet file" in errors[0]
    assert not (generated.parent / "ranked.parquet").exists()


def test_freeze_refuses_a_bad_value_of_any_iteration(tmp_path, capsys):
    recipe = yaml.safe_load((REPO / "recipes/smoke/selm.yaml").read_text()) | {"learning_rate": [5.0e-4, 0.0]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert_refused(tmp_path, files(tmp_path), "freeze_recipe", [path, "--output_dir", tmp_path / "run"],
                   [f"{path}: 'learning_rate' is 0.0 for iteration 2; it must be > 0"], capsys)
    assert not (tmp_path / "run" / "recipe.yaml").exists()
