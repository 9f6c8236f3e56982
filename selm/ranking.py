"""Ranking (Algorithm 1, step 3): score every candidate answer of a prompt and rewrite its preference pair.

Candidates of a row, in this order: its generated responses (`responses`; the first is `reference_response`), then
the dataset's original chosen answer, then its original rejected answer. With n generated responses the original
chosen is candidate n and the original rejected candidate n + 1. With `candidates: generated` (best-of-n) only the n
generated responses are candidates. ranked.parquet's `num_generated` says how many of a row's candidates are generated.

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
- `rso`: the pair is drawn by statistical rejection sampling (selm/methods.py), chosen = the higher score; each row's
  draw is seeded by the recipe's seed, the iteration and the row's position, so a rerun draws the same.
- `rest` (ReST's Improve filter): one output row per generated response scoring >= rest_threshold (its `chosen`; its
  `rejected` is the row's worst generated response, which the supervised loss never reads); a row with none kept is
  dropped with reason "below_threshold". Ties are not dropped (there is no preference to lose).

A row whose new chosen and rejected have equal scores carries no preference. `on_tie: drop` moves it to
`ranking_dropped.parquet` with reason "tie"; `on_tie: keep` keeps it with the pair the rule picked. `original` never
drops a row: it trains on the dataset's pairs by definition. If every row is dropped the stage fails (after writing
the drops and the report) instead of leaving an empty ranked.parquet for training.

Scorers (selm/scorers.py) are callables `(prompts, candidates) -> scores`, with prompts as message lists (system
message and earlier turns included) and one list of candidate strings per prompt. Empty or whitespace-only candidates are scored like
any other (they are counted in the report, not removed).
"""

import math

from selm import layout
from selm.artifacts import REFERENCE, RESPONSES
from selm.errors import SELMError



# ---------------------------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------------------------
def preference_order(scores) -> list[int]:
    """Candidate indices from best to worst; equal scores keep index order (the documented tie rule)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def select_pair(scores, num_generated: int, update_rule: str, rso_beta: float | None = None,
                rng=None) -> tuple[int, int]:
    """(chosen_index, rejected_index) into [responses..., original chosen, original rejected] (or [responses...])."""
    original_chosen, original_rejected = num_generated, num_generated + 1
    if update_rule == "best_worst":
        order = preference_order(scores)
        return order[0], order[-1]
    if update_rule == "rso":
        from selm.methods import rso_pair

        return rso_pair(scores, rso_beta, rng)
    if update_rule == "replace":
        reference = 0
        if scores[reference] >= scores[original_chosen]:  # index 0 < n: y_ref wins a tie with the original chosen
            return reference, original_rejected
        return original_chosen, reference
    if update_rule == "original":
        return original_chosen, original_rejected
    # reached only by a direct caller: a recipe's update_rule is one of the schema's choices (checked at parse time)
    raise SELMError(f"update_rule is {update_rule!r}; expected 'best_worst', 'replace', 'original' or 'rso'")


def candidates_of(row, with_pair: bool = True) -> list[str]:
    responses = row.get(RESPONSES)
    if responses is None:  # a generation with one response per prompt may store only reference_response
        responses = [row[REFERENCE]]
    pair = [row["chosen"][-1]["content"], row["rejected"][-1]["content"]] if with_pair else []
    return list(responses) + pair


def rank_rows(rows: list[dict], scorer, update_rule: str = "best_worst", on_tie: str = "drop", source: str = "input",
              *, candidates: str = "generated_and_pair", rso_beta: float | None = None, rso_seed=(0, 0),
              rest_threshold: float | None = None):
    """Score and decide every row. Returns (kept rows, dropped rows, report); every input row is in one of the two
    (for `rest`: each kept response is an output row).

    `rows` are dicts in the generated.parquet schema, as `selm.artifacts.read_generated` checked them; the other
    arguments are a RankingArguments' values (checked when the recipe was parsed); `rso_seed` is (seed, iteration).
    """
    from selm.methods import rso_rng

    with_pair = candidates == "generated_and_pair"
    prompts = [list(row["chosen"][:-1]) for row in rows]
    candidates = [candidates_of(row, with_pair) for row in rows]
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
        n = n_of(cands, with_pair)
        if update_rule == "rest":
            _rest_rows(row, cands, row_scores, n, rest_threshold, kept, dropped)
            continue
        rng = rso_rng(*rso_seed, i) if update_rule == "rso" else None
        chosen_index, rejected_index = select_pair(row_scores, n, update_rule, rso_beta, rng)
        out = _output_row(row, cands, row_scores, n, chosen_index, rejected_index)
        tie = row_scores[chosen_index] == row_scores[rejected_index]
        if tie and on_tie == "drop" and update_rule != "original":
            dropped.append({**out, "reason": "tie"})
        else:
            kept.append(out)
    report = build_report(rows, candidates, scores, kept, dropped, [n_of(c, with_pair) for c in candidates])
    if update_rule == "rest":  # what the Improve filter kept: responses (the output rows) and prompts
        report.update(rest_threshold=rest_threshold, rest_responses_kept=len(kept),
                      rest_prompts_kept=len(rows) - len(dropped))
    return kept, dropped, report


def n_of(cands, with_pair: bool) -> int:
    """How many of a row's candidates are generated responses."""
    return len(cands) - 2 if with_pair else len(cands)


