"""Write the deterministic preference fixture (UltraFeedback schema) as a directory of split files.

    python scripts/make_fixture.py build/fixture [--num_train 100 --num_test 40 --seed 0]

Writes DIR/train_prefs.jsonl and DIR/test_prefs.jsonl (held-out questions that never occur in the training rows),
the layout `dataset_name: DIR` reads with `dataset_split` / `eval_split` like the hub dataset's splits.
"""

import argparse
import json
from pathlib import Path

from selm.io import write_text
from selm.standins.tiny import fixture_splits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--num_train", type=int, default=100)
    parser.add_argument("--num_test", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, rows in fixture_splits(args.num_train, args.num_test, args.seed).items():
        path = Path(args.output_dir) / f"{split}.jsonl"
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} rows written to {path}")


if __name__ == "__main__":
    main()
