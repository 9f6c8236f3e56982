"""Scorers: callables `(prompts, candidates) -> scores` (higher is better), for ranking (selm/ranking.py) and
held-out evaluation (selm/evaluation.py).

Prompts are message lists (system message and earlier turns included), with one list of candidate strings per
prompt. `build_scorer` gives the one a recipe's RankingArguments name: a known reward (`oracle`), llm-blender's
PairRM, or a sequence-classification reward model; model rankers run on every visible GPU (one process each over
contiguous shards, `ShardedScorer`).
"""

import importlib
from pathlib import Path

from selm.chat import ConversationTokens
from selm.errors import SELMError


def load_function(spec: str | None, key: str = "oracle_reward"):
    """'package.module:function' -> the function, by import (never eval)."""
    if not spec or spec.count(":") != 1 or not all(spec.split(":")):
        raise SELMError(f"{key}: expected 'module:function', got {spec!r}")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise SELMError(f"{key}: module {module_name!r} not found") from None
        raise  # a module that exists but fails inside its own imports is a bug in it, shown in full
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SELMError(f"{key}: {module_name!r} has no function {function_name!r}")
    return function


class OracleScorer:
    """A known reward `function(prompt_messages, response) -> float` (e.g. selm.standins.tiny:fixture_reward)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.function = load_function(spec)

    def __call__(self, prompts, candidates):
        scores = []
        for i, (prompt, cands) in enumerate(zip(prompts, candidates)):
            row = []
            for j, cand in enumerate(cands):
                value = self.function(prompt, cand)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise SELMError(f"oracle_reward {self.spec}: returned {value!r} (row {i}, candidate {j}); "
                                    f"expected a number")
                row.append(float(value))
            scores.append(row)
        return scores


# llm-blender's collator marks the source and candidates with these tokens and locates them by id; a literal copy
# inside a text would give two marks and break the forward, so they are removed from texts first.
PAIRRM_MARKERS = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")


def _strip_markers(text: str) -> str:
    for marker in PAIRRM_MARKERS:
        text = text.replace(marker, "")
    return text


def pairrm_source(messages) -> str:
    """The text PairRM sees as the instruction: the user's message, or the whole conversation when there is more."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


class PairRMScorer:
    """llm-blender PairRM: every candidate compared with every other ([A,B] and [B,A]); score = mean logit margin.

    `batch_size` is the number of candidate pairs per forward. The checkpoint's own source/candidate token limits
    apply (PairRM: 1224 / 412); a longer conversation is cut from the left here, so the turn being answered stays.
    """

    def __init__(self, name_or_path: str, batch_size: int = 16, device: str | None = None, dtype: str = "float32"):
        from selm.compat.llm_blender import load_pairrm

        self.blender = load_pairrm(name_or_path, device=device, dtype=dtype)
        self.batch_size = batch_size

    def _fit_source(self, text: str) -> str:
        tokenizer = self.blender.ranker_tokenizer
        limit = self.blender.ranker_config.source_maxlength - 4  # room for [CLS], <|source|>, [SEP] and one spare
        ids = tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= limit else tokenizer.decode(ids[-limit:])

    def __call__(self, prompts, candidates):
        sources = [self._fit_source(_strip_markers(pairrm_source(p))) for p in prompts]
        cands = [[_strip_markers(c) for c in row] for row in candidates]
        scores = [None] * len(prompts)
        # llm-blender ranks equal-sized candidate lists only; group rows by their candidate count.
        for size in sorted({len(c) for c in cands}):
            index = [i for i, c in enumerate(cands) if len(c) == size]
            out = self.blender.rank([sources[i] for i in index], [cands[i] for i in index], return_scores=True,
                                    batch_size=self.batch_size)
            for i, row in zip(index, out):
                scores[i] = [float(s) for s in row]
        return scores


