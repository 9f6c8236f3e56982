"""Test hook (tests/test_pipeline.py's kill and resume): a stage process stops at a chosen point, so the test kills
it there and not wherever a busy machine happens to let it run to.

Active only in processes started with this folder on PYTHONPATH and SELM_TEST_PAUSE_AT set. The process that is
about to create a directory matching that glob - the temporary of an artifact (every artifact is written through
one, selm.io.atomic_path), or a trainer's checkpoint-N - writes SELM_TEST_PAUSED and waits to be killed, before
any byte of it exists.
"""

import os

if os.environ.get("SELM_TEST_PAUSE_AT"):
    import fnmatch
    import time

    _PATTERN = os.environ["SELM_TEST_PAUSE_AT"]
    _mkdir = os.mkdir  # tempfile.mkdtemp, os.makedirs and Path.mkdir all call os.mkdir

    def _mkdir_or_pause(path, *args, **kwargs):
        if fnmatch.fnmatch(os.fsdecode(path), _PATTERN):
            with open(os.environ["SELM_TEST_PAUSED"], "w") as note:
                note.write(f"pid {os.getpid()} paused before creating {os.fsdecode(path)}\n")
            time.sleep(900)  # the test kills it within seconds; were it forgotten, fail instead of carrying on
            os._exit(99)
        return _mkdir(path, *args, **kwargs)

    os.mkdir = _mkdir_or_pause
