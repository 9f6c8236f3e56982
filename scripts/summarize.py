"""Summarize a run directory: what each iteration produced, as summary.json, summary.md and summary.png.

    python scripts/summarize.py runs/smoke-selm
"""

import sys

from selm.cli import main_guard, script_parser
from selm.summary import summarize_run, to_markdown


@main_guard
def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("run_dir", help="the run directory (RUN_DIR of make run)")
    run_dir = parser.parse_args(sys.argv[1:] if argv is None else argv).run_dir
    summary = summarize_run(run_dir)
    print(to_markdown(summary))
    print(f"summary: {run_dir}/summary.json, {run_dir}/summary.png ({len(summary['iterations'])} iterations)")


if __name__ == "__main__":
    main()
