"""Training throughput of SELM, unshared and with prefix sharing, against trl's DPO (CPU or GPU).

    python benchmarks/train_throughput.py [--ratios 0.25 1 2] [--repeats 5] [--rows 64] [--completion_tokens 64]
                                          [--stages a c d e] [--memory]
    python benchmarks/train_throughput.py --calibrate    # the cost estimate of prefix_sharing: auto

Data, one set per prompt/completion length ratio: conversations whose prompt and completions (chosen, rejected,
generated) have token counts drawn uniformly within ±50% of their means (completions --completion_tokens, prompts
ratio × that). Model: a randomly initialised Llama (--layers, --hidden_size), batch --batch_size.
Stages, run interleaved (a, c, d, e, a, c, ...) so drift in the machine hits all alike; medians over repeats:
  (a) trl.DPOTrainer, default settings (reference forward every step, 2 sequences per example);
  (b) SELMTrainer, reference forward every step, unshared (3 sequences per example: the official code's cost);
  (c) SELMTrainer, precomputed reference log-probs (the recipes' setting), prefix_sharing: false;
  (d) as (c), prefix_sharing: true (every batch packed, the precompute pass too);
  (e) as (c), prefix_sharing: auto;
  (f) iterative DPO as the pipeline runs it: SELMTrainer, alpha 0, no reference column, precomputed, auto;
  (g) trl.DPOTrainer with precompute_ref_log_probs (no reference forward in the step, like (c)-(f)).
"Step" is the mean optimizer-step time after the first step, per sample; "stage" is trainer construction
(tokenization, precompute) + training, model building excluded. With --memory, the peak memory of each stage at the
first ratio: ru_maxrss of a fresh process (VmHWM over a second run of the stage, reset after a warm-up run); torch's
CPU allocations are invisible to tracemalloc, so resident memory is what is measured. On CUDA: max_memory_allocated.
--calibrate times one SELM forward+backward of a batch, packed against unshared, over a grid of batch shapes, and prints
the measured time ratio beside the estimate `auto` decides by (selm/prefix_sharing.py) for several attention-cost
factors. Goals (issue 12): (d) >= 1.3x faster than (c) at ratio 1; (e) never slower than (c); (d) no slower than
(a) at ratio 2.
"""

import argparse
import copy
import itertools
import json
import os
import random
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
from transformers.trainer_callback import PrinterCallback  # noqa: E402

STAGES = ("a", "b", "c", "d", "e", "f", "g")
LABELS = {
    "a": "DPOTrainer (defaults)",
    "b": "SELM, ref forward each step",
    "c": "SELM, precomputed, unshared",
    "d": "SELM, precomputed, packed",
    "e": "SELM, precomputed, auto",
    "f": "DPO via SELMTrainer, auto",
    "g": "DPOTrainer, precomputed",
}
# Words that the tiny tokenizer encodes as one token each (with their leading space): n words ≈ n tokens.
WORDS = [" apple", " river", " stone", " cloud", " tiger", " lemon", " piano", " forest", " candle", " rocket",
         " garden", " silver"] + [f" {i}" for i in range(1, 20)]


