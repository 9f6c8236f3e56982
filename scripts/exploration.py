"""Exploration diagnostics and costs of a run, per iteration (selm/exploration.py, docs/benchmark.md).

    python scripts/exploration.py RUN_DIR [--kl_prompts 200] [--kl_samples 4] [--true_reward module:function]

Writes RUN_DIR/exploration.{json,md}: how often a generated response became the chosen one, the true reward of the
generated / chosen / rejected responses, distinct answers per held-out prompt across iterations, an estimate of
KL(π_K ‖ π_K−1) on held-out prompts, and what each iteration cost. --kl_prompts 0 skips the KL estimate.
"""

import sys

from selm.cli import main_guard, script_parser


@main_guard
def main(argv=None):
    import transformers

    from selm.exploration import KL_PROMPTS, KL_SAMPLES, run_diagnostics, to_markdown

    transformers.utils.logging.disable_progress_bar()
    parser = script_parser(__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--kl_prompts", type=int, default=KL_PROMPTS, help="held-out prompts of the KL estimate")
    parser.add_argument("--kl_samples", type=int, default=KL_SAMPLES, help="responses sampled per prompt")
    parser.add_argument("--true_reward", default=None, help="module:function (default: the recipe's oracle_reward)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = run_diagnostics(args.run_dir, args.kl_prompts, args.kl_samples, args.true_reward)
    print(to_markdown(result), end="")


if __name__ == "__main__":
    main()
