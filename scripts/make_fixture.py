"""Write the deterministic preference fixture (UltraFeedback schema) as JSON lines.

    python scripts/make_fixture.py build/fixture.jsonl [--num_rows 100 --seed 0]
"""

import argparse
import json

from selm.io import write_text
from selm.tiny import fixture_rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--num_rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = fixture_rows(args.num_rows, args.seed)
    write_text(args.output, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} rows written to {args.output}")


if __name__ == "__main__":
    main()
