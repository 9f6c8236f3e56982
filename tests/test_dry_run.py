"""`--dry_run` of every stage script: the iteration's resolved recipe printed as YAML, no model loaded, nothing
written. A GPU recipe resolves on this CPU machine: its DPOConfig (which would insist on a GPU for bf16) is not built.
"""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO

# The script's main for iterations 1 and 2 in one fresh process (each printout its own YAML document), then the
# model code that got imported: any architecture's transformers modeling module (the auto mapping is no model), or
# llm-blender's ranker.
RUN_DRY = """
import importlib.util, json, sys
import transformers.trainer_utils  # imports peft where installed, and peft imports one model's code (bloom) itself
already = set(sys.modules)
script, argv = sys.argv[1], sys.argv[2:]
spec = importlib.util.spec_from_file_location("stage_script", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for iteration in ("1", "2"):
    print("---")
    code = module.main([*argv, "--iteration", iteration, "--dry_run"])
    assert code in (0, None), code
print("---")
model_code = [m for m in set(sys.modules) - already if m.startswith("llm_blender")
              or (m.startswith("transformers.models.") and ".modeling_" in m and ".auto." not in m)]
print(json.dumps({"model_code": sorted(model_code)}))
"""

# recipes/llama-3-8b-instruct/selm.yaml, docs/DESIGN.md §2: learning rate per iteration; a global batch of 128 over
# 8 processes at its per-device batch is 4 accumulation steps.
LEARNING_RATE = {1: 5e-7, 2: 3e-7}


@pytest.mark.parametrize("stage", ["generate", "rank", "train", "evaluate"])
def test_dry_run_prints_the_iteration_and_loads_no_model(stage, tmp_path):
    not_built = tmp_path / "not-built-yet"
    result = subprocess.run(
        [sys.executable, "-c", RUN_DRY, str(REPO / "scripts" / f"{stage}.py"),
         str(REPO / "recipes/llama-3-8b-instruct/selm.yaml"), "--num_processes", "8",
         "--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(not_built),
         "--ranker", "pairrm", "--ranker_model_name_or_path", "/nowhere"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    *printed, imported = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    assert [p["iteration"] for p in printed] == [1, 2]
    for p in printed:
        assert p["stage"] == stage and p["effective_global_batch"] == 128
        assert p["training"]["learning_rate"] == pytest.approx(LEARNING_RATE[p["iteration"]])
        assert p["training"]["gradient_accumulation_steps"] == 4
        assert p["ranking"]["ranker"] == "pairrm" and p["ranking"]["ranker_model_name_or_path"] == "/nowhere"
    assert printed[0]["start_model"] == str(not_built)
    assert printed[1]["start_model"] == str(tmp_path / "run" / "iter-1" / "model")
    assert imported == {"model_code": []}
    assert not (tmp_path / "run").exists()
