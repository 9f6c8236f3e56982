"""Grid searches over recipe keys (see selm/sweep.py for the sweep file).

    python scripts/sweep.py expand SWEEP.yaml [--output_root DIR] [--overlay PATH]
        check every combination; print "RECIPE RUN_DIR --key value ..." lines (writes nothing)
    python scripts/sweep.py run SWEEP.yaml [--output_root DIR] [--overlay PATH] [run options] [--key value ...]
        check every combination, then run each with the run driver (scripts/run.py: its options and any recipe
        overrides go to every run; --print prints the commands instead)
    python scripts/sweep.py table SWEEP.yaml [--output_root DIR]
        the results table, ranked by the held-out metric; also output_root/sweep_table.{md,csv} and sweep_rewards.png

`make sweep SWEEP=SWEEP.yaml` runs every combination, then writes the table.
"""

import sys

from selm.cli import main_guard, script_parser
from selm.sweep import expand, run_sweep, table


@main_guard
def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("action", choices=("expand", "run", "table"))
    parser.add_argument("sweep")
    parser.add_argument("--output_root", default=None, help="replaces the sweep file's output_root")
    parser.add_argument("--overlay", default=None, help="a recipe file merged over the sweep's recipe (expand)")
    args, run_options = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if run_options and args.action != "run":
        parser.error(f"unrecognized arguments: {' '.join(run_options)}")
    if args.action == "run":
        sys.exit(run_sweep(args.sweep, args.output_root, args.overlay, run_options))
    elif args.action == "expand":
        for recipe, run_dir, overrides in expand(args.sweep, args.output_root, args.overlay):
            print(recipe, run_dir, *overrides)
    else:
        print(table(args.sweep, args.output_root), end="")


if __name__ == "__main__":
    main()
