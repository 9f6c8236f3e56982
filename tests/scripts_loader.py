"""Run a stage script's main() in this process (fast: no interpreter start, imports shared with the tests)."""

import importlib.util

from conftest import REPO


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv) -> int:
    """scripts/<name>.py main(argv); returns its exit code (0 when it returns normally)."""
    try:
        code = load_script(name).main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return code or 0
