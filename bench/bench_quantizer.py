"""The fused quantizer (fastpath.FakeQuant) against the reference (quant.fake_quant) on a real
SmolLM2-135M block, at the --quick recipe's settings (2 bits, g64, LWC, learned rounding offsets,
SVD start of A and B, rank 64, batch 1; --seqlen (default 256, --quick's until it went to 512),
--batch change the step's tokens):

1. Q(W) of the block's 7 linears, forward + backward (dL/dW_hat given): milliseconds, both ways.
2. One calibration step (bench_calibrate's timing: one loss_fn call to the next, forward, backward,
   AdamW) of the --quick recipe and of the plain step (the paper's start, no learned rounding):
   the plain formulas (quant.fake_quant, torch's per-tensor AdamW, the LoRA path), --fast
   (fastpath.accelerate: FakeQuant eager, fused AdamW, W_eff merged where it saves flops) and
   --compile (FakeQuant compiled; the compile itself, in the first round, is not timed: the first
   step of each call is dropped), and compiled with the LoRA path kept in every linear
   (FastQuantLinear.merges off); rounds interleaved, medians. MFU as in bench_calibrate.py: model FLOPs
   (6 N T + 12 T^2 dim, T = batch x seqlen tokens) / step time / the rate of a block-shaped fp32
   matmul (batch x seqlen rows).

    python bench/bench_quantizer.py [--seqlen 256] [--batch 1] [--rounds 5] [--steps 4] [--threads 1] [--block 0]
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_calibrate as bc  # noqa: E402

import fastpath  # noqa: E402  (bench_calibrate put the repository on sys.path)
from checkpoints import load  # noqa: E402
from llama import LINEARS  # noqa: E402
from lora import QuantLinear  # noqa: E402


def quantizer_ms(block, fast=False, compile=False, reps=20):
    """ms of Q(W) forward + backward for the block's 7 linears, as QuantLinear.qweight() computes it
    (fast: accelerated, FakeQuant)."""
    qls = [QuantLinear.from_linear(block.get_submodule(n), 2, 64, 64, learn_rounding=True) for n in LINEARS]
    if fast:
        qls = [fastpath.accelerate(m, compile=compile).module for m in qls]
    ups = [torch.randn(m.out_features, m.in_features) for m in qls]
    for m in qls:
        m.offset.data.uniform_(-0.3, 0.3)                                   # mid-calibration offsets

    def once():
        loss = sum((m.qweight() * u).sum() for m, u in zip(qls, ups))
        loss.backward()
    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return 1000 * (time.perf_counter() - t) / reps


def step_seconds(fp, X, Y, freqs, steps, **recipe):
    bc.CALIB = dict(bits=2, group_size=64, rank=64, method="bw", nsamples=len(X), seqlen=X.shape[1],
                    batch_size=len(X), **recipe)
    return statistics.median(bc.calib_steps(0, fp, X, Y, freqs, steps)[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="windows a step")
    p.add_argument("--steps", type=int, default=4, help="steps a round (the first, optimizer state, dropped)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load("smollm2-135m")
    fp = model.layers[a.block]
    X, Y, freqs = bc.block_inputs(model, tok, a.block, a.seqlen, a.batch)
    T, dim = a.seqlen, model.args.dim
    N = sum(fp.get_submodule(n).weight.numel() for n in LINEARS)
    flops = a.batch * (6 * N * T + 12 * T * T * dim)
    quick = dict(quick=True)                                               # learned rounding, SVD start, no aug loss
    plain = dict(quick=True, learn_rounding=False, lora_init="standard")   # the paper's start, same settings else
    rows = {k: [] for k in ("q_ref", "q_fused", "q_compiled", "quick_ref", "quick_fused", "quick_compiled",
                            "plain_ref", "plain_fused", "plain_compiled", "quick_unmerged", "plain_unmerged", "gemm")}
    merges = fastpath.FastQuantLinear.merges
    for r in range(a.rounds):
        rows["q_ref"].append(quantizer_ms(fp))                             # the plain formulas
        rows["quick_ref"].append(step_seconds(fp, X, Y, freqs, a.steps, **quick, compile=False))
        rows["plain_ref"].append(step_seconds(fp, X, Y, freqs, a.steps, **plain, compile=False))
        rows["q_fused"].append(quantizer_ms(fp, fast=True))                # --fast
        rows["quick_fused"].append(step_seconds(fp, X, Y, freqs, a.steps, **quick, compile=False, fast=True))
        rows["plain_fused"].append(step_seconds(fp, X, Y, freqs, a.steps, **plain, compile=False, fast=True))
        rows["q_compiled"].append(quantizer_ms(fp, fast=True, compile=True))   # --compile
        rows["quick_compiled"].append(step_seconds(fp, X, Y, freqs, a.steps, **quick, compile=True))
        rows["plain_compiled"].append(step_seconds(fp, X, Y, freqs, a.steps, **plain, compile=True))
        fastpath.FastQuantLinear.merges = lambda *args: False              # the LoRA path in every linear
        try:
            rows["quick_unmerged"].append(step_seconds(fp, X, Y, freqs, a.steps, **quick, compile=True))
            rows["plain_unmerged"].append(step_seconds(fp, X, Y, freqs, a.steps, **plain, compile=True))
        finally:
            fastpath.FastQuantLinear.merges = merges
        rows["gemm"].append(bc.matmul_flops(a.batch * T, dim, 1536))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in rows.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    gemm = med["gemm"]
    print(f"SmolLM2-135M block {a.block}, seqlen {T}, batch {a.batch}, {a.threads} thread(s), load {os.getloadavg()[0]:.2f}; "
          f"medians of {a.rounds} interleaved rounds; block-shaped matmul {gemm / 1e9:.1f} GFLOP/s")
    mfu = {k: f"{100 * flops / med[k] / gemm:.0f}%" for k in med if "_" in k and not k.startswith("q_")}
    ways = ("ref", "fused", "unmerged", "compiled")
    bc.table(["what", "plain: quant.fake_quant, AdamW per tensor", "--fast: FakeQuant eager, AdamW fused",
              "FakeQuant compiled, AdamW fused, LoRA path everywhere", "the same, W_eff merged where it saves flops",
              "plain / last"], [
        ["Q(W) of 7 linears, fwd + bwd (ms)", f"{med['q_ref']:.1f}", f"{med['q_fused']:.1f}", f"{med['q_compiled']:.1f}",
         f"{med['q_compiled']:.1f}", f"{med['q_ref'] / med['q_compiled']:.2f}x"],
        ["--quick step (s)", *(f"{med['quick_' + k]:.3f}" for k in ways),
         f"{med['quick_ref'] / med['quick_compiled']:.2f}x"],
        ["--quick step MFU", *(mfu["quick_" + k] for k in ways), ""],
        ["plain step (paper's start, no learned rounding) (s)", *(f"{med['plain_' + k]:.3f}" for k in ways),
         f"{med['plain_ref'] / med['plain_compiled']:.2f}x"],
        ["plain step MFU", *(mfu["plain_" + k] for k in ways), ""]])


if __name__ == "__main__":
    main()