def _output_row(row, cands, row_scores, n, chosen_index, rejected_index) -> dict:
    prompt = list(row["chosen"][:-1])
    return {
        "prompt": row["prompt"],
        "prompt_id": row["prompt_id"],
        "chosen": prompt + [{"role": "assistant", "content": cands[chosen_index]}],
        "rejected": prompt + [{"role": "assistant", "content": cands[rejected_index]}],
        REFERENCE: row[REFERENCE],
        "candidates": cands,
        "scores": row_scores,
        "chosen_index": chosen_index,
        "rejected_index": rejected_index,
        "num_generated": n,
    }


def _rest_rows(row, cands, row_scores, n, threshold, kept, dropped) -> None:
    """ReST's Improve filter on one row: an output row per kept response, or the row dropped as below_threshold."""
    from selm.methods import rest_keep

    order = preference_order(row_scores[:n])
    keep = rest_keep(row_scores[:n], threshold)
    for index in keep:
        kept.append(_output_row(row, cands, row_scores, n, index, order[-1]))
    if not keep:
        dropped.append({**_output_row(row, cands, row_scores, n, order[0], order[-1]), "reason": "below_threshold"})


def build_report(rows, candidates, scores, kept, dropped, num_generated=None) -> dict:
    """Counts for rank_report.json. 'generated chosen/rejected/neither' are over the kept (output) rows; rows may
    repeat a prompt or prompt_id, each counted as its own row (distinct_prompts / distinct_prompt_ids count them).
    `num_generated`: per input row, how many candidates are generated (default: all but the dataset's pair)."""
    from selm.data import repeat_counts

    def is_generated(index, row):
        return index < row["num_generated"]

    num_generated = num_generated or [len(c) - 2 for c in candidates]
    reasons = {}
    for row in dropped:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    empty = [[not c.strip() for c in cands[:n]] for cands, n in zip(candidates, num_generated)]
    paired = [row for row, cands, n in zip(scores, candidates, num_generated) if len(cands) == n + 2]

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
            "generated": mean([float(s) for row, n in zip(scores, num_generated) for s in list(row)[:n]]),
            "original_chosen": mean([float(row[-2]) for row in paired]),  # None with candidates: generated
            "original_rejected": mean([float(row[-1]) for row in paired]),
            "new_chosen": mean([r["scores"][r["chosen_index"]] for r in kept]),
            "new_rejected": mean([r["scores"][r["rejected_index"]] for r in kept]),
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# The stage: iter-K/generated.parquet -> iter-K/{ranked.parquet, ranking_dropped.parquet, rank_report.json}
# ---------------------------------------------------------------------------------------------------------------
def output_schema(with_reason: bool = False):
    import pyarrow as pa

    messages = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    fields = [
        ("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", messages), ("rejected", messages),
        (REFERENCE, pa.string()), ("candidates", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())), ("chosen_index", pa.int64()), ("rejected_index", pa.int64()),
        ("num_generated", pa.int64()),
    ]
    return pa.schema(fields + ([("reason", pa.string())] if with_reason else []))


