"""Compare runs on their held-out evaluations: tables, reward distributions and the paper's Fig. 4.

    python scripts/compare_runs.py RUN_A RUN_B [RUN_C ...] --output_dir DIR [--iteration K|base] [--no_implicit_rewards]

Writes DIR/comparison.{md,json}, metric_per_iteration.png, reward_distributions.png (at iteration K, default: the
last one every run evaluated) and implicit_rewards.png: r_A(x, y) − r_B(x, y) on the held-out pairs, r = β·log(πθ/πref)
with each run's own model and reference at iteration K (needs the models; --no_implicit_rewards skips it).
"""

import sys

from selm.cli import main_guard, script_parser


@main_guard
def main(argv=None):
    import datasets
    import transformers

    from selm.comparison import compare_runs, to_markdown

    # A report: Fig. 4's log-prob passes need no progress bars.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    parser = script_parser(__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (the first is A)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--iteration", default=None, help="iteration for the distributions and Fig. 4 (K or base)")
    parser.add_argument("--no_implicit_rewards", action="store_true", help="skip Fig. 4 (it loads every model)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = compare_runs(args.runs, args.output_dir, args.iteration, implicit=not args.no_implicit_rewards)
    print(to_markdown(result), end="")


if __name__ == "__main__":
    main()
