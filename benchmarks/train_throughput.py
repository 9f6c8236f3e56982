"""Training throughput of SELM against trl's DPO on one tiny model and one data set (CPU or GPU).

    python benchmarks/train_throughput.py [--repeats 5] [--rows 64] [--hidden_size 256] [--layers 4]

Three stages, run interleaved (a, b, c, a, b, c, ...) so drift in the machine hits all alike; medians over repeats:
  (a) trl.DPOTrainer, default settings (reference forward every step, 2 sequences per example);
  (b) SELMTrainer, reference forward every step (3 sequences per example: the official code's cost);
  (c) SELMTrainer with precompute_ref_log_probs (one length-sorted reference pass, then no reference forward).
"Steady state" is the median optimizer-step time after the first step; "stage" is trainer construction
(tokenization, precompute) + training, model loading excluded. Peak memory: ru_maxrss of a fresh process per stage
(one per configuration, after the timing): VmHWM over a second run of the stage, reset after a warm-up run, and its
growth over the resident size before that run. torch's CPU allocations are invisible to tracemalloc, so resident
memory is what is measured. On CUDA: max_memory_allocated.
Targets (issue 3): (c) steady time/sample <= 1.2x (a); (c) stage < (b) stage; (c) peak memory < (b).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

STAGES = ("a", "b", "c")
LABELS = {"a": "DPOTrainer (defaults)", "b": "SELM, ref forward each step", "c": "SELM, precomputed ref logps"}


def build_inputs(opts):
    """Tokenizer, (policy, reference) and the rows: fixture prompts with a generated-length reference response."""
    import datasets

    from selm.data import to_trainer_format
    from selm.tiny import build_model, build_tokenizer, fixture_rows

    tokenizer = build_tokenizer()
    policy = build_model(tokenizer, hidden_size=opts.hidden_size, num_layers=opts.layers, num_heads=opts.hidden_size // 64,
                         intermediate_size=4 * opts.hidden_size, seed=0)
    reference = build_model(tokenizer, hidden_size=opts.hidden_size, num_layers=opts.layers,
                            num_heads=opts.hidden_size // 64, intermediate_size=4 * opts.hidden_size, seed=0)
    rows = fixture_rows(opts.rows)
    for i, row in enumerate(rows):  # y_ref about as long as the dataset's answers, different per row
        row["reference_response"] = rows[(i + 1) % len(rows)]["chosen"][-1]["content"]
    data = datasets.Dataset.from_list([to_trainer_format(r) for r in rows])
    return tokenizer, policy, reference, data


def make_trainer(stage, opts, tokenizer, policy, reference, data, output_dir):
    from trl import DPOConfig, DPOTrainer

    from selm.trainer import SELMTrainer
    from selm.trainer_config import SELMConfig

    cuda = torch.cuda.is_available()
    common = dict(output_dir=output_dir, per_device_train_batch_size=opts.batch_size, num_train_epochs=1,
                  bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False, report_to="none", save_strategy="no",
                  logging_steps=10_000, disable_tqdm=True, max_length=256, seed=0)
    timer = StepTimer()
    callbacks = [timer]
    if stage == "a":
        trainer = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=DPOConfig(**common),
                             train_dataset=data.remove_columns("reference_response"), processing_class=tokenizer,
                             callbacks=callbacks)
    elif stage == "b":
        trainer = SELMTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              args=SELMConfig(alpha=0.001, **common), train_dataset=data, processing_class=tokenizer,
                              callbacks=callbacks)
    else:  # as scripts/train.py does: the policy before its first step is the reference, no second copy
        trainer = SELMTrainer(copy.deepcopy(policy), ref_model=None,
                              args=SELMConfig(alpha=0.001, precompute_ref_log_probs=True, **common),
                              train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    return trainer, timer


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (CUDA synchronised, so the time is the GPU's, not the launch's)."""

    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, *a, **k):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def run_stage(stage, opts, inputs, output_dir):
    t0 = time.perf_counter()
    trainer, timer = make_trainer(stage, opts, *inputs, output_dir)
    trainer.train()
    StepTimer._sync()
    stage_s = time.perf_counter() - t0
    steady = statistics.median(timer.times[1:]) if len(timer.times) > 1 else timer.times[0]
    return {"stage_s": stage_s, "step_s": steady, "samples_per_step": opts.batch_size}


