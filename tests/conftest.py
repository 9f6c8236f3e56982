"""Shared fixtures: everything is built locally; the hub is switched off for the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# The test models are tiny: with 2 threads on 2 busy cores a 128x256 matmul took 3.5 ms, with 1 thread 27 us.
# Set in the environment so the stage subprocesses (make, accelerate, vLLM workers) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fixture_file(tmp_path_factory):
    """The 100-row fixture in the UltraFeedback schema, as JSON lines."""
    from selm.tiny import fixture_rows

    path = tmp_path_factory.mktemp("data") / "fixture.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fixture_rows(100)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (head_dim 64) with a locally trained tokenizer, saved as an ordinary model directory."""
    from selm.tiny import save_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_tiny_model(path)
    return path


def script_main(name: str):
    """`main` of scripts/<name>.py, loaded as a module (scripts/ is not a package): runs a stage in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"selm_{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_smoke_recipe(directory: Path, model_dir, data_file, **overrides) -> Path:
    """A copy of recipes/smoke/selm.yaml using the given model and data, with its run dir under `directory`."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes/smoke/selm.yaml").read_text())
    recipe.update(model_name_or_path=str(model_dir), dataset_name=str(data_file), output_dir=str(directory / "run"))
    recipe.update(overrides)
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def smoke_recipe(tmp_path, fixture_file, tiny_model_dir):
    """Returns a function taking {key: value} overrides and returning the path of a smoke recipe in tmp_path."""

    def make(**overrides):
        return write_smoke_recipe(tmp_path, tiny_model_dir, fixture_file, **overrides)

    return make