def build_rows(opts, ratio: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(mean):
        return "".join(rng.choice(WORDS) for _ in range(max(1, round(mean * rng.uniform(0.5, 1.5)))))

    rows = []
    for _ in range(opts.rows):
        prompt = [{"role": "user", "content": text(ratio * opts.completion_tokens)}]
        rows.append({"prompt": prompt, **{key: [{"role": "assistant", "content": text(opts.completion_tokens)}]
                                          for key in ("chosen", "rejected", "reference_response")}})
    return rows


def build_models(opts):
    from selm.standins.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    sizes = dict(hidden_size=opts.hidden_size, num_layers=opts.layers, num_heads=opts.hidden_size // 64,
                 intermediate_size=4 * opts.hidden_size, max_position_embeddings=4096)
    return tokenizer, build_model(tokenizer, seed=0, **sizes), build_model(tokenizer, seed=1, **sizes)


def make_trainer(stage, opts, tokenizer, policy, reference, rows, output_dir):
    import datasets
    from trl import DPOConfig, DPOTrainer

    from selm.trainer import SELMTrainer
    from selm.trainer_config import SELMConfig

    cuda = torch.cuda.is_available()
    common = dict(output_dir=output_dir, per_device_train_batch_size=opts.batch_size, num_train_epochs=1,
                  bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False, report_to="none", save_strategy="no",
                  logging_steps=10_000, disable_tqdm=True, max_length=4096, seed=0)
    pairs = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    timer = StepTimer()
    if stage == "a":
        return DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=DPOConfig(**common),
                          train_dataset=pairs, processing_class=tokenizer, callbacks=[timer]), timer
    if stage == "g":
        return DPOTrainer(copy.deepcopy(policy), args=DPOConfig(precompute_ref_log_probs=True, **common),
                          train_dataset=pairs, processing_class=tokenizer, callbacks=[timer]), timer
    if stage == "b":
        return SELMTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                           args=SELMConfig(alpha=0.001, prefix_sharing="false", **common),
                           train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                           callbacks=[timer]), timer
    # As scripts/train.py does: the policy before its first step is the reference, no second copy.
    sharing = {"c": "false", "d": "true", "e": "auto", "f": "auto"}[stage]
    alpha, data = (0.0, pairs) if stage == "f" else (0.001, datasets.Dataset.from_list(rows))
    args = SELMConfig(alpha=alpha, precompute_ref_log_probs=True, prefix_sharing=sharing, **common)
    return SELMTrainer(copy.deepcopy(policy), ref_model=None, args=args, train_dataset=data,
                       processing_class=tokenizer, callbacks=[timer]), timer


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


class PackCounter:
    """Wraps a collator; counts the batches it packed."""

    def __init__(self, collator):
        self.collator, self.packed, self.total = collator, 0, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.total += 1
        self.packed += "segment_ids" in batch
        return batch


def run_stage(stage, opts, models, rows, output_dir):
    t0 = time.perf_counter()
    trainer, timer = make_trainer(stage, opts, *models, rows, output_dir)
    counter = trainer.data_collator = PackCounter(trainer.data_collator)
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict of logs, once per run
    trainer.train()
    StepTimer._sync()
    stage_s = time.perf_counter() - t0
    steady = timer.times[1:] or timer.times
    return {"stage_s": stage_s, "sample_s": sum(steady) / len(steady) / opts.batch_size,
            "packed": f"{counter.packed}/{counter.total}"}


