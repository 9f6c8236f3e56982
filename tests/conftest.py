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
def fixture_dir(tmp_path_factory):
    """The fixture in the UltraFeedback schema as a directory of splits: train_prefs.jsonl (100 rows) and
    test_prefs.jsonl (40 held-out rows whose questions never occur in train_prefs)."""
    from selm.standins.tiny import fixture_splits

    path = tmp_path_factory.mktemp("data") / "fixture"
    path.mkdir()
    for split, rows in fixture_splits(100, 40).items():
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def fixture_file(fixture_dir):
    """The fixture's 100 training rows, as one JSON-lines file."""
    return fixture_dir / "train_prefs.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (head_dim 64) with a locally trained tokenizer, saved as an ordinary model directory."""
    from selm.standins.tiny import save_tiny_model

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
def smoke_recipe(tmp_path, fixture_dir, tiny_model_dir):
    """Returns a function taking {key: value} overrides and returning the path of a smoke recipe in tmp_path."""

    def make(**overrides):
        return write_smoke_recipe(tmp_path, tiny_model_dir, fixture_dir, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_pairrm_dir(tmp_path_factory):
    from selm.standins.tiny_ranker import save_tiny_pairrm

    path = tmp_path_factory.mktemp("rankers") / "tiny-pairrm"
    save_tiny_pairrm(path)
    return path


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory):
    from selm.standins.tiny_ranker import save_tiny_reward_model

    path = tmp_path_factory.mktemp("rankers") / "tiny-rm"
    save_tiny_reward_model(path)
    return path


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory):
    """The tiny Llama with an untied, larger-scale output layer, so greedy output depends on the prompt.

    The session's tiny model (tied embeddings, small init) greedily repeats the last prompt token for every
    prompt; order and agreement checks need outputs that differ between prompts, with clear top-1 margins.
    """
    import torch
    from transformers import LlamaForCausalLM

    from selm.standins.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    base = build_model(tokenizer, seed=1)
    config = base.config
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 3.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    model.generation_config = base.generation_config
    path = tmp_path_factory.mktemp("models") / "varied-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The tiny-model setup of the trainer tests (test_trainer, test_trainer_parity, test_prefix_sharing). Module scope: each
# test module gets its own copies, so a module that trains them cannot change another module's starting point.
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tokenizer):
    """(policy, reference): the saved tiny model and a differently initialised one, so that πθ ≠ πref."""
    import torch
    from transformers import AutoModelForCausalLM

    from selm.standins.tiny import build_model

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return policy, build_model(tokenizer, seed=1)


@pytest.fixture(scope="session")
def paper_standin(tmp_path_factory):
    """`paper_standin(name)`: the directory of an offline stand-in of a paper model (selm/standins), built once.

    Names: 'zephyr', 'llama3' (today's hub files), 'llama3-first-release' (eos <|end_of_text|> only)."""
    from selm.standins.paper_models import save_standin

    built = {}

    def get(name):
        if name not in built:
            built[name] = save_standin(name, tmp_path_factory.mktemp("paper") / name)
        return built[name]

    return get
