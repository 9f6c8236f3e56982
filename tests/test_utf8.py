"""Every text file the project reads or writes is UTF-8 whatever the locale (questions, answers, recipes, reports)."""

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

QUESTION = "Was kostet ein Brötchen in Zürich? 日本語で答えて — «merci»"
# An ASCII-only locale with Python's UTF-8 mode off: the locale's encoding is ASCII, so any text file opened without
# an explicit encoding fails to read (or write) these characters. A Latin-1 locale garbles them instead.
ASCII_LOCALE = {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii:backslashreplace"}


def _text_calls_without_encoding(path):
    """(line, call) of each text-mode open/read_text/write_text/subprocess text call that names no encoding."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or "encoding" in {k.arg for k in node.keywords}:
            continue
        func, keywords = node.func, {k.arg: k.value for k in node.keywords}
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "os":
            continue  # os.open: a file descriptor, no text layer
        if name == "run" and ({"text", "universal_newlines"} & set(keywords)):
            yield node.lineno, "subprocess.run(text=True)"
            continue
        if name == "open":
            mode = keywords.get("mode") or (node.args[0] if isinstance(func, ast.Attribute) and node.args else
                                            node.args[1] if len(node.args) > 1 else None)
            if isinstance(mode, ast.Constant) and "b" in str(mode.value):
                continue
        elif not (isinstance(func, ast.Attribute) and name in ("read_text", "write_text")):
            continue  # selm.io.write_text(path, text) is the project's own writer (UTF-8 itself)
        yield node.lineno, name


def test_every_text_open_in_the_project_names_utf8():
    found = [f"{path.relative_to(REPO)}:{line}: {call}"
             for folder in ("selm", "scripts", "benchmarks") for path in sorted((REPO / folder).rglob("*.py"))
             for line, call in _text_calls_without_encoding(path)]
    assert not found, "text I/O in the locale's encoding:\n" + "\n".join(found)


@pytest.mark.slow  # over 10 s here: make test-fast leaves it out
def test_export_reads_and_writes_utf8_under_an_ascii_locale(smoke_recipe, varied_model_dir, tmp_path):
    """Recipe (with a non-ASCII comment), question file and answer file under LC_ALL=C: the bytes are UTF-8."""
    recipe = smoke_recipe(model_name_or_path=str(varied_model_dir), max_new_tokens=4)
    recipe.write_bytes(f"# Rezept für die Übung: {QUESTION}\n".encode() + recipe.read_bytes())
    questions = tmp_path / "questions.json"
    questions.write_bytes(json.dumps([{"instruction": QUESTION, "dataset": "café"}], ensure_ascii=False).encode())
    out = tmp_path / "model_outputs.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env.update(ASCII_LOCALE, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "scripts/export_answers.py", str(recipe), "--iteration", "base",
                           "--format", "alpaca_eval", "--questions", str(questions), "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    raw = out.read_bytes()
    assert QUESTION.encode("utf-8") in raw and "café".encode("utf-8") in raw  # written as UTF-8, not escaped
    records = json.loads(raw.decode("utf-8"))
    assert [(r["instruction"], r["dataset"]) for r in records] == [(QUESTION, "café")]
