"""selm.cli.run_stage, the one main of the four stage scripts (its dry run: tests/test_dry_run.py)."""

from selm.cli import run_stage


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
