"""Build the demo's sorting-task data and SFT base model for one seed (skipped when already built with these settings).

    python scripts/build_demo_task.py --seed 0 [--data_dir build/demo/data-seed0 --model_dir build/demo/base-seed0]
                                      [--train_rows N --test_rows N --sft_target_reward R ...]

Writes DATA_DIR/{train_prefs,test_prefs}.jsonl (UltraFeedback schema) and MODEL_DIR (model, tokenizer with chat
template, generation_config with the EOS), each with a settings.json that decides whether a rerun rebuilds.
"""

import argparse
import dataclasses
import sys

from selm.cli import main_guard
from selm.standins.demo_task import DemoTaskSettings, build_demo_task


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(DemoTaskSettings):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    parser.add_argument("--data_dir", help="Default: build/demo/data-seed<SEED>.")
    parser.add_argument("--model_dir", help="Default: build/demo/base-seed<SEED>.")
    args = vars(parser.parse_args(argv))
    data_dir = args.pop("data_dir") or f"build/demo/data-seed{args['seed']}"
    model_dir = args.pop("model_dir") or f"build/demo/base-seed{args['seed']}"
    result = build_demo_task(DemoTaskSettings(**args), data_dir, model_dir)
    print(f"demo task build: {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
