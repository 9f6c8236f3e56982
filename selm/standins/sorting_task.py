"""The demo's task: sort a short list of integers, with an exact, graded reward (docs/DESIGN.md §7).

    prompt    "Sort in ascending order: 42 7 93 15 7"
    answer    "7 7 15 42 93"

`reward(prompt_messages, response)` is in [0, 1]: the response must be integers separated by whitespace (anything
else, the empty answer included, is malformed and scores 0); it scores

    LCS(response numbers, sorted input) / max(len(response numbers), len(sorted input))

so a perfect answer scores 1 and every misplaced, missing, extra or wrong number costs about one element: answers
are graded by how many numbers are out of place. (Matching position by position would score an answer that only
drops its first number 0.) Pipeline key: `oracle_reward: selm.standins.sorting_task:reward`.

Preference data (UltraFeedback schema, `task_splits`): `train_prefs` pairs two corrupted copies of the right answer
(chosen 0-2 corruptions, rejected 2-4) ordered by a noisy annotator, so the chosen answer is usually, not always,
the better one and is rarely perfect; `test_prefs` holds the held-out prompts with the right answer as chosen (the
evaluation's reference answer). Held-out prompts never appear in train_prefs or the SFT demonstrations.
Everything is a function of the seed.
"""

import hashlib
import json
import random
import re
from pathlib import Path

from selm.errors import SELMError

# Bump when the generated data changes for a given seed, so cached builds are redone.
TASK_VERSION = 1
PROMPT_PREFIX = "Sort in ascending order:"
MIN_LENGTH, MAX_LENGTH, MAX_VALUE = 4, 6, 99
SPLITS = ("train_prefs", "test_prefs")
ANSWER = re.compile(r"\s*\d+(?:\s+\d+)*\s*")


# ---- prompts and the reward ----
def prompt_text(numbers: list[int]) -> str:
    return f"{PROMPT_PREFIX} {' '.join(map(str, numbers))}"


def numbers_in_prompt(prompt_messages: list[dict]) -> list[int]:
    """The list to sort, read from the last user message; any other text is an error naming it."""
    content = prompt_messages[-1]["content"] if prompt_messages else ""
    match = re.fullmatch(re.escape(PROMPT_PREFIX) + r" (\d+(?: \d+)*)", content)
    if not match:
        raise SELMError(f"selm.standins.sorting_task: not a sorting prompt: {content!r}")
    return [int(n) for n in match[1].split()]


def answer_text(numbers: list[int]) -> str:
    return " ".join(map(str, numbers))


def _lcs_length(a: list[int], b: list[int]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def reward(prompt_messages: list[dict], response: str) -> float:
    """Exact graded reward of `response` to a sorting prompt (see the module docstring)."""
    target = sorted(numbers_in_prompt(prompt_messages))
    if not ANSWER.fullmatch(response):
        return 0.0
    answer = [int(n) for n in response.split()]
    return _lcs_length(answer, target) / max(len(answer), len(target))


# ---- imperfect answers ----
def corrupt(numbers: list[int], count: int, rng: random.Random) -> list[int]:
    """`count` random edits of a list: swap neighbours, swap any two, replace, drop or insert a number."""
    out = list(numbers)
    for _ in range(count):
        kind = rng.choice(["swap_adjacent", "swap_any", "replace", "drop", "insert"])
        if kind == "drop" and len(out) > 1:
            out.pop(rng.randrange(len(out)))
        elif kind == "insert" or len(out) < 2:
            out.insert(rng.randrange(len(out) + 1), rng.randint(0, MAX_VALUE))
        elif kind == "replace":
            out[rng.randrange(len(out))] = rng.randint(0, MAX_VALUE)
        else:
            i = rng.randrange(len(out) - 1)
            j = i + 1 if kind == "swap_adjacent" else rng.randrange(i + 1, len(out))
            out[i], out[j] = out[j], out[i]
    return out


def _annotator_score(messages: list[dict], answer: str, rng: random.Random, noise: float) -> float:
    """An annotator's 1-10 rating: the true reward blurred by Gaussian noise (UltraFeedback's scores are GPT-4's)."""
    value = min(1.0, max(0.0, reward(messages, answer) + rng.gauss(0.0, noise)))
    return round(1 + 9 * value, 2)


def preference_row(numbers: list[int], rng: random.Random, held_out: bool, noise: float = 0.15) -> dict:
    """One UltraFeedback-schema row. Training rows: the noisy annotator's better-rated of two corrupted answers is
    chosen. Held-out rows: the right answer is chosen (the evaluation's reference)."""
    prompt = prompt_text(numbers)
    messages = [{"role": "user", "content": prompt}]
    right = sorted(numbers)
    rejected = answer_text(corrupt(right, rng.randint(2, 4), rng))
    while held_out and rejected == answer_text(right):  # edits can cancel out; a held-out pair is a real pair
        rejected = answer_text(corrupt(right, rng.randint(2, 4), rng))
    if held_out:
        chosen, score_chosen, score_rejected = answer_text(right), 10.0, _annotator_score(messages, rejected, rng, 0.0)
    else:
        first = answer_text(corrupt(right, rng.choices([0, 1, 2], weights=[0.15, 0.45, 0.4])[0], rng))
        rated = sorted([(_annotator_score(messages, first, rng, noise), 0, first),
                        (_annotator_score(messages, rejected, rng, noise), 1, rejected)], reverse=True)
        (score_chosen, _, chosen), (score_rejected, _, rejected) = rated
    chosen_messages = messages + [{"role": "assistant", "content": chosen}]
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),  # as UltraFeedback's ids
        "chosen": chosen_messages,
        "rejected": messages + [{"role": "assistant", "content": rejected}],
        "messages": chosen_messages,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