def run_ranking_stage(recipe, launch=None, *, device: str | None = None, num_workers: int | None = None) -> dict | None:
    """Rank iteration K of a run. Returns the report, or None when ranked.parquet already exists.

    A model ranker runs on every visible GPU (one process each over contiguous shards) unless num_workers says.
    `launch` (the run_info record) has nothing to learn from ranking.
    """
    import json

    import pyarrow as pa

    from selm.artifacts import read_generated
    from selm.scorers import build_scorer
    from selm.io import write_parquet, write_text

    if recipe.is_generation_free:
        raise SELMError(f"iteration {recipe.iteration} trains on the original pairs (dpo_iteration_zero): "
                        "nothing to rank")
    iter_dir = recipe.iter_dir()
    source, final = iter_dir / layout.GENERATED, iter_dir / layout.RANKED
    dropped_path, report_path = iter_dir / layout.RANKING_DROPPED, iter_dir / layout.RANK_REPORT
    if final.exists():
        print(f"{final} exists: ranking of iteration {recipe.iteration} is done, nothing to do")
        return None
    rows = read_generated(source).to_list()

    r = recipe.ranking
    print(f"ranking {len(rows)} rows of {source} with {r.ranker} "
          f"({r.oracle_reward if r.ranker == 'oracle' else r.ranker_model_name_or_path}), update rule {r.update_rule}")
    scorer = build_scorer(r, device, num_workers)
    kept, dropped, report = rank_rows(rows, scorer, r.update_rule, r.on_tie, source=str(source),
                                      candidates=r.candidates, rso_beta=r.rso_beta, rest_threshold=r.rest_threshold,
                                      rso_seed=(recipe.training["seed"], recipe.iteration))
    report.update(iteration=recipe.iteration, ranker=r.ranker, update_rule=r.update_rule, on_tie=r.on_tie,
                  candidates=r.candidates, truncated_sequences=getattr(scorer, "truncated", 0))
    metadata = {"ranker": r.ranker, "ranker_model": r.ranker_model_name_or_path if r.ranker != "oracle" else None,
                "oracle_reward": r.oracle_reward if r.ranker == "oracle" else None,
                "update_rule": r.update_rule, "on_tie": r.on_tie, "candidates": r.candidates}

    # ranked.parquet last: it is the stage's make target, so once it exists the other two are whole as well.
    write_parquet(pa.Table.from_pylist(dropped, schema=output_schema(with_reason=True)),
                  dropped_path, metadata=metadata)
    write_text(report_path, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not kept and r.update_rule == "rest":  # no response passed: say which iteration and how far off
        best = max(row["scores"][row["chosen_index"]] for row in dropped)
        raise SELMError(f"{recipe.path}: iteration {recipe.iteration}: no generated response scores >= rest_threshold "
                        f"{r.rest_threshold} (the best scores {best}); lower rest_threshold for this iteration")
    if not kept:  # nothing to train on: say so now rather than leave an empty ranked.parquet for training to trip on
        raise SELMError(f"all {len(rows)} rows of {source} were dropped {report['dropped_by_reason']}; "
                        f"see {dropped_path} (on_tie: keep keeps tied rows)")
    write_parquet(pa.Table.from_pylist(kept, schema=output_schema()), final, metadata=metadata)
    print(f"wrote {final} ({len(kept)} rows) and {dropped_path} ({len(dropped)} rows)")
    return report
