"""Build the offline tiny model: a locally trained tokenizer with a chat template and a random tiny Llama.

    python scripts/build_tiny_model.py build/tiny-llama [--hidden_size 128 --num_layers 2 --num_heads 2]
"""

import argparse

from selm.tiny import save_tiny_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=2, help="head_dim = hidden_size / num_heads (vLLM CPU: 64)")
    parser.add_argument("--intermediate_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_tiny_model(args.output_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
                    num_heads=args.num_heads, intermediate_size=args.intermediate_size, seed=args.seed)
    print(f"tiny model and tokenizer saved to {args.output_dir}")


if __name__ == "__main__":
    main()