class RewardModelScorer:
    """A sequence-classification reward model (num_labels = 1) scoring prompt + answer through its chat template.

    Sequences longer than `max_length` tokens keep their last `max_length` tokens (the answer and the position the
    model reads its score from) and are counted in `self.truncated`. Without a pad token, sequences go one by one
    (the model cannot find the end of a padded sequence then).
    """

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int = 2048, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from selm.compat.llm_blender import auto_device, check_hub_id
        from selm.models import check_weights

        if Path(name_or_path).is_dir():
            check_weights(name_or_path)
        else:
            check_hub_id(name_or_path)
        self.device = auto_device(device)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=dtype)
        except OSError as e:  # transformers' "not found / cannot connect" for a hub id
            raise SELMError(f"reward model '{name_or_path}' could not be loaded: {str(e).splitlines()[0]}") from e
        if not self.tokenizer.chat_template:
            raise SELMError(f"reward model {name_or_path}: its tokenizer has no chat template")
        self.model = model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise SELMError(f"reward model {name_or_path}: num_labels is {self.model.config.num_labels}; "
                            f"a reward model has one output")
        self.tokens = ConversationTokens(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size if self.pad_id is not None else 1
        self.max_length = max_length
        self.truncated = 0

    def encode(self, prompt, answer) -> list[int]:
        # One BOS where the tokenizer adds one, never two, kept when the left is cut (selm/chat.py).
        ids = self.tokens.encode(prompt + [{"role": "assistant", "content": answer}])
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = self.tokens.keep_prompt_end(ids, self.max_length)
        return ids

    def __call__(self, prompts, candidates):
        import torch

        sequences, self.truncated_per_row = [], []
        for prompt, cands in zip(prompts, candidates):
            before = self.truncated
            sequences += [self.encode(prompt, c) for c in cands]
            self.truncated_per_row.append(self.truncated - before)
        flat = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(sequences[i]) for i in batch)
                ids = torch.full((len(batch), width), self.pad_id if self.pad_id is not None else 0)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                    mask[row, :len(sequences[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for row, i in enumerate(batch):
                    flat[i] = float(logits[row, 0])
        scores, at = [], 0
        for cands in candidates:
            scores.append(flat[at:at + len(cands)])
            at += len(cands)
        return scores


def _score_shard(items, ranking: dict):
    """Worker of ShardedScorer (module level, so a spawned process can import it): score (prompt, candidates) items."""
    from selm.recipe.schema import RankingArguments

    scorer = build_scorer(RankingArguments(**ranking), num_workers=1)
    scores = scorer([p for p, _ in items], [c for _, c in items])
    truncated = getattr(scorer, "truncated_per_row", [0] * len(items))
    return list(zip(scores, truncated))


class ShardedScorer:
    """A model ranker on several GPUs: contiguous shards of the rows, one process per GPU (selm.parallel), merged in
    order. Each process loads its own copy of the model on the one GPU it sees."""

    def __init__(self, ranking, num_workers: int):
        import dataclasses

        from selm.compat.llm_blender import check_hub_id

        if not Path(ranking.ranker_model_name_or_path).is_dir():  # fail before starting any process
            check_hub_id(ranking.ranker_model_name_or_path)
        self.ranking = dataclasses.asdict(ranking)
        self.num_workers = num_workers
        self.truncated = 0

    def __call__(self, prompts, candidates):
        from selm.parallel import run_sharded

        items = list(zip(prompts, candidates))
        results = run_sharded(_score_shard, items, min(self.num_workers, len(items)), ranking=self.ranking)
        self.truncated = sum(t for _, t in results)
        return [s for s, _ in results]


def default_num_workers() -> int:
    """One ranking process per visible GPU; 1 on CPU."""
    from selm.parallel import visible_devices

    return len(visible_devices() or [None])


def build_scorer(ranking, device: str | None = None, num_workers: int | None = None):
    """The scorer a recipe's RankingArguments name. Model rankers use every visible GPU unless num_workers says."""
    if ranking.ranker in ("pairrm", "reward_model"):
        num_workers = default_num_workers() if num_workers is None else num_workers
        if num_workers > 1:
            return ShardedScorer(ranking, num_workers)
    if ranking.ranker == "oracle":
        return OracleScorer(ranking.oracle_reward)
    if ranking.ranker == "pairrm":
        return PairRMScorer(ranking.ranker_model_name_or_path, ranking.ranker_batch_size, device,
                            ranking.pairrm_dtype)
    # the one ranker left: RankingArguments checked `ranker` against its choices when it was built
    return RewardModelScorer(ranking.ranker_model_name_or_path, ranking.ranker_batch_size,
                             ranking.ranker_max_length, device)
