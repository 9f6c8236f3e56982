"""selm.cli.run_stage, the one main of the four stage scripts: a dry run prints the resolved recipe and loads no
model, takes no lock and writes nothing, whatever the stage."""

import pytest
import yaml

from selm.cli import run_stage

STAGES = {  # stage: (its function, extra arguments, what the printed recipe must hold)
    "generate": ("selm.generation_stage:generate_stage", [], {}),
    "rank": ("selm.ranking:run_ranking_stage", ["--ranker", "pairrm", "--ranker_model_name_or_path", "/nowhere"],
             {"ranker": "pairrm", "ranker_model_name_or_path": "/nowhere"}),
    "train": ("selm.training:train_stage", [], {}),
    "evaluate": ("selm.evaluation:evaluate_stage", [], {}),
}


def stage_function(spec):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_dry_run_loads_no_model_and_writes_nothing(stage, smoke_recipe, tmp_path, monkeypatch, capsys):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("dry run loaded a model")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", refuse)
    spec, extra, expected = STAGES[stage]
    recipe = smoke_recipe(model_name_or_path=str(tmp_path / "not-built-yet"))
    assert run_stage(stage, stage_function(spec), [str(recipe), "--iteration", "2", "--dry_run", *extra]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)  # any token preview is YAML comments
    assert printed["stage"] == stage and printed["iteration"] == 2
    flat = {k: v for group in printed.values() if isinstance(group, dict) for k, v in group.items()}
    assert {k: flat.get(k) for k in expected} == expected
    assert not (tmp_path / "run").exists()  # no lock, no run_info.json, no artifact


def test_a_stage_runs_under_the_lock_and_record_and_exits_0(smoke_recipe, tmp_path):
    """Not a dry run: the stage function gets the recipe and the run_info record, and the launch is recorded."""
    import json

    seen = []
    recipe = smoke_recipe()
    assert run_stage("rank", lambda r, launch: seen.append((r.stage, r.iteration, launch)),
                     [str(recipe), "--iteration", "1"]) == 0
    (stage, iteration, launch), = seen
    assert (stage, iteration) == ("rank", 1) and launch.record is not None
    (record,) = json.loads((tmp_path / "run" / "run_info.json").read_text())["launches"]
    assert (record["stage"], record["iteration"], record["status"]) == ("rank", 1, "finished")
