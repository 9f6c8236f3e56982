"""Ranking (Algorithm 1, step 3): score every candidate answer of a prompt and rewrite its preference pair.

Candidates of a row, in this order: its generated responses (`responses`; the first is `reference_response`), then
the dataset's original chosen answer, then its original rejected answer. With n generated responses the original
chosen is candidate n and the original rejected candidate n + 1.

Scores: higher is better. Ties are broken by candidate order, so every decision is deterministic: of two equal
scores the candidate with the lower index ranks higher (a generated response over the dataset's answers, the
dataset's chosen over its rejected). Hence `best` = the lowest index among the top scores and `worst` = the highest
index among the bottom scores.

Update rules (recipe `update_rule`):
- `best_worst` (the paper): chosen = best candidate, rejected = worst candidate.
- `replace` (paper, Appendix C: "compare y_w and y_ref and replace the chosen or rejected response by y_ref based on
  the comparison result"): if y_ref ranks above the original chosen (with the tie rule: score >= its score) the pair
  becomes (y_ref, original rejected), otherwise (original chosen, y_ref). Only y_ref (the first response) takes part.
- `original` (stepwise DPO): the dataset's pair is kept; scores are still computed and kept for the report.

A row whose new chosen and rejected have equal scores carries no preference. `on_tie: drop` moves it to
`ranking_dropped.parquet` with reason "tie"; `on_tie: keep` keeps it with the pair the rule picked. `original` never
drops a row: it trains on the dataset's pairs by definition. If every row is dropped the stage fails (after writing
the drops and the report) instead of leaving an empty ranked.parquet for training.

Scorers are callables `(prompts, candidates) -> scores`, with prompts as message lists (system message and earlier
turns included) and one list of candidate strings per prompt. Empty or whitespace-only candidates are scored like
any other (they are counted in the report, not removed).
"""

import importlib
import logging
import math
from pathlib import Path