def rss_mb(field="VmRSS:"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(stage, opts, output_dir):
    """Peak of one stage: after a warm-up run of the same stage (imports and lazy set-up are not the stage's),
    the kernel's high-water mark is reset (Linux: /proc/self/clear_refs) and the stage is run again."""
    inputs = build_inputs(opts)
    run_stage(stage, opts, inputs, output_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak resident set size
        before = rss_mb()
    run_stage(stage, opts, inputs, output_dir)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb("VmHWM:")
    print(json.dumps({"peak_mb": peak, "before_mb": before}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads. 1 (default) keeps the ratios stable on a shared machine: with 2+ "
                             "threads, OpenMP's spin-waiting turns any other load into 10x slower, erratic steps")
    parser.add_argument("--output_dir", default="/tmp/selm-train-throughput")
    parser.add_argument("--memory_child", choices=STAGES, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(opts.threads)
    if opts.memory_child:
        return memory_child(opts.memory_child, opts, opts.output_dir)
    if opts.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer are noise)")

    inputs = build_inputs(opts)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in inputs[1].parameters())
    print(f"device: {device}; model: {params / 1e6:.2f}M parameters; {opts.rows} rows, batch {opts.batch_size}; "
          f"{opts.repeats} interleaved repeats")
    run_stage("a", opts, inputs, opts.output_dir)  # warm-up (first-call costs: kernels, allocator), not counted
    results = {s: [] for s in STAGES}
    for repeat in range(opts.repeats):
        for stage in STAGES:
            results[stage].append(run_stage(stage, opts, inputs, opts.output_dir))
        print(f"repeat {repeat + 1}: " + ", ".join(
            f"({s}) step {results[s][-1]['step_s']:.3f}s stage {results[s][-1]['stage_s']:.2f}s" for s in STAGES),
            flush=True)
    med = {s: {k: statistics.median(r[k] for r in results[s]) for k in ("stage_s", "step_s")} for s in STAGES}

    memory = {}
    for stage in STAGES:
        cmd = [sys.executable, __file__, "--memory_child", stage] + [
            f"--{k}={getattr(opts, k)}" for k in ("rows", "batch_size", "hidden_size", "layers", "threads", "output_dir")]
        # A fixed mmap threshold makes glibc hand every large freed block back at once, so resident size follows
        # the live tensors instead of the allocator's high-water mark from earlier stages.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        memory[stage] = json.loads(out)

    kind = "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM) of a fresh process"
    print(f"\n{'stage':<32}{'samples/s (steady)':>20}{'s/sample':>10}{'stage s':>10}{'peak MB':>10}{'+MB':>8}")
    for s in STAGES:
        per_sample = med[s]["step_s"] / opts.batch_size
        grow = memory[s]["peak_mb"] - memory[s]["before_mb"]
        print(f"({s}) {LABELS[s]:<28}{1 / per_sample:>20.1f}{per_sample:>10.4f}{med[s]['stage_s']:>10.2f}"
              f"{memory[s]['peak_mb']:>10.0f}{grow:>8.0f}")
    steady_ratio = med["c"]["step_s"] / med["a"]["step_s"]
    print(f"\nmemory: {kind}; '+MB' is the growth over the process's size before the trainer was built")
    print(f"(b)/(a) steady time per sample: {med['b']['step_s'] / med['a']['step_s']:.2f}x")
    checks = [
        (f"(c)/(a) steady time per sample {steady_ratio:.2f}x <= 1.2x", steady_ratio <= 1.2),
        (f"(c) stage incl. precompute {med['c']['stage_s']:.2f}s < (b) stage {med['b']['stage_s']:.2f}s "
         f"({med['c']['stage_s'] / med['b']['stage_s']:.2f}x)", med["c"]["stage_s"] < med["b"]["stage_s"]),
        (f"(c) peak memory {memory['c']['peak_mb']:.0f} MB < (b) {memory['b']['peak_mb']:.0f} MB",
         memory["c"]["peak_mb"] < memory["b"]["peak_mb"]),
    ]
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")


if __name__ == "__main__":
    main()
