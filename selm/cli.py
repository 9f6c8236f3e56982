"""The command-line conventions every script follows (one style for all of scripts/).

- `main_guard` wraps each script's `main`: bad input becomes one line, `error: ...`, and exit code 2.
- `script_parser` is the argparse parser of a script's own options: its help is the script's docstring, and a bad
  argument is one such line too, not argparse's usage wall.
- A script that takes a recipe gives what its own parser does not know (`--iteration`, `--dry_run`, recipe keys)
  to the recipe parser (`selm.configs.parse_recipe`, trl's `TrlParser` underneath: its `--help` lists every key).
- `split_cli` turns `--key value` / `--key=value` / `--flag` words into pairs; the recipe parser, the freeze
  step and the planner read overrides through it.
"""

import argparse
import os
import sys

from selm.errors import SELMError


# Under a launcher (accelerate, srun) a stage's error line is followed by the launcher's own report of the failed
# processes: with this variable set (the run driver, selm/run.py, does), the stage also writes the line to that file,
# which the driver prints again once the launcher has exited, so the cause ends the output.
ERROR_FILE_ENV = "SELM_ERROR_FILE"


def _keep_error_line(line: str) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        from selm.io import write_text

        try:
            write_text(path, line + "\n")
        except OSError:  # the line is on stderr already; its copy only repeats it
            pass


def main_guard(fn):
    """Run a script's main(): bad input becomes one line on stderr and exit code 2, never a traceback wall."""

    def wrapper(argv=None):
        try:
            return fn(argv)
        except SELMError as e:
            print(f"error: {e}", file=sys.stderr)
            _keep_error_line(f"error: {e}")
            sys.exit(2)
        except Exception as e:  # a crash (out of memory, a library's bug): the traceback stays, its cause is kept
            _keep_error_line(f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]} (traceback above)")
            raise

    return wrapper


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        raise SELMError(f"command line: {message} (see {self.prog} --help)")


def script_parser(doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose --help prints `doc` (the script's docstring) and then its options.

    Options are matched by their full name only (allow_abbrev=False): `--output` never swallows a recipe's
    `--output_dir`, so `parse_known_args` can hand the rest to the recipe parser unchanged.
    """
    return _OneLineErrors(description=doc, epilog=epilog, allow_abbrev=False,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


RECIPE_OVERRIDES = "Any other --key value (or --key=value) is a recipe override; the recipe keys: " \
                   "python scripts/train.py --help."


def split_cli(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--key value` words as pairs: ['--a', '1', '--b=2', '--flag'] -> [('a', '1'), ('b', '2'), ('flag', None)].

    A word after `--key` is its value unless it starts with `--` itself; anything else out of place is a SELMError.
    """
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SELMError(f"command line: expected --key value, got '{arg}'")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:
            key, value = arg[2:], None
            i += 1
        pairs.append((key, value))
    return pairs