from selm.chat import ConversationTokens
from selm.errors import SELMError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------------------------
def preference_order(scores) -> list[int]:
    """Candidate indices from best to worst; equal scores keep index order (the documented tie rule)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def select_pair(scores, num_generated: int, update_rule: str) -> tuple[int, int]:
    """(chosen_index, rejected_index) into [responses..., original chosen, original rejected]."""
    original_chosen, original_rejected = num_generated, num_generated + 1
    if update_rule == "best_worst":
        order = preference_order(scores)
        return order[0], order[-1]
    if update_rule == "replace":
        reference = 0
        if scores[reference] >= scores[original_chosen]:  # index 0 < n: y_ref wins a tie with the original chosen
            return reference, original_rejected
        return original_chosen, reference
    if update_rule == "original":
        return original_chosen, original_rejected
    # reached only by a direct caller: a recipe's update_rule is one of the schema's choices (checked at parse time)
    raise SELMError(f"update_rule is {update_rule!r}; expected 'best_worst', 'replace' or 'original'")


def candidates_of(row) -> list[str]:
    responses = row.get("responses")
    if responses is None:  # a generation with one response per prompt may store only reference_response
        responses = [row["reference_response"]]
    return list(responses) + [row["chosen"][-1]["content"], row["rejected"][-1]["content"]]


def check_generated_rows(rows, source) -> None:
    """The columns ranking needs beyond the UltraFeedback ones; a bad value is named by file, row and column."""
    for i, row in enumerate(rows):
        reference = row.get("reference_response")
        if not isinstance(reference, str):
            raise SELMError(f"{source}: row {i}, column 'reference_response': expected a string, got {reference!r}")
        responses = row.get("responses")
        if responses is None:
            continue
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise SELMError(f"{source}: row {i}, column 'responses': expected a non-empty list of strings")
        if responses[0] != reference:
            raise SELMError(f"{source}: row {i}: 'reference_response' is not the first of 'responses'")


def rank_rows(rows: list[dict], scorer, update_rule: str = "best_worst", on_tie: str = "drop", source: str = "input"):
    """Score and decide every row. Returns (kept rows, dropped rows, report); every input row is in one of the two.

    `rows` are dicts in the generated.parquet schema (already validated as UltraFeedback rows); `update_rule` and
    `on_tie` are a RankingArguments' values (checked when it was built).
    """
    check_generated_rows(rows, source)
    prompts = [list(row["chosen"][:-1]) for row in rows]
    candidates = [candidates_of(row) for row in rows]
    scores = scorer(prompts, candidates)
    if len(scores) != len(rows):
        raise SELMError(f"ranker returned {len(scores)} score lists for {len(rows)} rows")

    kept, dropped = [], []
    for i, (row, cands, row_scores) in enumerate(zip(rows, candidates, scores)):
        row_scores = [float(s) for s in row_scores]
        if len(row_scores) != len(cands):
            raise SELMError(f"ranker returned {len(row_scores)} scores for {len(cands)} candidates ({source} row {i})")
        bad = [s for s in row_scores if not math.isfinite(s)]
        if bad:
            raise SELMError(f"ranker gave a non-finite score {bad[0]} ({source} row {i}, prompt_id {row['prompt_id']})")
        n = len(cands) - 2
        chosen_index, rejected_index = select_pair(row_scores, n, update_rule)
        prompt = list(row["chosen"][:-1])
        out = {
            "prompt": row["prompt"],
            "prompt_id": row["prompt_id"],
            "chosen": prompt + [{"role": "assistant", "content": cands[chosen_index]}],
            "rejected": prompt + [{"role": "assistant", "content": cands[rejected_index]}],
            "reference_response": row["reference_response"],
            "candidates": cands,
            "scores": row_scores,
            "chosen_index": chosen_index,
            "rejected_index": rejected_index,
        }
        tie = row_scores[chosen_index] == row_scores[rejected_index]
        if tie and on_tie == "drop" and update_rule != "original":
            dropped.append({**out, "reason": "tie"})
        else:
            kept.append(out)
    return kept, dropped, build_report(rows, candidates, scores, kept, dropped)


def build_report(rows, candidates, scores, kept, dropped) -> dict:
    """Counts for rank_report.json. 'generated chosen/rejected/neither' are over the kept (output) rows; rows may
    repeat a prompt or prompt_id, each counted as its own row (distinct_prompts / distinct_prompt_ids count them)."""
    from selm.data import repeat_counts

    def is_generated(index, row):
        return index < len(row["candidates"]) - 2

    reasons = {}
    for row in dropped:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    empty = [[not c.strip() for c in cands[:-2]] for cands in candidates]

    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "rows_in": len(rows),
        **{k: v for k, v in repeat_counts([r["prompt_id"] for r in rows], [r["chosen"][:-1] for r in rows]).items()
           if k != "rows"},
        "rows_out": len(kept),
        "rows_dropped": len(dropped),
        # rows whose chosen and rejected score the same, whatever on_tie did with them (dropped or kept)
        "ties": sum(r["scores"][r["chosen_index"]] == r["scores"][r["rejected_index"]] for r in kept + dropped),
        "dropped_by_reason": reasons,
        "generated_chosen": sum(is_generated(r["chosen_index"], r) for r in kept),
        "generated_rejected": sum(is_generated(r["rejected_index"], r) for r in kept),
        "generated_neither": sum(not is_generated(r["chosen_index"], r) and not is_generated(r["rejected_index"], r)
                                 for r in kept),
        "empty_generations": sum(sum(e) for e in empty),
        "rows_with_empty_generation": sum(any(e) for e in empty),
        "empty_generation_chosen": sum(is_generated(r["chosen_index"], r)
                                       and not r["candidates"][r["chosen_index"]].strip() for r in kept),
        "mean_score": {
            "generated": mean([s for row in scores for s in list(row)[:-2]]),
            "original_chosen": mean([float(row[-2]) for row in scores]),
            "original_rejected": mean([float(row[-1]) for row in scores]),
            "new_chosen": mean([r["scores"][r["chosen_index"]] for r in kept]),
            "new_rejected": mean([r["scores"][r["rejected_index"]] for r in kept]),
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# The stage: iter-K/generated.parquet -> iter-K/{ranked.parquet, ranking_dropped.parquet, rank_report.json}
# ---------------------------------------------------------------------------------------------------------------
def output_schema(with_reason: bool = False):
    import pyarrow as pa

    messages = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    fields = [
        ("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", messages), ("rejected", messages),
        ("reference_response", pa.string()), ("candidates", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())), ("chosen_index", pa.int64()), ("rejected_index", pa.int64()),
    ]
    return pa.schema(fields + ([("reason", pa.string())] if with_reason else []))


def run_ranking_stage(recipe, device: str | None = None, num_workers: int | None = None) -> dict | None:
    """Rank iteration K of a run. Returns the report, or None when ranked.parquet already exists.

    A model ranker runs on every visible GPU (one process each over contiguous shards) unless num_workers says.
    """
    import json

    import pyarrow as pa

    from selm.data import read_parquet_dataset, validate_preference_data
    from selm.io import write_parquet, write_text

    if recipe.is_generation_free:
        raise SELMError(f"iteration {recipe.iteration} trains on the original pairs (dpo_iteration_zero): "
                        "nothing to rank")
    iter_dir = recipe.iter_dir()
    source, final = iter_dir / "generated.parquet", iter_dir / "ranked.parquet"
    if final.exists():
        print(f"{final} exists: ranking of iteration {recipe.iteration} is done, nothing to do")
        return None
    dataset = read_parquet_dataset(source)
    validate_preference_data(dataset, str(source))
    if "reference_response" not in dataset.column_names:
        raise SELMError(f"{source}: missing column 'reference_response' (written by the generation stage)")
    rows = dataset.to_list()

    r = recipe.ranking
    print(f"ranking {len(rows)} rows of {source} with {r.ranker} "
          f"({r.oracle_reward if r.ranker == 'oracle' else r.ranker_model_name_or_path}), update rule {r.update_rule}")
    scorer = build_scorer(r, device, num_workers)
    kept, dropped, report = rank_rows(rows, scorer, r.update_rule, r.on_tie, source=str(source))
    report.update(iteration=recipe.iteration, ranker=r.ranker, update_rule=r.update_rule, on_tie=r.on_tie,
                  truncated_sequences=getattr(scorer, "truncated", 0))
    metadata = {"ranker": r.ranker, "ranker_model": r.ranker_model_name_or_path if r.ranker != "oracle" else None,
                "oracle_reward": r.oracle_reward if r.ranker == "oracle" else None,
                "update_rule": r.update_rule, "on_tie": r.on_tie}

    # ranked.parquet last: it is the stage's make target, so once it exists the other two are whole as well.
    write_parquet(pa.Table.from_pylist(dropped, schema=output_schema(with_reason=True)),
                  iter_dir / "ranking_dropped.parquet", metadata=metadata)
    write_text(iter_dir / "rank_report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not kept:  # nothing to train on: say so now rather than leave an empty ranked.parquet for training to trip on
        raise SELMError(f"all {len(rows)} rows of {source} were dropped {report['dropped_by_reason']}; "
                        f"see {iter_dir / 'ranking_dropped.parquet'} (on_tie: keep keeps tied rows)")
    write_parquet(pa.Table.from_pylist(kept, schema=output_schema()), final, metadata=metadata)
    print(f"wrote {final} ({len(kept)} rows) and {iter_dir / 'ranking_dropped.parquet'} ({len(dropped)} rows)")
    return report
