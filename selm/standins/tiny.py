"""The offline default: a fixture in the UltraFeedback schema, a locally trained tokenizer and a tiny Llama.

Nothing here downloads anything. The fixture's prompts are small tasks with a checkable answer (arithmetic,
reversing a word, counting letters), so `fixture_reward` can serve as an oracle ranker.
"""

import random
import re

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "forest", "candle", "rocket", "garden", "silver"]
SYSTEM_PROMPTS = ["You are a careful assistant.", "Answer briefly and correctly."]


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(question, correct answer, wrong answer)."""
    kind = rng.choice(["add", "multiply", "reverse", "count"])
    if kind == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.choice([-2, -1, 1, 3])}."
    if kind == "multiply":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", f"{a} * {b} = {a * b + rng.choice([-3, 1, 2])}."
    word = rng.choice(WORDS)
    if kind == "reverse":
        wrong = word[1:] + word[0]
        return f"Reverse the word {word}.", f"The word {word} reversed is {word[::-1]}.", f"The word {word} reversed is {wrong}."
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return (
        f"How many times does the letter {letter} appear in {word}?",
        f"The letter {letter} appears {n} times in {word}.",
        f"The letter {letter} appears {n + 1} times in {word}.",
    )


def fixture_rows(num_rows: int = 100, seed: int = 0, exclude_prompts=(), id_prefix: str = "fixture") -> list[dict]:
    """Deterministic rows in the UltraFeedback schema; every 5th is multi-turn, every 7th has a system message.

    Rows whose final question is in `exclude_prompts` are skipped (a held-out split never repeats a training prompt).
    """
    rng = random.Random(seed)
    exclude = set(exclude_prompts)
    rows = []
    while len(rows) < num_rows:
        i = len(rows)
        question, good, bad = _task(rng)
        history = []
        if i % 7 == 3:
            history.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if i % 5 == 4:
            q0, a0, _ = _task(rng)
            history += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
        if question in exclude:
            continue
        history.append({"role": "user", "content": question})
        chosen = history + [{"role": "assistant", "content": good}]
        rejected = history + [{"role": "assistant", "content": bad}]
        rows.append({
            "prompt": question,
            "prompt_id": f"{id_prefix}-{i:04d}",
            "chosen": chosen,
            "rejected": rejected,
            "messages": chosen,
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        })
    return rows


def fixture_splits(num_train: int = 100, num_test: int = 40, seed: int = 0) -> dict[str, list[dict]]:
    """{'train_prefs': rows, 'test_prefs': held-out rows}: the held-out questions never occur in the training rows."""
    train = fixture_rows(num_train, seed)
    test = fixture_rows(num_test, seed + 1, exclude_prompts={r["prompt"] for r in train}, id_prefix="fixture-test")
    return {"train_prefs": train, "test_prefs": test}


def _expected_answer(question: str) -> str | None:
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"What is (\d+) \* (\d+)\?", question):
        return str(int(m[1]) * int(m[2]))
    if m := re.fullmatch(r"Reverse the word (\w+)\.", question):
        return m[1][::-1]
    if m := re.fullmatch(r"How many times does the letter (\w) appear in (\w+)\?", question):
        return str(m[2].count(m[1]))
    return None


def fixture_reward(prompt_messages: list[dict], response: str) -> float:
    """Oracle reward for fixture prompts: 1 if the response's last number/word is the right answer, else 0.

    Longer-than-needed answers are not penalised; an empty response scores 0.
    """
    expected = _expected_answer(prompt_messages[-1]["content"])
    if expected is None:
        raise ValueError(f"not a fixture prompt: {prompt_messages[-1]['content']!r}")
    tokens = re.findall(r"[A-Za-z]+|\d+", response)
    if expected.isdigit():
        numbers = [t for t in tokens if t.isdigit()]
        return float(bool(numbers) and numbers[-1] == expected)
    return float(expected in tokens)


def _corpus(rows: list[dict]) -> list[str]:
    texts = []
    for row in rows:
        for column in ("chosen", "rejected"):
            texts += [m["content"] for m in row[column]]
    texts += SYSTEM_PROMPTS + [" ".join(WORDS), "0 1 2 3 4 5 6 7 8 9 + * = ? ."]
    return texts


def build_tokenizer(vocab_size: int = 512, rows: list[dict] | None = None):
    """A byte-level BPE tokenizer trained on the fixture, with special tokens and the chat template."""
    return train_tokenizer(_corpus(rows or fixture_rows()), vocab_size)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with SPECIAL_TOKENS (EOS `</s>`) and CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_model(tokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                intermediate_size: int = 256, max_position_embeddings: int = 512, seed: int = 0):
    """A randomly initialised Llama. head_dim = hidden_size / num_heads; vLLM's CPU attention needs 64."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def save_tiny_model(out_dir, **sizes) -> None:
    """Build tokenizer + model and save them as one ordinary model directory, atomically."""
    from selm.io import atomic_path

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, **sizes)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