def rss_mb(field="VmRSS:"):
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(stage, opts):
    """Peak of one stage: after a warm-up run of the same stage (imports and lazy set-up are not the stage's),
    the kernel's high-water mark is reset (Linux: /proc/self/clear_refs) and the stage is run again."""
    models, rows = build_models(opts), build_rows(opts, opts.ratios[0])
    run_stage(stage, opts, models, rows, opts.output_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # reset VmHWM, the peak resident set size
        before = rss_mb()
    run_stage(stage, opts, models, rows, opts.output_dir)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss_mb("VmHWM:")
    print(json.dumps({"peak_mb": peak, "before_mb": before}))


def measure_memory(opts):
    memory = {}
    for stage in opts.stages:
        cmd = [sys.executable, __file__, "--memory_child", stage, "--ratios", str(opts.ratios[0])] + [
            f"--{k}={getattr(opts, k)}" for k in ("rows", "batch_size", "hidden_size", "layers", "threads",
                                                  "completion_tokens", "output_dir")]
        # A fixed mmap threshold makes glibc hand every large freed block back at once, so resident size follows
        # the live tensors instead of the allocator's high-water mark from earlier stages.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, check=True, env=env, encoding="utf-8").stdout.strip().splitlines()[-1]
        memory[stage] = json.loads(out)
    kind = "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM) of a fresh process"
    print(f"\nmemory at ratio {opts.ratios[0]} ({kind}; '+MB': growth over the size before the trainer was built):")
    for stage, m in memory.items():
        print(f"  ({stage}) {LABELS[stage]:<30}{m['peak_mb']:>8.0f} MB{m['peak_mb'] - m['before_mb']:>+8.0f}")


def calibrate(opts):
    """Measured packed/unshared step time against `packed_cost_ratio` per attention-cost factor, over batch shapes."""
    import datasets

    from selm import prefix_sharing
    from selm.trainer import GROUPS, SELMDataCollator, SELMTrainer
    from selm.trainer_config import SELMConfig

    tokenizer, policy, _ = build_models(opts)
    args = SELMConfig(output_dir=opts.output_dir, bf16=False, use_cpu=not torch.cuda.is_available(), report_to="none",
                      gradient_checkpointing=False, alpha=0.001, precompute_ref_log_probs=True, max_length=None)
    dummy = datasets.Dataset.from_list(build_rows(opts, 1.0)[:1])  # the timed batches are built below
    trainer = SELMTrainer(policy, args=args, train_dataset=dummy, processing_class=tokenizer)
    trainer.model.train()
    rng, factors = random.Random(0), (0.0, 0.5, 1.0, 2.0, 4.0)
    flops_weight = prefix_sharing.area_weight(policy.config) / prefix_sharing.ATTENTION_COST_FACTOR

    def examples(prompt, completion, spread):
        def tokens(mean):
            count = max(1, round(mean * rng.uniform(1 - spread, 1 + spread)))
            return [rng.randrange(6, len(tokenizer)) for _ in range(count)]

        return [{"prompt_ids": tokens(prompt), **{f"{g}_ids": tokens(completion) for g in GROUPS},
                 **{f"ref_{g}_logps": -100.0 for g in GROUPS}} for _ in range(opts.batch_size)]

    def step_s(batch):
        batch = trainer._prepare_inputs(batch)
        StepTimer._sync()
        t0 = time.perf_counter()
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, batch).backward()
        StepTimer._sync()
        return time.perf_counter() - t0

    print(f"{'R':>4}{'P/R':>6}{'spread':>7}  measured  " + "  ".join(f"k={k:<4}" for k in factors))
    errors = {k: [] for k in factors}
    shapes = [(c, r) for c in (32, 128) for r in (0.1, 0.25, 0.5, 1.0, 2.0)] + [(256, 0.1), (256, 0.25)]
    for (completion, ratio), spread in itertools.product(shapes, (0.0, 0.5)):
        batch = examples(ratio * completion, completion, spread)
        unshared, packed = (SELMDataCollator(pad_token_id=tokenizer.pad_token_id, prefix_sharing=m)(batch)
                            for m in ("false", "true"))
        step_s(unshared), step_s(packed)  # warm-up of this shape
        times = {"u": [], "p": []}
        for _ in range(opts.repeats):
            times["u"].append(step_s(unshared))
            times["p"].append(step_s(packed))
        measured = statistics.median(times["p"]) / statistics.median(times["u"])
        estimates = {k: prefix_sharing.packed_cost_ratio(batch, GROUPS, None, k * flops_weight) for k in factors}
        for k, v in estimates.items():
            errors[k].append(measured - v)
        print(f"{completion:>4}{ratio:>6}{spread:>7}  {measured:>8.2f}  " +
              "  ".join(f"{v:>6.2f}" for v in estimates.values()), flush=True)
    for k, e in errors.items():
        print(f"factor {k}: measured - estimate: mean {statistics.mean(e):+.3f}, max {max(e):+.3f}, "
              f"rms {statistics.mean(x * x for x in e) ** 0.5:.3f}")


