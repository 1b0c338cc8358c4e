"""Evaluation (METHOD.md §6): perplexity with the GPTQ/OmniQuant protocol, and greedy generation.

    python evaluate.py --ckpt smollm2-135m --ppl wikitext2,c4 --json out/fp.json
    python evaluate.py --method loftq --bits 2 --save out/smollm2-loftq-w2    # a baseline (§3)
    python evaluate.py --ckpt smollm2-135m --prompt "The capital of France is"

Perplexity: the WikiText-2 test rows joined with "\\n\\n" are tokenised as one stream and cut into
non-overlapping windows of --seqlen tokens (tail dropped); C4 is 256 random windows (seed 0).
ppl = exp(mean next-token NLL over all windows). A quantized model directory (--ckpt DIR
written by calibrate.py) is evaluated the same way, its LoRA unmerged.
"""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DATASETS, ppl_windows


@torch.no_grad()
def window_nll(model, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Mean next-token NLL of each row of x (B, T). The head runs on `chunk` positions at a time,
    so the (B, T, vocab) fp32 logits never exist at once."""
    h = model.hidden(x)                                                     # (B, T, dim)
    total = torch.zeros(x.shape[0], device=x.device)
    for t in range(0, x.shape[1] - 1, chunk):
        logits = model.output(h[:, t:t + chunk][:, : x.shape[1] - 1 - t]).float()  # (B, c, vocab)
        target = x[:, t + 1:t + 1 + logits.shape[1]]                        # (B, c)
        # one row per position: torch's CPU log-softmax over a non-last dim, (B, vocab, c), is ~3x
        # slower and sums the vocab's exponentials less accurately (~1e-4 NLL off a float64 reference)
        nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")  # (B*c,)
        total += nll.view(target.shape).sum(1)
    return total / (x.shape[1] - 1)


def perplexity(model, windows: torch.Tensor, batch_size=1, desc="ppl") -> float:
    """exp of the mean per-window NLL: with equal windows this is exp(mean token NLL), and it is
    what GPTQ computes (mean loss * seqlen summed, divided by n * seqlen)."""
    device = next(model.parameters()).device
    nlls = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="win", leave=False):
        nll = window_nll(model, windows[i:i + batch_size].to(device))
        if not torch.isfinite(nll).all():
            raise FloatingPointError(f"{desc}: non-finite loss in windows {i}..{i + batch_size - 1}")
        nlls.append(nll.cpu())
    return math.exp(torch.cat(nlls).double().mean().item())


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens=32) -> str:
    """Greedy decoding, recomputing the prefix each step: short answers, no KV cache to keep."""
    device = next(model.parameters()).device
    ids = tok.encode(prompt, bos=True)
    start = len(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-model.args.max_seq_len:]], device=device)
        nxt = int(model.output(model.hidden(x)[:, -1]).argmax(-1))
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
    return tok.decode(ids[start:])


def parse_list(s, allowed, what):
    items = [x.strip() for x in s.split(",") if x.strip()]
    for x in items:
        if x not in allowed:
            raise ValueError(f"unknown {what} {x!r}: choose from {', '.join(allowed)}")
    return items


def main(a):
    from cli import check_writable, write_json
    from llama import load
    from lora import quant_linears
    from qmodel import quantize_model, save_quantized
    from quant import validate

    t0 = time.time()
    datasets = parse_list(a.ppl, DATASETS, "dataset") if a.ppl else []
    if a.seqlen <= 0 or (a.limit is not None and a.limit <= 0):
        raise ValueError("--seqlen and --limit must be positive")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    torch.set_num_threads(a.threads) if a.threads else None
    if a.method != "fp":
        validate(a.bits, a.group_size, a.group_size)
    if a.save and a.method == "fp":
        raise ValueError("--save needs a quantization --method (rtn, qlora, loftq)")
    if a.save:
        check_writable(a.save)
    model, tok = load(a.ckpt, device=a.device, dtype=dtype)
    if a.seqlen > model.args.max_seq_len:
        raise ValueError(f"--seqlen {a.seqlen} is beyond the model's context of {model.args.max_seq_len} tokens")
    config = {k: v for k, v in vars(a).items()}
    print("config:", config)
    results = {"ppl": {}, "config": config}
    if a.method != "fp":
        if any(True for _ in quant_linears(model)):
            raise ValueError(f"{a.ckpt} is already quantized: evaluate it with --method fp")
        t = time.time()
        quantize_model(model, a.method, a.bits, a.group_size, a.rank, a.alpha, a.loftq_iters)
        results["quantize_seconds"] = round(time.time() - t, 2)
        if a.save:
            save_quantized(model, tok, a.save, {"method": a.method, "source": a.ckpt, "made_by": config})
            print(f"saved {a.method} w{a.bits}g{a.group_size} model to {a.save}")
    for name in datasets:
        windows = ppl_windows(name, tok, a.seqlen, a.data_dir)
        if a.limit:
            windows = windows[: a.limit]
        t = time.time()
        results["ppl"][name] = perplexity(model, windows, a.batch_size, desc=name)
        results.setdefault("tokens", {})[name] = windows.numel()
        results.setdefault("seconds", {})[name] = round(time.time() - t, 2)
    if results["ppl"]:
        print(f"\n| {'dataset':10} | {'windows':>7} | {'ppl':>10} |\n|{'-' * 12}|{'-' * 9}|{'-' * 12}|")
        for name, ppl in results["ppl"].items():
            print(f"| {name:10} | {results['tokens'][name] // a.seqlen:7d} | {ppl:10.3f} |")
    if a.prompt:
        answer = generate(model, tok, a.prompt, a.max_new_tokens)
        results["generation"] = {"prompt": a.prompt, "answer": answer}
        print(f"\n{a.prompt}{answer}")
    results["seconds_total"] = round(time.time() - t0, 2)
    if a.json:
        write_json(a.json, results)
        print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    import argparse

    from cli import run

    p = argparse.ArgumentParser(description="Perplexity (GPTQ protocol) and generation for a Llama checkpoint.")
    p.add_argument("--ckpt", default="smollm2-135m", help="checkpoint name or path (see llama.resolve_ckpt)")
    p.add_argument("--ppl", default="wikitext2,c4", help="comma-separated datasets for perplexity ('' for none)")
    p.add_argument("--data-dir", default=None, help="local data directory (default $APIQ_DATA_DIR or ../shared/data)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows of each dataset")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--method", default="fp", choices=["fp", "rtn", "qlora", "loftq"],
                   help="fp = the checkpoint as it is; else quantize it first with this baseline init")
    p.add_argument("--bits", type=int, default=2, help="weight bits for --method (1..8)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (input columns)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r for qlora/loftq")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--loftq-iters", type=int, default=5, help="LoftQ alternating steps T")
    p.add_argument("--save", default=None, help="save the quantized model to this directory (apiq format)")
    p.add_argument("--prompt", default=None, help="greedily continue this text and print it")
    p.add_argument("--max-new-tokens", type=int, default=32, help="length of the generated continuation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight/activation dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write results and the config used to this JSON file")
    run(main, p.parse_args())
