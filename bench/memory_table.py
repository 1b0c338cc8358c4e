"""Memory of calibration, saliency and finetuning for Llama-2-7B / 13B and Llama-2-70B on one GPU,
on paper: the shapes and this code's data layout, with the per-token and per-weight figures
measured on SmolLM2 and on the synthetic 7B checkpoint (bench/bench_7b.py, bench_finetune.py;
docs/scaling.md). Prints a Markdown table; no model is loaded.

    python bench/memory_table.py                       # the paper's settings (128 x 2048, bf16, r 64, g64)
    python bench/memory_table.py --nsamples 64 --seqlen 512 --learn-rounding    # --long's recipe
    python bench/memory_table.py --measure 4096          # QUANT_TEMP: one random 7B-shaped block, bf16, CPU
"""
import argparse

GIB = 2**30
SHAPES = {  # dim, blocks, FFN width, key/value width, vocabulary
    "7B": (4096, 32, 11008, 4096, 32000),
    "13B": (5120, 40, 13824, 5120, 32000),
    "70B": (8192, 80, 28672, 1024, 32000),
}
ACT_BYTES = 78 / 2        # training activations per token per block per unit of width, bf16 (78 B in fp32, measured)
# bytes per weight of the block being calibrated beyond its bf16 weights: QuantLinear's parameters and a
# training step's fake-quant temporaries (--measure 4096: 18.6 at 7B's block shape; 27.5 at width 2048;
# --learn-rounding adds 16: 43.8 at 2048)
QUANT_TEMP = 19
LOGIT_BYTES = 12          # per token per vocabulary entry: fp32 logits, their softmax and gradient


def linears(dim, ffn, kv):
    """(out, in) of one block's seven linears."""
    return [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (ffn, dim), (dim, ffn)]


def rows(a):
    out = {}
    for name, (dim, L, ffn, kv, vocab) in SHAPES.items():
        lin = linears(dim, ffn, kv)
        block = sum(o * i for o, i in lin)                                   # weights of one block
        lora = sum(a.rank * (o + i) for o, i in lin)                         # A, B of one block
        bits = a.bits + 32 / a.group_size + 8 / a.group_size                 # codes + fp32 scale + int8 zero
        emb = 2 * vocab * dim * 2                                            # embeddings + head, bf16
        act = a.nsamples * a.seqlen * dim * 2                                # one copy of the cached activations
        rounding = 16 * block if a.learn_rounding else 0                     # offsets: fp32 value, grad, 2 moments
        calib_dev = 6 * act + block * (2 + QUANT_TEMP) + 16 * lora + rounding + ACT_BYTES * dim * a.seqlen
        # streamed saliency: one block (bf16) + its weight gradients + fp32 alpha, head, one sequence
        sal_dev = block * (2 + 2 + 4) + emb / 2 + a.sal_seqlen * vocab * LOGIT_BYTES + \
            (ACT_BYTES * dim + 4 * dim) * a.sal_seqlen
        sal_host = (L + 1) * a.sal_nsamples * a.sal_seqlen * dim * 2         # every block's input, every sequence
        packed = L * block * bits / 8
        ft_tokens = a.ft_seqlen * a.ft_batch
        ft = packed + emb + 16 * L * lora + (ACT_BYTES * dim * L + vocab * LOGIT_BYTES) * ft_tokens
        out[name] = {
            "the checkpoint, fp16": (L * block * 2 + emb) / GIB,
            "calibration, GPU: the cached activations (X, X^q, Y, Y2, next X^q, concat) + one block + its step":
                calib_dev / GIB,
            "calibration, GPU, the activations on the host (where 6 copies exceed half the free memory)":
                (calib_dev - 6 * act) / GIB,
            "calibration, host: the packed blocks (+ 6 activation copies where they live there)": packed / GIB,
            f"saliency --stream, GPU ({a.sal_seqlen}-token sequences)": sal_dev / GIB,
            f"saliency --stream, host: {a.sal_nsamples} sequences' block inputs": sal_host / GIB,
            "saliency, whole model on the GPU (bf16 weights + grads, fp32 alpha)": (L * block * 8 + emb) / GIB,
            f"finetune --packed, GPU, {a.ft_batch} x {a.ft_seqlen} tokens a pass": ft / GIB,
            "evaluate --packed (weights + LoRA + embeddings)": (packed + 4 * L * lora + emb) / GIB,
        }
    return out


def measure(dim, learn_rounding):
    """Peak resident growth per weight of calibrate_block (2 steps of 2 x 64 tokens, bf16 autocast on
    the CPU, the paper's settings) on one random block of width `dim`."""
    import sys
    from pathlib import Path

    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import calibrate
    from cli import peak_memory_gib, reset_peak_memory
    from llama import ModelArgs, Transformer, precompute_freqs_cis
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = ModelArgs(dim=dim, n_layers=1, n_heads=dim // 128, vocab_size=32, multiple_of=256)
    block = Transformer(args).layers[0].to(torch.bfloat16).requires_grad_(False)
    n = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    cfg = calibrate.make_config(nsamples=2, seqlen=64, epochs=1, dtype="bf16", device="cpu",
                                learn_rounding=learn_rounding)
    freqs = precompute_freqs_cis(dim // args.n_heads, 64, args.rope_theta)
    X = torch.randn(2, 64, dim, dtype=torch.bfloat16)                           # (n, T, dim)
    Y = calibrate.run_block(block, X, freqs, "cpu")
    base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 2**20
    reset_peak_memory("cpu")
    calibrate.calibrate_block(0, block, calibrate.Acts(X, X, Y, None), freqs, cfg)
    print(f"width {dim}: {n / 1e6:.1f}M weights; calibrating the block grew resident memory by "
          f"{(peak_memory_gib('cpu') - base) * GIB / n:.1f} bytes a weight (learned rounding: {learn_rounding})")


def main(a):
    if a.measure:
        return measure(a.measure, a.learn_rounding)
    table = rows(a)
    names = list(SHAPES)
    print(f"GiB; calibration {a.nsamples} x {a.seqlen} tokens, w{a.bits} g{a.group_size}, rank {a.rank}"
          f"{', learned rounding' if a.learn_rounding else ''}; bf16 weights and activations\n")
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for key in table[names[0]]:
        print(f"| {key} | " + " | ".join(f"{table[n][key]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--learn-rounding", action="store_true")
    p.add_argument("--sal-nsamples", type=int, default=100)
    p.add_argument("--sal-seqlen", type=int, default=512)
    p.add_argument("--ft-seqlen", type=int, default=1024)
    p.add_argument("--ft-batch", type=int, default=1)
    p.add_argument("--measure", type=int, default=None, help="measure QUANT_TEMP on one block of this width instead")
    main(p.parse_args())
