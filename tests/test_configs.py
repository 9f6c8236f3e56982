"""Recipe parsing: YAML + overrides, per-iteration values, batch arithmetic and the errors (dry runs: test_dry_run.py)."""

import re
import subprocess
import sys

import pytest
import yaml

from selm.errors import SELMError
from selm.recipe.freeze import freeze_recipe
from selm.recipe.parse import parse_recipe

from conftest import REPO

PAPER = {
    # recipe: {iteration: (learning rate, alpha, beta)} - docs/DESIGN.md §2
    "recipes/zephyr-7b-sft/selm.yaml": {0: (5e-7, 0.0, 0.01), 1: (5e-7, 1e-3, 0.01), 2: (5e-7, 1e-3, 0.01), 3: (1e-7, 1e-3, 0.01)},
    "recipes/zephyr-7b-sft/dpo.yaml": {0: (5e-7, 0.0, 0.01), 1: (5e-7, 0.0, 0.01), 2: (5e-7, 0.0, 0.01), 3: (1e-7, 0.0, 0.01)},
    "recipes/llama-3-8b-instruct/selm.yaml": {1: (5e-7, 1e-4, 0.01), 2: (3e-7, 1e-4, 0.01), 3: (1e-7, 1e-4, 0.01)},
    "recipes/llama-3-8b-instruct/dpo.yaml": {1: (5e-7, 0.0, 0.01), 2: (3e-7, 0.0, 0.01), 3: (1e-7, 0.0, 0.01)},
}
GLOBAL_BATCH = {"zephyr-7b-sft": 256, "llama-3-8b-instruct": 128}


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_paper_recipes_resolve_to_the_paper_values(recipe):
    for iteration, (lr, alpha, beta) in PAPER[recipe].items():
        r, dry = parse_recipe([str(REPO / recipe), "--iteration", str(iteration), "--num_processes", "8"])
        assert not dry
        assert r.training["learning_rate"] == pytest.approx(lr)
        assert r.training["alpha"] == pytest.approx(alpha)
        assert r.training["beta"] == pytest.approx(beta)
        assert r.effective_global_batch == GLOBAL_BATCH[recipe.split("/")[1]]
        assert r.generation.temperature == 0.0 and r.generation.max_new_tokens == 1024
        assert r.ranking.ranker == "pairrm" and r.training["max_length"] == 1024


def test_iterations_chain_models_and_portions():
    recipe = str(REPO / "recipes/zephyr-7b-sft/selm.yaml")
    r0, _ = parse_recipe([recipe, "--iteration", "0"])
    r1, _ = parse_recipe([recipe, "--iteration", "1"])
    r3, _ = parse_recipe([recipe, "--iteration", "3", "--iteration_zero_dir", "runs/shared-iter0"])
    assert r0.start_model == "HuggingFaceH4/mistral-7b-sft-beta" and r0.is_generation_free
    assert r1.start_model.endswith("iter-0/model") and not r1.is_generation_free
    assert r3.start_model.endswith("iter-2/model") and r3.iter_dir(0).as_posix() == "runs/shared-iter0"
    assert (r0.portion_index, r3.portion_index, r3.num_portions) == (0, 3, 4)
    llama, _ = parse_recipe([str(REPO / "recipes/llama-3-8b-instruct/selm.yaml"), "--iteration", "1"])
    assert llama.start_model == "meta-llama/Meta-Llama-3-8B-Instruct" and llama.num_portions == 3


def test_cli_overrides_yaml_in_both_spellings(tmp_path):
    r, _ = parse_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--iteration", "1", "--beta", "0.3", "--alpha=0.05",
                         "--generation_backend", "vllm", "--output_dir", str(tmp_path)])
    assert r.training["beta"] == 0.3 and r.training["alpha"] == 0.05
    assert r.generation.generation_backend == "vllm" and r.run_dir == tmp_path
    # per-iteration value from the list, overridden for this iteration only by the command line
    r2, _ = parse_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--iteration", "2"])
    r2b, _ = parse_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--iteration", "2", "--learning_rate", "1e-3"])
    assert r2.training["learning_rate"] == pytest.approx(2e-4) and r2b.training["learning_rate"] == pytest.approx(1e-3)


def test_global_batch_fixes_accumulation_whatever_the_process_count():
    recipe = str(REPO / "recipes/zephyr-7b-sft/selm.yaml")
    for procs, accum in [(8, 4), (4, 8), (2, 16), (32, 1)]:
        r, _ = parse_recipe([recipe, "--iteration", "1", "--num_processes", str(procs)])
        assert (r.gradient_accumulation_steps(), r.effective_global_batch) == (accum, 256)
    with pytest.raises(SELMError, match="global_batch_size 256 is not a multiple"):
        parse_recipe([recipe, "--iteration", "1", "--num_processes", "3"])


