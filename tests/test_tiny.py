"""The offline tiny model and fixture: built locally, reloadable with the ordinary Auto classes, deterministic."""

import json

import torch

from selm.standins.tiny import fixture_reward, fixture_rows


def test_tiny_model_reloads_with_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama" and model.config.head_dim == 64
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nWhat is 2 + 3?</s>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1  # no double BOS/specials
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    assert model.generation_config.eos_token_id == [tok.eos_token_id]


def test_tiny_build_is_deterministic(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from selm.standins.tiny import save_tiny_model
    save_tiny_model(tmp_path / "again")
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text()) == json.loads((tiny_model_dir / "tokenizer.json").read_text())


def test_fixture_is_deterministic_multi_turn_and_oracle_scorable(fixture_file):
    rows = [json.loads(line) for line in fixture_file.read_text().splitlines()]
    assert rows == fixture_rows(100) and len({r["prompt_id"] for r in rows}) == 100
    assert sum(len(r["chosen"]) > 2 for r in rows) >= 20
    assert any(r["chosen"][0]["role"] == "system" for r in rows)
    for r in rows:
        prompt = r["chosen"][:-1]
        assert fixture_reward(prompt, r["chosen"][-1]["content"]) == 1.0
        assert fixture_reward(prompt, r["rejected"][-1]["content"]) == 0.0
        assert fixture_reward(prompt, "   ") == 0.0


def _standin_references(path):
    """Where a module imports selm.standins or names it in a string that is not a docstring (e.g. a default oracle)."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names = [node.value]
        if any(n.startswith("selm.standins") for n in names):
            yield f"{path}:{node.lineno}"


def test_no_library_module_reaches_the_standins():
    from pathlib import Path

    import selm

    package = Path(selm.__file__).parent
    library = [p for p in package.rglob("*.py") if "standins" not in p.relative_to(package).parts]
    assert len(library) > 20  # the scan saw the library
    assert [ref for p in library for ref in _standin_references(p)] == []
