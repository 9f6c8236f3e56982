"""The run layout: every artifact of a run under the directory docs/DESIGN.md §4 describes."""

from selm.layout import RunLayout


def test_iteration_dirs_and_a_shared_iteration_zero(tmp_path):
    own = RunLayout(tmp_path / "run")
    shared = RunLayout(tmp_path / "run", iteration_zero_dir=tmp_path / "iter0")
    assert own.iter_dir(0) == tmp_path / "run" / "iter-0"
    assert shared.iter_dir(0) == tmp_path / "iter0"
    assert shared.iter_dir(3) == tmp_path / "run" / "iter-3"
    assert own.base_dir() == tmp_path / "run" / "base"
    assert shared.base_dir() == tmp_path / "iter0" / "base"  # the runs that share iteration 0 share its base
    assert shared.eval_metrics("base") == tmp_path / "iter0" / "base" / "eval" / "metrics.json"
    assert own.ranked(2) == tmp_path / "run" / "iter-2" / "ranked.parquet"
    assert own.model(31) == tmp_path / "run" / "iter-31" / "model"  # no cap on the number of iterations


def test_iterations_present_lists_numbered_dirs_in_order(tmp_path):
    layout = RunLayout(tmp_path / "run", iteration_zero_dir=tmp_path / "iter0")
    for name in ("iter-10", "iter-2", "iter-x", "base"):
        (tmp_path / "run" / name).mkdir(parents=True)
    (tmp_path / "iter0").mkdir()
    assert [k for k, _ in layout.iterations_present()] == [0, 2, 10]