def test_unknown_recipe_key_names_it_and_the_closest_valid_key(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\noutput_dir: o\nalpah: 0.1\n")
    with pytest.raises(SELMError, match=r"r.yaml: unknown key 'alpah' \(did you mean 'alpha'\?\)"):
        parse_recipe([str(path), "--iteration", "1"])
    with pytest.raises(SELMError, match=r"command line: unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        parse_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--iteration", "1", "--lerning_rate", "1"])


def test_short_per_iteration_list_names_the_key_and_both_lengths(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\noutput_dir: o\nnum_iterations: 3\nlearning_rate: [1.0e-6, 2.0e-6]\n")
    with pytest.raises(SELMError, match=r"'learning_rate' has 2 per-iteration values but the recipe has 3 iterations"):
        parse_recipe([str(path), "--iteration", "1"])


def test_bad_values_are_named(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\noutput_dir: o\nupdate_rule: best-worst\n")
    with pytest.raises(SELMError, match=r"'update_rule' is 'best-worst'; expected one of"):
        parse_recipe([str(path), "--iteration", "1"])
    with pytest.raises(SELMError, match=r"--iteration 4 is not one of this recipe's iterations \[1, 2, 3\]"):
        parse_recipe([str(REPO / "recipes/llama-3-8b-instruct/selm.yaml"), "--iteration", "4"])
    with pytest.raises(SELMError, match="--iteration K is required"):
        parse_recipe([str(REPO / "recipes/smoke/selm.yaml")])
    with pytest.raises(SELMError, match="recipe not found: nope.yaml"):
        parse_recipe(["nope.yaml", "--iteration", "1"])
    with pytest.raises(SELMError, match="a recipe must be a YAML mapping"):
        parse_recipe([str(write(tmp_path, "- a\n- b\n")), "--iteration", "1"])


def test_training_config_is_a_selm_config_for_the_iteration(smoke_recipe):
    from selm.trainer_config import SELMConfig

    r, _ = parse_recipe([str(smoke_recipe()), "--iteration", "2"])
    config = r.training_config()
    assert isinstance(config, SELMConfig)
    assert config.learning_rate == pytest.approx(2e-4) and config.alpha == pytest.approx(1e-3)
    assert config.output_dir.endswith("iter-2/checkpoints") and config.gradient_accumulation_steps == 2


def test_freeze_writes_once_and_refuses_a_changed_rerun(tmp_path):
    run = tmp_path / "run"
    args = [str(REPO / "recipes/smoke/selm.yaml"), "--output_dir", str(run), "--beta", "0.3"]
    path, what = freeze_recipe(args)
    assert what == "frozen" and yaml.safe_load(path.read_text())["beta"] == 0.3
    mtime = path.stat().st_mtime_ns
    assert freeze_recipe(args)[1] == "using the frozen recipe" and path.stat().st_mtime_ns == mtime
    with pytest.raises(SELMError, match=r"started with other settings \(beta: 0.3 -> 0.4\)"):
        freeze_recipe(args[:-1] + ["0.4"])
    with pytest.raises(SELMError, match=r"\(with overrides\): unknown key 'alpah'"):
        freeze_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--output_dir", str(tmp_path / "r2"), "--alpah", "1"])
    assert not (tmp_path / "r2" / "recipe.yaml").exists()
    with pytest.raises(SELMError, match=r"started with other settings \(num_iterations: 2 -> 5\)"):
        freeze_recipe(args + ["--num_iterations", "5"])
    with pytest.raises(SELMError, match="'output_dir' is the run directory; set it with RUN_DIR"):
        freeze_recipe(args + ["--output_dir", str(tmp_path / "elsewhere")])


def test_badly_typed_values_are_one_line_naming_key_and_value(tmp_path):
    recipe = str(REPO / "recipes/smoke/selm.yaml")
    with pytest.raises(SELMError, match=r"'num_iterations' is 'abc'; expected a whole number"):
        parse_recipe([recipe, "--iteration", "1", "--num_iterations", "abc"])
    with pytest.raises(SELMError, match=r"argument --global_batch_size.*invalid int value: 'x'"):
        parse_recipe([recipe, "--iteration", "1", "--global_batch_size", "x"])
    quoted = write(tmp_path, "model_name_or_path: m\noutput_dir: o\ndpo_iteration_zero: 'false'\n")
    assert parse_recipe([str(quoted), "--iteration", "1"])[0].pipeline.first_iteration == 1


def test_hub_pushes_are_private_and_named_per_run_and_iteration():
    r, _ = parse_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--iteration", "2", "--push_to_hub", "true"])
    config = r.training_config()
    assert config.hub_private_repo is True and config.hub_model_id == "smoke-selm-iter-2"
    r, _ = parse_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--iteration", "1"])
    assert r.training_config().push_to_hub is False


def test_stage_script_error_is_one_line_and_nonzero(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\noutput_dir: o\nalpah: 0.1\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts/freeze_recipe.py"), str(path), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}: unknown key 'alpah' (did you mean 'alpha'?)"]
    assert "Traceback" not in proc.stderr


def test_sweep_expands_one_checked_run_per_combination_including_iteration_counts(tmp_path):
    from selm.sweep import expand

    base = yaml.safe_load((REPO / "recipes/smoke/selm.yaml").read_text()) | {"learning_rate": 5.0e-4}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"recipe": str(tmp_path / "base.yaml"), "output_root": str(tmp_path / "runs"),
                                     "grid": {"num_iterations": [1, 3], "alpha": [0.0, 0.001]}}, sort_keys=False))
    runs = expand(sweep)
    assert [d.name for _, d, _ in runs] == ["num_iterations-1_alpha-0.0", "num_iterations-1_alpha-0.001",
                                            "num_iterations-3_alpha-0.0", "num_iterations-3_alpha-0.001"]
    assert [args for _, _, args in runs] == [["--num_iterations", str(n), "--alpha", str(a)]
                                             for n, a in [(1, 0.0), (1, 0.001), (3, 0.0), (3, 0.001)]]
    assert not (tmp_path / "runs").exists()  # expanding writes nothing: each run freezes itself when it starts
    # the overrides freeze to the combination's values
    from selm.recipe.freeze import freeze_recipe

    recipe, run_dir, args = runs[3]
    frozen = yaml.safe_load(freeze_recipe([recipe, "--output_dir", str(run_dir), *args])[0].read_text())
    assert (frozen["num_iterations"], frozen["alpha"], frozen["output_dir"]) == (3, 0.001, str(run_dir))
    grid = {"recipe": str(tmp_path / "base.yaml"), "output_root": "o", "grid": {"learning_rate": [[1e-3, 2e-3, 3e-3]]}}
    sweep.write_text(yaml.safe_dump(grid))
    with pytest.raises(SELMError, match="'learning_rate' has 3 per-iteration values but the recipe has 2 iterations"):
        expand(sweep)  # every combination is checked before anything runs
    with pytest.raises(SELMError, match="unknown key 'gird'"):
        sweep.write_text(yaml.safe_dump({"recipe": "r", "output_root": "o", "gird": {}}))
        expand(sweep)


