"""Evaluation (METHOD.md §6): perplexity with the GPTQ/OmniQuant protocol, and greedy generation.

    python evaluate.py --ckpt smollm2-135m --ppl wikitext2,c4 --json out/fp.json
    python evaluate.py --method loftq --bits 2 --save out/smollm2-loftq-w2    # a baseline (§3)
    python evaluate.py --ckpt smollm2-135m --prompt "The capital of France is"

Perplexity: the WikiText-2 test rows joined with "\\n\\n" are tokenised as one stream and cut into
non-overlapping windows of --seqlen tokens (tail dropped); C4 is 256 random windows (seed 0).
ppl = exp(mean next-token NLL over all windows). A quantized model directory (--ckpt DIR
written by calibrate.py) is evaluated the same way, its LoRA unmerged.

Zero-shot accuracy (--tasks, tasks.py) is scored as lm-evaluation-harness scores multiple choice:
each option's log-likelihood sum log p(continuation | context); acc = argmax of it, acc_norm = argmax
of it divided by the option's length in characters.

    python evaluate.py --ppl '' --tasks all --json out/fp_zs.json

Errors against full precision (--errors; the data of the ApiQ paper's figs. 3 and 4, drawn by
plots/): the activation error at every block's output and ||W - (Q + s B A)||_F of every linear.

    python evaluate.py --ckpt out/results/apiq-bw-w2 --errors --json out/results/apiq-bw-w2.json
"""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DATASETS, ppl_windows
from tasks import ACC_NORM, TASKS, item_requests, load_task


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


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair: the context's trailing whitespace moves to the continuation,
    then context + continuation is encoded whole and split after the context's own tokens, so a
    tokenizer that would encode the continuation differently alone (SentencePiece's dummy-prefix "▁")
    scores the tokens the harness scores. BOS as the tokenizer adds it (`bos=True`, the model's
    convention): the harness delegates BOS to the tokenizer since PR #3347 (Oct 2025); its earlier
    versions, which the papers' numbers come from, never added one for Llama."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, bos=True)
    cont = tok.encode(context + continuation, bos=True)[len(ctx):]
    if not ctx:  # empty context: the harness conditions on its prefix token instead
        ctx = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    return ctx, cont


@torch.no_grad()
def loglikelihoods(model, tok, requests, batch_size=1, desc="loglik") -> list[float]:
    """sum log p(continuation | context) for each (context, continuation) pair, as lm-eval's
    _loglikelihood_tokens: the input is context + continuation less its last token, cut on the left to
    max_seq_len, and the last len(continuation) positions score the continuation. Longest first,
    right-padded: attention is causal, so the padding after a row never reaches its scored positions."""
    device = next(model.parameters()).device
    max_len = model.args.max_seq_len
    rows = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tok, context, continuation)
        if not 0 < len(cont) <= max_len:
            raise ValueError(f"continuation {continuation[:40]!r} is {len(cont)} tokens: need 1..{max_len}")
        rows.append(((ctx + cont)[-(max_len + 1):], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[b:b + batch_size]
        x = torch.zeros(len(idx), len(rows[idx[0]][0]) - 1, dtype=torch.long)   # (B, T), pad id 0
        for r, i in enumerate(idx):
            x[r, :len(rows[i][0]) - 1] = torch.tensor(rows[i][0][:-1])
        h = model.hidden(x.to(device))                                          # (B, T, dim)
        for r, i in enumerate(idx):
            toks, n = rows[i]
            end = len(toks) - 1                          # positions end-n..end-1 predict toks[-n:]
            logits = model.output(h[r, end - n:end]).float()                    # (n, vocab)
            out[i] = -F.cross_entropy(logits, torch.tensor(toks[-n:], device=device), reduction="sum").item()
            if not math.isfinite(out[i]):
                raise FloatingPointError(f"{desc}: non-finite log-likelihood for request {i}")
    return out


def argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first maximum, as np.argmax


def zero_shot(model, tok, task, items, batch_size=1) -> dict:
    """lm-eval's multiple-choice metrics over tasks.Item's: acc = the option with the highest
    log-likelihood is gold; acc_norm = the same after dividing by the option's length in characters
    (lm-eval's len(choice), the choice without the " " target delimiter; not tokens, so tokenizers
    compare). WinoGrande: acc only, as the harness reports (its options differ in context, not
    continuation)."""
    pairs = [item_requests(item) for item in items]
    lls = iter(loglikelihoods(model, tok, [p for ps in pairs for p in ps], batch_size, desc=task))
    acc = acc_norm = 0
    for item, ps in zip(items, pairs):
        ll = [next(lls) for _ in ps]
        chars = [len(cont) - cont.startswith(" ") for _, cont in ps]
        acc += argmax(ll) == item.gold
        acc_norm += argmax([v / c for v, c in zip(ll, chars)]) == item.gold
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n if task in ACC_NORM else None, "n": n}


@torch.no_grad()
def activation_errors(model, ref, windows) -> list[dict]:
    """ApiQ paper fig. 4: how far the quantized model's hidden states drift from the full-precision
    model's, block by block. Both models run the same windows, each on its own input, so the
    quantized model carries its earlier blocks' errors as it does in use. At block l's output:
        mse_l = mean (Y_l - Y^q_l)^2        rel_l = mse_l / mean Y_l^2
    (rel makes blocks comparable: SmolLM2's hidden states grow a few huge channels; METHOD.md §7)."""
    device = next(model.parameters()).device
    n_layers = model.args.n_layers
    sq_err, sq_ref, n = [0.0] * n_layers, [0.0] * n_layers, 0
    for x in tqdm(windows, desc="act error", unit="win", leave=False):
        x = x[None].to(device)
        freqs = model.freqs_cis(x.shape[1], device)
        h, hq = ref.tok_embeddings(x), model.tok_embeddings(x)
        for l in range(n_layers):
            h, hq = ref.layers[l](h, freqs), model.layers[l](hq, freqs)
            sq_err[l] += (h.float() - hq.float()).pow(2).sum().item()
            sq_ref[l] += h.float().pow(2).sum().item()
        n += h.numel()
    return [{"block": l, "mse": e / n, "rel": e / r} for l, (e, r) in enumerate(zip(sq_err, sq_ref))]


def reference_ckpt(a) -> str:
    """The full-precision checkpoint to measure errors against: --ref, else the quantized
    directory's source (apiq.json), else --ckpt itself when --method quantizes it here."""
    import json
    from pathlib import Path
    if a.ref:
        return a.ref
    if a.method != "fp":
        return a.ckpt
    cfg = Path(a.ckpt) / "apiq.json"
    if cfg.is_file():
        return json.loads(cfg.read_text())["source"]
    raise ValueError("--errors compares a quantized model with full precision: give --method rtn|qlora|loftq, "
                     "a quantized --ckpt directory, or --ref")


def parse_list(s, allowed, what):
    items = [x.strip() for x in s.split(",") if x.strip()]
    for x in items:
        if x not in allowed:
            raise ValueError(f"unknown {what} {x!r}: choose from {', '.join(allowed)}")
    return items


def main(a):
    from cli import check_writable, write_json
    from llama import load
    from lora import quant_linears, weight_errors
    from qmodel import quantize_model, save_quantized
    from quant import validate

    t0 = time.time()
    datasets = parse_list(a.ppl, DATASETS, "dataset") if a.ppl else []
    tasks = parse_list(a.tasks, TASKS + ("all",), "task") if a.tasks else []
    tasks = list(TASKS) if "all" in tasks else tasks
    if a.seqlen <= 0 or any(n is not None and n <= 0 for n in (a.limit, a.task_limit)) or a.error_windows <= 0:
        raise ValueError("--seqlen, --limit, --task-limit and --error-windows must be positive")
    task_limit = a.task_limit or a.limit
    items = {name: load_task(name, a.data_dir)[:task_limit] for name in tasks}  # missing files fail before loading
    ref_ckpt = reference_ckpt(a) if a.errors else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if a.threads:
        torch.set_num_threads(a.threads)
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
    if a.errors:
        t = time.time()
        ref, _ = load(ref_ckpt, device=a.device, dtype=dtype)
        if any(True for _ in quant_linears(ref)):
            raise ValueError(f"--ref {ref_ckpt} is quantized: errors are measured against full precision")
        windows = ppl_windows("wikitext2", tok, a.seqlen, a.data_dir)[: a.error_windows]
        results["errors"] = {"reference": ref_ckpt, "windows": len(windows), "seqlen": a.seqlen,
                             "activation": activation_errors(model, ref, windows),
                             "weight": weight_errors(model, ref)}
        results.setdefault("seconds", {})["errors"] = round(time.time() - t, 2)
        del ref
        rel = [r["rel"] for r in results["errors"]["activation"]]
        print(f"activation error (rel. to target mean square) per block: first {rel[0]:.3%}, last {rel[-1]:.3%}, "
              f"max {max(rel):.3%}")
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
    for name, task_items in items.items():
        t = time.time()
        results.setdefault("zeroshot", {})[name] = zero_shot(model, tok, name, task_items, a.batch_size)
        results.setdefault("seconds", {})[name] = round(time.time() - t, 2)
    if items:
        # The average is of acc on all five tasks, acc_norm on none: the papers' full-precision
        # LLaMA-2-7B average of 64.85 (METHOD.md §7) is the mean of lm-eval's acc for that model (about
        # WinoGrande 69, HellaSwag 57, ARC-C 43.5, ARC-E 76, PIQA 78); with acc_norm for HellaSwag (~76)
        # and ARC-C (~46) it would be ~69. acc_norm is still reported per task.
        results["zeroshot_avg"] = sum(r["acc"] for r in results["zeroshot"].values()) / len(items)
        print(f"\n| {'task':13} | {'n':>5} | {'acc':>6} | {'acc_norm':>8} |")
        print(f"|{'-' * 15}|{'-' * 7}|{'-' * 8}|{'-' * 10}|")
        for name, r in results["zeroshot"].items():
            norm = "-" if r["acc_norm"] is None else f"{100 * r['acc_norm']:.2f}"
            print(f"| {name:13} | {r['n']:5d} | {100 * r['acc']:6.2f} | {norm:>8} |")
        print(f"| {'average (acc)':13} | {'':5} | {100 * results['zeroshot_avg']:6.2f} | {'':8} |")
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

    p = argparse.ArgumentParser(description="Perplexity (GPTQ protocol), zero-shot accuracy (lm-eval protocol) "
                                "and generation for a Llama checkpoint.")
    p.add_argument("--ckpt", default="smollm2-135m", help="checkpoint name or path (see llama.resolve_ckpt)")
    p.add_argument("--ppl", default="wikitext2,c4", help="comma-separated datasets for perplexity ('' for none)")
    p.add_argument("--data-dir", default=None, help="local data directory (default $APIQ_DATA_DIR or ../shared/data)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens")
    p.add_argument("--tasks", default="", help=f"comma-separated zero-shot tasks ({', '.join(TASKS)}) or 'all'")
    p.add_argument("--limit", type=int, default=None, help="only the first N windows / items of each dataset / task")
    p.add_argument("--task-limit", type=int, default=None, help="only the first N items of each task (default --limit)")
    p.add_argument("--errors", action="store_true",
                   help="activation error per block and weight error per linear against full precision (figs. 3, 4)")
    p.add_argument("--ref", default=None, help="full-precision checkpoint for --errors (default: the model's source)")
    p.add_argument("--error-windows", type=int, default=1, help="WikiText-2 test windows for the activation error")
    p.add_argument("--batch-size", type=int, default=1, help="windows, or scored options, per forward pass")
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
