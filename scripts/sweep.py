"""Grid searches over recipe keys (see selm/sweep.py for the sweep file).

    python scripts/sweep.py expand SWEEP.yaml   # check every combination; prints "RECIPE RUN_DIR --key value ..." lines
    python scripts/sweep.py table SWEEP.yaml    # the results table, also written to output_root/sweep_table.{md,csv}

`make sweep SWEEP=SWEEP.yaml` does both and runs every combination in between.
"""

import sys

from selm.configs import main_guard
from selm.sweep import expand, table


@main_guard
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("expand", "table"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if argv[0] == "expand":
        for recipe, run_dir, args in expand(argv[1]):
            print(recipe, run_dir, *args)
    else:
        print(table(argv[1]), end="")


if __name__ == "__main__":
    main()