def token_means(tokenizer, rows):
    """Mean prompt and completion tokens as the trainers count them (chat template included)."""
    def count(messages, **kw):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    prompt = [count(r["prompt"], add_generation_prompt=True) for r in rows]
    full = [count(r["prompt"] + r["chosen"]) for r in rows]
    return statistics.mean(prompt), statistics.mean(f - p for f, p in zip(full, prompt))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 1.0, 2.0],
                        help="prompt/completion mean length ratios, one data set each")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["a", "c", "d", "e"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--completion_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads. 1 (default) keeps the ratios stable on a shared machine: with 2+ "
                             "threads, OpenMP's spin-waiting turns any other load into 10x slower, erratic steps")
    parser.add_argument("--memory", action="store_true", help="also measure each stage's peak memory")
    parser.add_argument("--calibrate", action="store_true", help="fit the cost estimate of prefix_sharing: auto")
    parser.add_argument("--output_dir", default="/tmp/selm-train-throughput")
    parser.add_argument("--memory_child", choices=STAGES, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(opts.threads)
    if opts.memory_child:
        return memory_child(opts.memory_child, opts)
    if opts.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer are noise)")
    if opts.calibrate:
        return calibrate(opts)

    models = build_models(opts)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in models[1].parameters())
    print(f"device: {device}; model: {params / 1e6:.2f}M parameters ({opts.layers} layers, {opts.hidden_size} wide); "
          f"{opts.rows} rows, batch {opts.batch_size}; {opts.repeats} interleaved repeats")
    datasets = {ratio: build_rows(opts, ratio, seed=i) for i, ratio in enumerate(opts.ratios)}
    run_stage(opts.stages[0], opts, models, datasets[opts.ratios[0]], opts.output_dir)  # warm-up, not counted
    results = {(ratio, s): [] for ratio in opts.ratios for s in opts.stages}
    for repeat in range(opts.repeats):
        for ratio in opts.ratios:
            for stage in opts.stages:
                results[ratio, stage].append(run_stage(stage, opts, models, datasets[ratio], opts.output_dir))
        print(f"repeat {repeat + 1} done", flush=True)

    print(f"\n{'P/R':>5} {'P, R tokens':>12}  {'stage':<32}{'ms/sample':>10}{'vs (c)':>8}{'stage s':>9}{'packed':>8}")
    for ratio in opts.ratios:
        prompt, completion = token_means(models[0], datasets[ratio])
        med = {s: {k: statistics.median(r[k] for r in results[ratio, s]) for k in ("stage_s", "sample_s")}
               for s in opts.stages}
        for s in opts.stages:
            speedup = f"{med['c']['sample_s'] / med[s]['sample_s']:.2f}x" if "c" in med else ""
            print(f"{ratio:>5} {f'{prompt:.0f}, {completion:.0f}':>12}  ({s}) {LABELS[s]:<28}"
                  f"{1000 * med[s]['sample_s']:>10.1f}{speedup:>8}{med[s]['stage_s']:>9.2f}"
                  f"{results[ratio, s][-1]['packed']:>8}")
        checks = []
        if {"c", "d"} <= set(med) and ratio == 1.0:
            gain = med["c"]["sample_s"] / med["d"]["sample_s"]
            checks.append((f"(d) packed {gain:.2f}x faster than (c) unshared (goal >= 1.3x)", gain >= 1.3))
        if {"c", "e"} <= set(med):
            ratio_e = med["e"]["sample_s"] / med["c"]["sample_s"]
            checks.append((f"(e) auto at {ratio_e:.2f}x the time of (c) (goal: never slower)", ratio_e <= 1.05))
        for dpo in ("a", "g"):
            if {dpo, "d"} <= set(med) and ratio == 2.0:
                ratio_a = med["d"]["sample_s"] / med[dpo]["sample_s"]
                checks.append((f"(d) SELM step at {ratio_a:.2f}x ({dpo}) trl DPO's (goal <= 1)", ratio_a <= 1.0))
        for text, ok in checks:
            print(f"        [{'met' if ok else 'MISSED'}] {text}")
    if opts.memory:
        measure_memory(opts)


if __name__ == "__main__":
    main()
