"""Ranking throughput: candidates scored per second by the PairRM and reward-model rankers on the tiny checkpoints.

    python benchmarks/ranking_throughput.py [--rows 64] [--responses 1] [--repeats 5] [--batch_size 16]
                                            [--device cpu] [--threads N]

Builds both tiny rankers (no download) in a temporary directory, then times each scorer on the same fixture prompts
with n generated responses + the original chosen and rejected answers per row (n + 2 candidates). The model load is
not timed; one warm-up pass runs first. Prints the median of the repeats (and min/max).

PairRM compares every ordered pair of candidates, so its cost per row grows as (n + 2)(n + 1); a reward model scores
each candidate once. The figures measure the code path (tokenisation, batching, llm-blender's collator), not what a
full-size model costs.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def workload(rows: int, responses: int):
    from selm.standins.tiny import fixture_rows

    data = fixture_rows(rows)
    prompts = [r["chosen"][:-1] for r in data]
    candidates = [[f"{r['chosen'][-1]['content']} (draft {k})" for k in range(responses)]
                  + [r["chosen"][-1]["content"], r["rejected"][-1]["content"]] for r in data]
    return prompts, candidates


def time_scorer(scorer, prompts, candidates, repeats: int) -> list[float]:
    scorer(prompts[:4], candidates[:4])  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer(prompts, candidates)
        seconds.append(time.perf_counter() - start)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--responses", type=int, default=1, help="generated responses per row (paper: 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda; default: cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from selm.scorers import PairRMScorer, RewardModelScorer
    from selm.standins.tiny_ranker import save_tiny_pairrm, save_tiny_reward_model

    prompts, candidates = workload(args.rows, args.responses)
    num_candidates = sum(len(c) for c in candidates)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_pairrm(f"{tmp}/pairrm")
        save_tiny_reward_model(f"{tmp}/rm")
        scorers = {
            "pairrm": PairRMScorer(f"{tmp}/pairrm", args.batch_size, args.device),
            "reward_model": RewardModelScorer(f"{tmp}/rm", args.batch_size, 2048, args.device),
        }
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device or 'auto'}; "
              f"{args.rows} rows x {args.responses + 2} candidates = {num_candidates} candidates, "
              f"batch {args.batch_size}, {args.repeats} repeats")
        for name, scorer in scorers.items():
            seconds = time_scorer(scorer, prompts, candidates, args.repeats)
            rates = sorted(num_candidates / s for s in seconds)
            print(f"{name:>13}: {statistics.median(rates):8.1f} candidates/s median "
                  f"(min {rates[0]:.1f}, max {rates[-1]:.1f}; {statistics.median(seconds):.3f} s per pass)")


if __name__ == "__main__":
    main()
