"""Build the offline stand-ins of the paper models' tokenizers (selm/standins/paper_models.py): the real tokenizer
files of Zephyr-7B-SFT and Llama-3-8B-Instruct (today's and first-release) over tiny random models.

    python scripts/build_paper_models.py [OUTPUT_ROOT] [--only zephyr llama3 ...]     (default build/paper)
"""

import argparse

from selm.cli import main_guard
from selm.standins.paper_models import STANDINS, save_standin


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_root", nargs="?", default="build/paper")
    parser.add_argument("--only", nargs="+", choices=STANDINS, default=list(STANDINS))
    args = parser.parse_args(argv)
    for name in args.only:
        print(f"paper stand-in {name}: {save_standin(name, f'{args.output_root}/{name}')}")


if __name__ == "__main__":
    main()
