"""What a finetuning step of finetune.py costs on SmolLM2-135M, against the same model in full
precision with plain LoRA: time per step (median) and peak memory, in one process.

    python bench/bench_finetune.py --threads 1            # seqlen 256, batch 1 (finetune.py --quick's window)

Rows (rank-64 LoRA on every block linear, only A and B train, AdamW):
  fp32 + LoRA        lora.LoraLinear on the full-precision weights: the reference step
  2-bit, cached Q(W) QuantLinear with Q(W) kept dequantized (fp32): what finetune.py trains
  2-bit, packed      QuantLinear dequantizing its packed codes in every forward (qmodel.load(cache=False))
The target (issue 12): the cached step >= 0.8x the fp32 + LoRA step's speed.

Memory: peak resident growth of a step at seqlen 128, 256, 512 (batch 1) of the cached model,
each in a fresh process after a warm-up step (glibc told to unmap big buffers when freed); its
slope is the activation memory per token, from which docs/scaling.md's 7B estimate is made.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_time(model, x, steps):
    """Median seconds of `steps` optimizer steps (after one warm-up) on windows x (B, T)."""
    import torch

    from finetune import lm_loss
    from lora import adapters
    params = [p for m in adapters(model).values() for p in (m.A, m.B)]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        lm_loss(model, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def trainable(model):
    """Only the LoRA factors train (finetune.load_student's setting)."""
    from lora import adapters
    model.requires_grad_(False)
    for m in adapters(model).values():
        m.A.requires_grad_(True)
        m.B.requires_grad_(True)
    return model.train()


def probe(T, head):
    """(in a fresh process) Peak resident growth of one forward + backward of the cached 2-bit
    model on one window of T tokens, after a warm-up step; head=False: a loss on the final hidden
    states, i.e. the blocks' activations alone. Prints bytes."""
    import ctypes

    import torch

    from checkpoints import load
    from cli import peak_memory_gib, reset_peak_memory
    from data import train_windows
    from finetune import lm_loss
    from qmodel import quantize_model
    torch.set_num_threads(1)
    fp, tok = load("smollm2-135m")
    model = trainable(quantize_model(fp, "qlora", bits=2))
    x = train_windows(tok, 512, "wikitext2")[:1, :T]                            # (1, T)

    def step():
        (lm_loss(model, x) if head else model.hidden(x).pow(2).mean()).backward()
        model.zero_grad(set_to_none=True)
    step()                                                                      # warm-up
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory("cpu")
    base = peak_memory_gib("cpu")
    step()
    print((peak_memory_gib("cpu") - base) * 2**30)


def peak_step_bytes(T, head=True):
    import subprocess
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}      # big buffers are unmapped when freed
    r = subprocess.run([sys.executable, __file__, "--probe", str(T), "--head", str(int(head))], capture_output=True,
                       text=True, env=env, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main(a):
    import torch

    from checkpoints import load
    from data import train_windows
    from lora import LoraLinear, adapters, swap_linears
    from qmodel import quantize_model
    torch.set_num_threads(a.threads)
    fp, tok = load("smollm2-135m")
    windows = train_windows(tok, max(a.seqlen, 512), "wikitext2")             # (n, 512)
    x = windows[:a.batch_size, :a.seqlen]                                        # (B, T)

    ref = copy.deepcopy(fp)
    torch.manual_seed(0)
    for block in ref.layers:
        swap_linears(block, lambda lin: LoraLinear(lin, 64, 16.0))
    cached = quantize_model(copy.deepcopy(fp), "qlora", bits=2)                 # Q(W) cached, fp32
    packed = copy.deepcopy(cached)
    for m in adapters(packed).values():
        m.drop_cache()
    rows = {"fp32 + LoRA": trainable(ref), "2-bit, cached Q(W)": trainable(cached), "2-bit, packed": trainable(packed)}
    times = {}
    for name, model in rows.items():                                              # interleaved: noise hits all
        times[name] = step_time(model, x, a.steps)
    tokens = x.numel()
    print(f"SmolLM2-135M finetuning step, batch {a.batch_size} x {a.seqlen} tokens, rank-64 LoRA, AdamW, "
          f"{a.threads} thread(s); median of {a.steps} steps\n")
    print("| model | s / step | tokens / s | speed vs fp32 + LoRA |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {tokens / t:.0f} | {times['fp32 + LoRA'] / t:.2f}x |")
    args = cached.args
    del ref, packed, rows, cached
    print("\n| seqlen | peak step memory above the loaded model (GiB) | of it, the blocks alone |\n|---|---|---|")
    peaks = {}
    for T in (128, 256, 512):                                                    # each in a fresh process
        peaks[T] = peak_step_bytes(T), peak_step_bytes(T, head=False)
        print(f"| {T} | {peaks[T][0] / 2**30:.3f} | {peaks[T][1] / 2**30:.3f} |")
    whole, blocks = [(peaks[512][i] - peaks[128][i]) / (512 - 128) for i in (0, 1)]  # bytes per token
    print(f"\nper token: {whole / 2**20:.3f} MiB a step, of it {blocks / 2**20:.3f} MiB in the blocks = "
          f"{blocks / (args.n_layers * args.dim):.0f} bytes per token per block per unit of width (SmolLM2: "
          f"{args.n_layers} blocks, width {args.dim}, fp32); the rest, {(whole - blocks) / 2**20:.3f} MiB, is the "
          f"head's logits and their gradient ({args.vocab_size} classes)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--head", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    from cli import run
    run(probe, a.probe, bool(a.head)) if a.probe else run(main, a)
