"""Tokens/s and MFU of one SELM training step (precomputed reference log-probs, the recipes' setting).

    python benchmarks/gpu_throughput.py                 # CUDA: random-init ~1.1B Llama, bf16 autocast
    python benchmarks/gpu_throughput.py --tiny          # anywhere (CPU: fp32), a tiny config, to check it runs

The step is SELMTrainer.compute_loss on a [chosen; rejected; reference] batch of random tokens + backward + AdamW,
timed after warm-up steps (median). FLOPs per token = 6·N + 12·layers·hidden·seq (fwd+bwd, PaLM's count; N =
parameters without the input embedding). MFU = achieved FLOP/s / the device's dense bf16 peak (--peak_tflops to set).
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
    from selm.tiny import build_tokenizer, fixture_rows
    from selm.trainer import SELMTrainer
    from selm.trainer_config import SELMConfig

    tokenizer = build_tokenizer()  # only for the trainer's set-up; the timed batches are random token ids
    config = LlamaConfig(**shape, max_position_embeddings=max(opts.seq_len, 512), tie_word_embeddings=False,
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
                      disable_tqdm=True)
    return SELMTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)


def random_batch(opts, vocab_size, device):
    """Rows [chosen; rejected; reference], each a prompt of seq_len/2 tokens and a completion of seq_len/2."""
    n, s = opts.batch_size, opts.seq_len
    completion = torch.zeros(3 * n, s, dtype=torch.long)
    completion[:, s // 2:] = 1
    batch = {
        "input_ids": torch.randint(3, vocab_size, (3 * n, s)),
        "attention_mask": torch.ones(3 * n, s, dtype=torch.long),
        "completion_mask": completion,
        "sequence_group": torch.arange(3).repeat_interleave(n),
    }
    for group in ("chosen", "rejected", "reference"):
        batch[f"ref_{group}_logps"] = -torch.rand(n) * s
    return {k: v.to(device) for k, v in batch.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config (for CPU, or to check the script)")
    parser.add_argument("--batch_size", type=int, default=4, help="preference examples per step (3 rows each)")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient_checkpointing", action="store_true")
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
    batch = random_batch(opts, shape["vocab_size"], device)
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
    tokens = batch["input_ids"].numel()
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - model.get_input_embeddings().weight.numel()
    flops_per_token = 6 * n_matmul + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * opts.seq_len
    achieved = flops_per_token * tokens / step_s
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = opts.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    precision = "bf16 autocast, fp32 master weights" if device == "cuda" else "fp32"
    print(f"device: {name}; model: {n_params / 1e6:,.1f}M parameters ({precision}); "
          f"{opts.batch_size} examples x 3 rows x {opts.seq_len} tokens per step; loss {loss.item():.4f}")
    print(f"step: {step_s * 1000:.1f} ms (median of {opts.steps} after {opts.warmup} warm-up)")
    print(f"tokens/s: {tokens / step_s:,.0f}; examples/s: {opts.batch_size / step_s:.2f}; "
          f"achieved {achieved / 1e12:.3g} TFLOP/s")
    print(f"MFU: {achieved / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s" if peak else
          "MFU: n/a (no known peak for this device; pass --peak_tflops)")
    if device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
