"""Build the offline tiny models: a random tiny Llama with a locally trained tokenizer and chat template, or a tiny
PairRM-architecture ranker (llm-blender) or reward model. Random weights: they exercise the real code paths.

    python scripts/build_tiny_model.py build/tiny-llama [--hidden_size 128 --num_layers 2 --num_heads 2]
    python scripts/build_tiny_model.py build/tiny-pairrm --kind pairrm
"""

import argparse

from selm.standins.tiny import save_tiny_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--kind", choices=("llama", "pairrm", "reward_model"), default="llama")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=2, help="head_dim = hidden_size / num_heads (vLLM CPU: 64)")
    parser.add_argument("--intermediate_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "llama":
        save_tiny_model(args.output_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        num_heads=args.num_heads, intermediate_size=args.intermediate_size, seed=args.seed)
    else:
        from selm.standins.tiny_ranker import save_tiny_pairrm, save_tiny_reward_model

        (save_tiny_pairrm if args.kind == "pairrm" else save_tiny_reward_model)(args.output_dir, seed=args.seed)
    print(f"tiny {args.kind} saved to {args.output_dir}")


if __name__ == "__main__":
    main()
