"""Summarize a run directory: what each iteration produced, as summary.json, summary.md and summary.png.

    python scripts/summarize.py runs/smoke-selm
"""

import sys

from selm.configs import main_guard
from selm.summary import summarize_run, to_markdown


@main_guard
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    summary = summarize_run(argv[0])
    print(to_markdown(summary))
    print(f"summary: {argv[0]}/summary.json, {argv[0]}/summary.png ({len(summary['iterations'])} iterations)")


if __name__ == "__main__":
    main()
