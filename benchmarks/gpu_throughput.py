"""Tokens/s and MFU of one SELM training step (precomputed reference log-probs, the recipes' setting).

    python benchmarks/gpu_throughput.py                 # CUDA: random-init ~1.1B Llama, bf16 autocast
    python benchmarks/gpu_throughput.py --tiny          # anywhere (CPU: fp32), a tiny config, to check it runs
    python benchmarks/gpu_throughput.py --attn_implementation flash_attention_2 --prompt_ratio 0.4
    python benchmarks/gpu_throughput.py --attn_implementation sdpa --prefix_sharing --prompt_ratio 0.4

The step is SELMTrainer.compute_loss on a batch of random tokens (each example a prompt and three completions,
seq_len tokens per prompt + completion, split by --prompt_ratio) + backward + AdamW, timed after warm-up steps
(median). Rows are [chosen; rejected; reference], or with --prefix_sharing one packed row per example. The last two
commands above compare the paper recipes' setting (flash-attention 2, unshared) with the prefix-sharing opt-in (sdpa):
examples/s is the figure to compare, since packed rows hold fewer tokens for the same examples. FLOPs per token =
6·N + 12·layers·hidden·seq (fwd+bwd, PaLM's count; N = parameters without the input embedding), counted over the
unshared rows' tokens, so MFU is comparable between the two. MFU = achieved FLOP/s / the device's dense bf16 peak
(--peak_tflops to set).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

GROUPS = ("chosen", "rejected", "reference")

# Dense bf16 peak (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape
LLAMA_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=512)


def build_trainer(opts, shape, device):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from selm.data import to_trainer_format
    from selm.standins.tiny import build_tokenizer, fixture_rows
    from selm.trainer import SELMTrainer
    from selm.trainer_config import SELMConfig

    tokenizer = build_tokenizer()  # only for the trainer's set-up; the timed batches are random token ids
    config = LlamaConfig(**shape, max_position_embeddings=max(4 * opts.seq_len, 512), tie_word_embeddings=False,
                         attn_implementation=opts.attn_implementation,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    rows = fixture_rows(8)
    for row in rows:
        row["reference_response"] = row["rejected"][-1]["content"]
    data = datasets.Dataset.from_list([to_trainer_format(r) for r in rows])
    args = SELMConfig(output_dir="/tmp/selm-gpu-throughput", alpha=0.001, beta=0.01, precompute_ref_log_probs=True,
                      bf16=device == "cuda", use_cpu=device != "cuda", report_to="none", save_strategy="no",
                      gradient_checkpointing=opts.gradient_checkpointing, per_device_train_batch_size=opts.batch_size,
                      disable_tqdm=True, prefix_sharing="true" if opts.prefix_sharing else "false", max_length=None)
    return SELMTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)


def random_batch(opts, vocab_size, collator, device):
    """Each example: a prompt of prompt_ratio·seq_len tokens and three completions of the rest, as the collator lays
    them out (unshared rows or one packed row)."""
    prompt = round(opts.seq_len * opts.prompt_ratio)
    examples = [{"prompt_ids": torch.randint(3, vocab_size, (prompt,)).tolist(),
                 **{f"{g}_ids": torch.randint(3, vocab_size, (opts.seq_len - prompt,)).tolist() for g in GROUPS},
                 **{f"ref_{g}_logps": -float(opts.seq_len) for g in GROUPS}} for _ in range(opts.batch_size)]
    return {k: v.to(device) for k, v in collator(examples).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config (for CPU, or to check the script)")
    parser.add_argument("--batch_size", type=int, default=4, help="preference examples per step (3 rows each)")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--attn_implementation", default="sdpa", help="sdpa, eager or flash_attention_2")
    parser.add_argument("--prefix_sharing", action="store_true", help="pack each example into one row (needs sdpa)")
    parser.add_argument("--prompt_ratio", type=float, default=0.5, help="prompt share of seq_len")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device's dense bf16 peak, for MFU")
    opts = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not opts.tiny:
        parser.error("no CUDA device: run with --tiny (a ~1B model on CPU would take hours per step)")
    if opts.tiny and opts.seq_len == parser.get_default("seq_len"):
        opts.seq_len = 128
    shape = LLAMA_TINY if opts.tiny else LLAMA_1B
    trainer = build_trainer(opts, shape, device)
    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    batch = random_batch(opts, shape["vocab_size"], trainer.data_collator, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    times = []
    for step in range(opts.warmup + opts.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= opts.warmup:
            times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    tokens = 3 * opts.batch_size * opts.seq_len  # the unshared rows' tokens: the work done, however it is laid out
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - model.get_input_embeddings().weight.numel()
    flops_per_token = 6 * n_matmul + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * opts.seq_len
    achieved = flops_per_token * tokens / step_s
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = opts.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    precision = "bf16 autocast, fp32 master weights" if device == "cuda" else "fp32"
    layout = f"packed rows of {batch['input_ids'].size(1)} tokens" if opts.prefix_sharing else "unshared rows"
    print(f"device: {name}; model: {n_params / 1e6:,.1f}M parameters ({precision}, {opts.attn_implementation}); "
          f"{opts.batch_size} examples x 3 completions x {opts.seq_len} tokens per step ({layout}); "
          f"loss {loss.item():.4f}")
    print(f"step: {step_s * 1000:.1f} ms (median of {opts.steps} after {opts.warmup} warm-up)")
    print(f"tokens/s (of the unshared rows): {tokens / step_s:,.0f}; examples/s: {opts.batch_size / step_s:.2f}; "
          f"achieved {achieved / 1e12:.3g} TFLOP/s")
    print(f"MFU: {achieved / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s" if peak else
          "MFU: n/a (no known peak for this device; pass --peak_tflops)")
    if device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