@pytest.mark.parametrize("cls, key, allowed", [
    ("PipelineConfig", "portion_split", ["contiguous", "shuffled"]),
    ("GenerationArguments", "generation_backend", ["vllm", "hf"]),
    ("RankingArguments", "ranker", ["pairrm", "reward_model", "oracle"]),
    ("RankingArguments", "update_rule", ["best_worst", "replace", "original", "rso", "rest"]),
    ("RankingArguments", "candidates", ["generated_and_pair", "generated"]),
    ("PipelineConfig", "reference_model", ["previous_iteration", "initial"]),
    ("RankingArguments", "on_tie", ["drop", "keep"]),
    ("RankingArguments", "pairrm_dtype", ["float32", "float16"]),
])
def test_fixed_choice_keys_are_refused_when_their_dataclass_is_built(cls, key, allowed):
    # the consumers (data, generation, ranking) trust these values: building the dataclass is where they are checked
    from selm.recipe import schema

    for value in allowed:
        assert getattr(getattr(schema, cls)(**{key: value}), key) == value
    with pytest.raises(SELMError, match=re.escape(f"'{key}' is 'bogus'; expected one of {allowed}")):
        getattr(schema, cls)(**{key: "bogus"})


def test_a_bad_choice_in_any_iteration_or_on_the_command_line_is_named(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\noutput_dir: o\nupdate_rule: [best_worst, bestworst, replace]\n")
    with pytest.raises(SELMError, match=r"r.yaml: 'update_rule' is 'bestworst' for iteration 2; expected one of"):
        parse_recipe([str(path), "--iteration", "1"])  # a dry run of iteration 1 refuses iteration 2's value
    with pytest.raises(SELMError, match=r"^command line: 'on_tie' is 'never'; expected one of \['drop', 'keep'\]"):
        parse_recipe([str(REPO / "recipes/smoke/selm.yaml"), "--iteration", "1", "--on_tie", "never"])


def test_selm_config_built_directly_is_checked_by_the_same_rules(tmp_path):
    from selm.trainer_config import SELMConfig

    with pytest.raises(SELMError, match=r"^'alpha' is -0.5; it must be >= 0 \(0 is plain DPO\)$"):
        SELMConfig(output_dir=str(tmp_path), bf16=False, alpha=-0.5)
    with pytest.raises(SELMError, match=r"^'beta' is 0.0; it must be > 0"):
        SELMConfig(output_dir=str(tmp_path), bf16=False, beta=0.0)


def test_stage_help_says_output_dir_is_the_run_directory():
    proc = subprocess.run([sys.executable, str(REPO / "scripts/train.py"), "--help"], capture_output=True, text=True,
                          check=True)
    help_text = " ".join(proc.stdout.split())
    assert "--output-dir OUTPUT_DIR The run directory (RUN_DIR)" in help_text
    assert "iter-K/checkpoints" in help_text
