"""The command-line conventions every script follows (one style for all of scripts/).

- `main_guard` wraps each script's `main`: bad input becomes one line, `error: ...`, and exit code 2.
- `run_stage` is the whole main of the four stage scripts (generate, rank, train, evaluate): parse the recipe, dry
  run or run the stage function under the stage lock and the run_info record, exit code.
- `script_parser` is the argparse parser of a script's own options: its help is the script's docstring, and a bad
  argument is one such line too, not argparse's usage wall.
- A script that takes a recipe gives what its own parser does not know (`--iteration`, `--dry_run`, recipe keys)
  to the recipe parser (`selm.recipe.parse.parse_recipe`, trl's `TrlParser` underneath: its `--help` lists every key).
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


# The stages whose dry run also shows the first row's tokens (they tokenize conversations: selm.chat).
TOKEN_PREVIEW_STAGES = ("generate", "train")


def run_stage(name: str, stage_fn, argv=None) -> int:
    """A stage script's whole main: parse the recipe, then either print it (`--dry_run`: no model is loaded, no
    lock taken, nothing written) or run `stage_fn(recipe, launch)` under the run's stage lock and its run_info
    record; exit code 0. Bad input is one `error:` line and exit code 2 (main_guard)."""
    return main_guard(lambda args: _run_stage(name, stage_fn, args))(argv)


def _run_stage(name, stage_fn, argv) -> int:
    from selm.recipe.parse import parse_recipe

    recipe, dry_run = parse_recipe(argv, stage=name)
    if dry_run:
        print(recipe.to_yaml())
        if name in TOKEN_PREVIEW_STAGES:
            from selm.chat import dry_run_preview

            print(dry_run_preview(recipe, name))  # check BOS and end of turn
        return 0
    from selm.lock import stage_lock
    from selm.run_info import stage_record

    with stage_lock(recipe), stage_record(recipe) as launch:
        stage_fn(recipe, launch)
    return 0