# ---- the data of one seed ----
def distinct_prompts(seed: int, counts: dict[str, int]) -> dict[str, list[list[int]]]:
    """Number lists per named group, all prompt texts distinct within and across groups. Each group draws from its
    own random stream and skips the texts of the groups before it, so a group's lists depend on the sizes of the
    earlier groups only through (rare) collisions, and not at all on the groups after it."""
    seen, out = set(), {}
    for name, count in counts.items():
        rng = random.Random(f"sorting-prompts-{seed}-{name}")
        out[name] = []
        while len(out[name]) < count:
            numbers = [rng.randint(0, MAX_VALUE) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH))]
            if prompt_text(numbers) not in seen:
                seen.add(prompt_text(numbers))
                out[name].append(numbers)
    return out


def task_splits(seed: int, train_rows: int, test_rows: int, sft_examples: int = 0,
                validation_prompts: int = 0) -> dict[str, list[dict]]:
    """{'train_prefs', 'test_prefs'} preference rows, 'sft' demonstrations (trl's conversational prompt-completion
    format, right answers) and 'validation' prompts (message lists, for the SFT stop), all prompts distinct.

    train_prefs is drawn last: the base model (SFT and validation prompts) does not depend on its size, and the
    first N rows of train_prefs are the same whatever its size."""
    prompts = distinct_prompts(seed, {"test_prefs": test_rows, "validation": validation_prompts,
                                      "sft": sft_examples, "train_prefs": train_rows})
    out = {}
    for split in SPLITS:
        rng = random.Random(f"sorting-{split}-{seed}")
        out[split] = [preference_row(n, rng, held_out=split == "test_prefs") for n in prompts[split]]
    out["sft"] = [{"prompt": [{"role": "user", "content": prompt_text(n)}],
                   "completion": [{"role": "assistant", "content": answer_text(sorted(n))}]} for n in prompts["sft"]]
    out["validation"] = [[{"role": "user", "content": prompt_text(n)}] for n in prompts["validation"]]
    return out


def write_preference_data(directory, splits: dict[str, list[dict]], settings: dict) -> None:
    """`<directory>/<split>.jsonl` per preference split and settings.json, renamed into place as one directory."""
    from selm.io import atomic_path

    with atomic_path(directory) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            text = "".join(json.dumps(row) + "\n" for row in splits[split])
            (tmp / f"{split}.jsonl").write_text(text, encoding="utf-8")
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def read_split(directory, split: str) -> list[dict]:
    path = Path(directory) / f"{split}.jsonl"
    if not path.is_file():
        raise SELMError(f"missing split file: {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tokenizer_corpus() -> list[str]:
    """Texts for the task's BPE: every number 0-MAX_VALUE with and without a leading space (a BPE trained only on
    spaced lists splits an answer's unspaced first number), and the prompt's words."""
    numbers = [str(n) for n in range(MAX_VALUE + 1)]
    return ["".join(f" {n}" for n in numbers), "".join(f"{n}\n" for n in numbers), PROMPT_PREFIX] * 20
