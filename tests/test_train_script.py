"""scripts/train.py end to end on the smoke recipe: CLI, outputs, resume, skip, dry run, bad input, ZeRO-3 on CPU."""

import os
import subprocess
import sys

import pytest
import yaml

from selm.cli import run_stage

from conftest import REPO

ROWS = 32  # 2 optimizer steps at the smoke recipe's global batch of 16


def train_main():
    """The train stage's command line (scripts/train.py's main), in this process."""
    from selm.training import train_stage

    return lambda argv: run_stage("train", train_stage, argv)


def write_ranked(run_dir, iteration=1, with_reference=True):
    """iter-K/ranked.parquet in the schema the rank stage writes: UltraFeedback columns + reference_response."""
    import pyarrow as pa

    from selm.io import write_parquet
    from selm.standins.tiny import fixture_rows

    rows = fixture_rows(ROWS)
    if with_reference:
        for i, row in enumerate(rows):
            row["reference_response"] = f"The answer is {i}."
    path = run_dir / f"iter-{iteration}" / "ranked.parquet"
    write_parquet(pa.Table.from_pylist(rows), path)
    return path


def run_cli(args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_loadable(model_dir, start_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    start = AutoModelForCausalLM.from_pretrained(start_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert changed, "training did not change any weight"


@pytest.mark.slow  # over 10 s here: make test-fast leaves it out
def test_cli_trains_saves_resumes_and_skips(smoke_recipe, tiny_model_dir, capsys):
    # keep_checkpoints: the test stands in for a crash after step 1 by deleting the finished model
    recipe = smoke_recipe(save_strategy="steps", save_steps=1, warmup_steps=0, keep_checkpoints=True)
    run = recipe.parent / "run"
    write_ranked(run)
    # First run, through the real command line, stops after step 1 (as a crash right after checkpoint-1 would).
    first = run_cli([sys.executable, "scripts/train.py", str(recipe), "--iteration", "1", "--max_steps", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    model_dir = run / "iter-1" / "model"
    assert_loadable(model_dir, tiny_model_dir)
    frozen = yaml.safe_load((run / "iter-1" / "train_config.yaml").read_text())
    assert frozen["training"]["learning_rate"] == 5.0e-4 and frozen["iteration"] == 1
    assert (run / "iter-1" / "checkpoints" / "checkpoint-1").is_dir()

    # The model never got written: a rerun resumes from checkpoint-1 and finishes the epoch.
    import shutil

    shutil.rmtree(model_dir)
    assert train_main()([str(recipe), "--iteration", "1"]) == 0
    assert "resuming iteration 1 from" in capsys.readouterr().out
    state = yaml.safe_load((run / "iter-1" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    # Step 1's log comes from checkpoint-1; a redone step 1 would log it twice.
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]
    assert_loadable(model_dir, tiny_model_dir)

    # A finished iteration is not retrained.
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert train_main()([str(recipe), "--iteration", "1"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name, first, end", [("zephyr", "<s>", "</s>"), ("llama3", "<|begin_of_text|>", "<|eot_id|>")])
def test_dry_run_shows_the_first_training_rows_tokens(name, first, end, paper_standin, smoke_recipe, capsys):
    """A user's first check on a real model: the first training row's tokens, BOS and end of turn, before any run."""
    import ast

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paper_standin(name))
    recipe = smoke_recipe(model_name_or_path=str(paper_standin(name)))
    assert train_main()([str(recipe), "--iteration", "1", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["iteration"] == 1  # the token lines are YAML comments
    lines = [line for line in out.splitlines() if line.startswith("#   ")]
    ids, tokens = (ast.literal_eval(line.split("]: ", 1)[1].strip()) for line in lines[:2])
    assert ids[0] == tokenizer.convert_tokens_to_ids(first) and ids.count(ids[0]) == 1
    assert tokens == tokenizer.convert_ids_to_tokens(ids) and tokens[0] == first
    assert end in lines[2] and f"end of turn '{end}'" in out
    assert not (recipe.parent / "run").exists()


def test_missing_reference_response_with_alpha_names_the_column(smoke_recipe, capsys):
    recipe = smoke_recipe()
    path = write_ranked(recipe.parent / "run", with_reference=False)
    with pytest.raises(SystemExit) as exit_:
        train_main()([str(recipe), "--iteration", "1"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # lines above it are datasets' progress bars
    assert last.startswith("error: ") and "'reference_response'" in last and str(path) in last


def test_non_finite_loss_stops_naming_the_step(smoke_recipe, capsys):
    # A learning rate past float32's range sends every weight to inf after step 1: step 2's loss is NaN.
    recipe = smoke_recipe(save_strategy="steps", save_steps=1, warmup_steps=0, lr_scheduler_type="constant",
                          learning_rate=[1.0e39, 1.0e39])
    run = recipe.parent / "run"
    write_ranked(run)
    with pytest.raises(SystemExit) as exit_:
        train_main()([str(recipe), "--iteration", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "at step 2" in err and "checkpoint-1" in err
    checkpoints = run / "iter-1" / "checkpoints"
    assert (checkpoints / "checkpoint-1").is_dir() and not (checkpoints / "checkpoint-2").exists()
    assert not (run / "iter-1" / "model").exists()


def test_iteration_zero_is_dpo_on_the_original_pairs(smoke_recipe, tiny_model_dir):
    recipe = smoke_recipe(dpo_iteration_zero=True, learning_rate=[5.0e-4, 5.0e-4, 2.0e-4], warmup_steps=0)
    assert train_main()([str(recipe), "--iteration", "0", "--max_steps", "1"]) == 0
    iter0 = recipe.parent / "run" / "iter-0"
    assert (iter0 / "portion.parquet").is_file() and not (iter0 / "ranked.parquet").exists()
    assert yaml.safe_load((iter0 / "train_config.yaml").read_text())["training"]["alpha"] == 0.0
    assert_loadable(iter0 / "model", tiny_model_dir)


def test_shared_iteration_zero_is_reused_only_with_the_same_settings(smoke_recipe, tmp_path, capsys):
    shared = tmp_path / "shared-iter0"
    common = dict(dpo_iteration_zero=True, learning_rate=[5.0e-4, 5.0e-4, 2.0e-4], warmup_steps=0,
                  iteration_zero_dir=str(shared))
    selm = smoke_recipe(**common, alpha=0.01)
    assert train_main()([str(selm), "--iteration", "0", "--max_steps", "1"]) == 0
    mtime = (shared / "model").stat().st_mtime_ns
    # the DPO run of the same base model: alpha differs only from iteration 1 on, so iteration 0 is shared
    dpo = smoke_recipe(**common, alpha=0.0, output_dir=str(tmp_path / "dpo-run"))
    capsys.readouterr()
    assert train_main()([str(dpo), "--iteration", "0", "--max_steps", "1"]) == 0
    assert "already trained" in capsys.readouterr().out and (shared / "model").stat().st_mtime_ns == mtime
    other = smoke_recipe(**common, alpha=0.0, beta=0.05, output_dir=str(tmp_path / "other-run"))
    with pytest.raises(SystemExit) as exit_info:
        train_main()([str(other), "--iteration", "0", "--max_steps", "1"])
    assert exit_info.value.code == 2
    assert "shared iteration 0 was trained with other settings (training.beta)" in capsys.readouterr().err


TWO_NODE_DATA_RUN = '''
import sys
from pathlib import Path

import selm.io
from selm.recipe.parse import parse_recipe
from selm.training import load_training_data_once

recipe, _ = parse_recipe([sys.argv[1], "--iteration", "0"], stage="train")
args = recipe.training_config(ddp_backend="gloo")
real_write = selm.io.write_parquet


def counted(table, path, **kwargs):
    print(f"rank {args.process_index} writes {Path(path).name}", flush=True)
    real_write(table, path, **kwargs)


selm.io.write_parquet = counted
print(f"rank {args.process_index} read {len(load_training_data_once(recipe, args))} rows", flush=True)
'''


# slow: two torchrun nodes, each importing the trainer stack (28 s here, on shared cores)
@pytest.mark.slow
def test_two_nodes_write_iteration_zeros_portion_once(smoke_recipe, tmp_path):
    """Two one-process "nodes" on this machine (torchrun --nnodes 2): each is its node's local main, and before they
    both wrote the shared portion.parquet at once. The global main writes it; the other reads it."""
    import re
    import socket

    recipe = smoke_recipe(dpo_iteration_zero=True, learning_rate=[5.0e-4, 5.0e-4, 2.0e-4])
    script = tmp_path / "load.py"
    script.write_text(TWO_NODE_DATA_RUN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(script), str(recipe)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    stdout = "".join(out for out, _ in outputs)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert re.findall(r"rank \d writes portion.parquet", stdout) == ["rank 0 writes portion.parquet"]
    import pyarrow.parquet as pq

    rows = pq.read_table(recipe.parent / "run/iter-0/portion.parquet").num_rows
    assert sorted(re.findall(r"rank (\d) read (\d+) rows", stdout)) == [("0", str(rows)), ("1", str(rows))]


# In `make test` on purpose (slow: only `make test-fast` skips it): the multi-process ZeRO-3 path is the one that
# breaks silently on clusters.
# ~30 s once DeepSpeed's CPU communication extension is built (its first build adds about a minute, once).
@pytest.mark.slow
def test_two_process_zero3_cpu_run_saves_a_loadable_model(smoke_recipe, tiny_model_dir):
    recipe = smoke_recipe(warmup_steps=0)
    run = recipe.parent / "run"
    write_ranked(run)
    result = run_cli([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        "recipes/accelerate_configs/cpu_zero3.yaml", "--num_processes", "2",
        "scripts/train.py", str(recipe), "--iteration", "1", "--ddp_backend", "gloo",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_loadable(run / "iter-1" / "model", tiny_model_dir)
    frozen = yaml.safe_load((run / "iter-1" / "train_config.yaml").read_text())
    # 2 processes x 8 per device x 1 accumulation step: the recipe's global batch of 16, unchanged.
    assert frozen["num_processes"] == 2 and frozen["training"]["gradient_accumulation_steps"] == 1
    assert frozen["effective_global_batch"] == 16
    # run_info.json: one record for the launch (rank 1 records nothing), with how it was launched
    import json

    launch, = json.loads((run / "run_info.json").read_text())["launches"]
    assert (launch["stage"], launch["iteration"], launch["status"]) == ("train", 1, "finished")
    assert launch["launcher"] == {"num_processes": 2, "distributed_type": "DEEPSPEED", "mixed_precision": "no",
                                  "deepspeed_zero_stage": 3}

    # Same recipe, one plain process (2 accumulation steps): the same optimizer steps, so the same weights.
    (run / "iter-1" / "model").rename(run / "model-zero3")
    assert train_main()([str(recipe), "--iteration", "1"]) == 0
    single = json.loads((run / "run_info.json").read_text())["launches"][-1]["launcher"]
    assert single["num_processes"] == 1 and single["distributed_type"] == "NO" and "deepspeed_zero_stage" not in single
    zero3, single, start = (flat_weights(p) for p in (run / "model-zero3", run / "iter-1" / "model", tiny_model_dir))
    update = (single - start).norm()
    assert update > 0.01 and (zero3 - single).norm() < 1e-3 * update


def flat_weights(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return torch.cat([p.detach().flatten() for p in model.parameters()])
