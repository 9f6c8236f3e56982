"""Where the time went: seconds per stage (generate / rank / train / evaluate) of runs, from their run_info.json.

    python scripts/stage_times.py RUN_DIR [RUN_DIR ...] [--since EPOCH_SECONDS]

Each stage's time is its processes' wall time from start to end (interpreter start and imports included; an
accelerate launcher's own start before its processes is not). --since prints the wall time elapsed since then too.
"""

import sys
import time

from selm.cli import main_guard, script_parser


@main_guard
def main(argv=None):
    from selm.run_info import stage_seconds_markdown

    parser = script_parser(__doc__)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--since", type=float, default=None, help="print the wall time elapsed since this epoch time")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(stage_seconds_markdown(args.runs), end="")
    if args.since is not None:
        print(f"\nwall time: {time.time() - args.since:.0f} s")


if __name__ == "__main__":
    main()
