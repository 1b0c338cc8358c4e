"""ApiQ calibration (Liao et al., EMNLP 2024, arXiv 2402.05147, eq. (1); METHOD.md §4):
initialise the quantized weights Q (learnable clipping gamma, beta) and the LoRA factors A, B so
that the quantized model's activations match the full-precision model's, block by block.

    python calibrate.py --bits 2 --ckpt llama2-7b                  # the paper's setting, one GPU
    python calibrate.py --bits 2 --quick                           # SmolLM2-135M on a laptop CPU

ApiQ-bw (default) trains a whole transformer block F at once:

    argmin_{gamma, beta, A, B} || F(W, X) - F(Q, A, B, X^q) ||^2                      eq. (1)

X is the block's input in the full-precision model, X^q its input in the already quantized
model. ApiQ-lw (--method lw) does the same one linear at a time, || X W^T - X^q (Q + s B A)^T ||^2.
Only the current block is on the device. After every block the trained tensors are written
atomically to OUT/blocks/, so a killed run continues (same command, or --resume) from the last
finished block; the activations are recomputed by replaying the finished blocks, which on CPU
gives a bit-identical result. The result is a quantized model directory (qmodel.py format).
"""
import copy
import json
import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lora import QuantLinear, quant_linears, swap_linears, weight_errors

LINEAR_ORDER = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # order of use in a block
# settings that change the result: a resumed run must have the same ones
RESULT_KEYS = ("ckpt", "bits", "group_size", "rank", "alpha", "method", "nsamples", "seqlen", "seed", "epochs",
               "lr_clip", "lr_lora", "wd", "aug_loss", "dataset", "dtype", "saliency", "sal_lambda",
               "sal_multiplier", "sal_variant", "weight_penalty")


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 resets the resident high-water mark VmHWM
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gib(device) -> float:
    """Peak since reset_peak_memory: device memory on CUDA, resident host memory on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20            # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # lifetime peak, KiB


@torch.no_grad()
def run_block(block, X, freqs, device, ctx, out_dtype):
    """block(X[i]) for every sample, one at a time (batch size 1, as in training)."""
    outs = []
    for i in range(len(X)):
        with ctx:
            outs.append(block(X[i:i + 1].to(device), freqs)[0].to(device=X.device, dtype=out_dtype))
    return torch.stack(outs)                                                     # (n, T, dim)


@torch.no_grad()
def block_mse(block, Xq, Y, freqs, device, ctx):
    """Mean over samples of mse(Y, F_q(X^q)): the block's activation error."""
    total = 0.0
    for i in range(len(Xq)):
        with ctx:
            out = block(Xq[i:i + 1].to(device), freqs)
        total += F.mse_loss(out.float(), Y[i:i + 1].to(device).float()).item()
    return total / len(Xq)


def quant_block(fp_block, a, seed):
    """A copy of the block with its seven linears as QuantLinear (clipping logits 4.0, LoRA
    init seeded per block so a resumed run draws the same A)."""
    qb = copy.deepcopy(fp_block, memo={id(p): p for p in fp_block.parameters()})  # shares W, no copy
    torch.manual_seed(seed)
    swap_linears(qb, lambda lin: QuantLinear.from_linear(lin, a.bits, a.group_size, a.rank, a.alpha, clip=True))
    return qb


def train(qb, modules, loss_fn, n, a, desc, lr_scale=1.0):
    """AdamW, two groups (clipping, LoRA), batch 1, a.epochs passes in fixed sample order.
    Returns False if a loss went non-finite (the caller retries with lower learning rates)."""
    clip = [p for m in modules for p in m.clip_parameters()]
    lora = [p for m in modules for p in m.lora_parameters()]
    opt = torch.optim.AdamW([{"params": clip, "lr": a.lr_clip * lr_scale},
                             {"params": lora, "lr": a.lr_lora * lr_scale}], weight_decay=a.wd)
    for p in clip + lora:  # ApiQ-lw: a later linear may hold gradients from earlier penalty terms
        p.grad = None
    bar = tqdm(total=a.epochs * n, desc=desc, unit="step", leave=False, mininterval=1.0)
    for epoch in range(a.epochs):
        for i in range(n):
            loss, parts = loss_fn(i)
            if not torch.isfinite(loss):
                bar.close()
                return False
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()}, refresh=False)
            bar.update()
    bar.close()
    return True


def calibrate_block(l, fp_block, X, Xq, Y, Y2, freqs, a, device, ctx, penalty=None):
    """Train block l (METHOD.md §4 step 3); returns the trained quantized block on the device."""
    for attempt, lr_scale in enumerate((1.0, 0.5)):
        qb = quant_block(fp_block, a, a.seed + l).to(device)
        qb.requires_grad_(False)
        mods = dict(quant_linears(qb))
        for m in mods.values():
            for p in m.clip_parameters() + m.lora_parameters():
                p.requires_grad_(True)
        groups = [list(mods.values())] if a.method == "bw" else [[mods[n]] for n in LINEAR_ORDER]
        ok = True
        for group in groups:
            if a.method == "bw":
                def loss_fn(i):
                    with ctx:
                        out = qb(Xq[i:i + 1].to(device), freqs).float()
                    y = Y[i:i + 1].to(device).float()
                    mse = F.mse_loss(out, y)                                           # eq. (1)
                    if Y2 is not None:  # --aug-loss: also match F(W, X^q), as the official scripts
                        mse = mse + F.mse_loss(out, Y2[i:i + 1].to(device).float())
                    return with_penalty(mse, penalty, qb, l)
            else:
                lin = group[0]
                name = next(n for n, m in mods.items() if m is lin)
                xin, xqin = capture_inputs(fp_block.to(device), qb, name, X, Xq, freqs, device, ctx)
                w = fp_block.get_submodule(name).weight

                def loss_fn(i):
                    with ctx:
                        out = lin(xqin[i:i + 1].to(device)).float()
                    target = F.linear(xin[i:i + 1].to(device), w).float()            # X W^T
                    return with_penalty(F.mse_loss(out, target), penalty, qb, l)
            ok = ok and train(qb, group, loss_fn, len(Xq), a, f"block {l} {a.method}", lr_scale)
            if not ok:
                break
            for m in group:
                m.freeze()
        if ok:
            return qb, attempt
        tqdm.write(f"block {l}: non-finite loss, retrying with learning rates x{lr_scale / 2}")
    raise FloatingPointError(f"block {l}: the loss became NaN/inf twice (also with halved learning rates); "
                             f"try --dtype fp32 or lower --lr-clip / --lr-lora")


def with_penalty(mse, penalty, qb, l):
    if penalty is None:
        return mse, {"mse": mse.item()}
    pen = penalty(qb, l)
    return mse + pen, {"mse": mse.item(), "pen": pen.item()}


@torch.no_grad()
def capture_inputs(fp_block, qb, name, X, Xq, freqs, device, ctx):
    """Inputs of linear `name` in the fp block (on X) and in the quantized block (on X^q)."""
    def grab(block, inputs):
        got = []
        h = block.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(i[0][0].to(inputs.device)))
        try:
            for i in range(len(inputs)):
                with ctx:
                    block(inputs[i:i + 1].to(device), freqs)
        finally:
            h.remove()
        return torch.stack(got)                                               # (n, T, in)
    return grab(fp_block, X), grab(qb, Xq)


def block_stats(qb, fp_block):
    """Per-block weight error ||W - (Q + s B A)||_F joined over the seven linears (paper fig. 3)."""
    return math.sqrt(sum(r["error"] ** 2 for r in weight_errors(qb, fp_block)))


def save_block(out: Path, l: int, qb):
    from safetensors.torch import save_file
    tensors = {f"{n}.{k}": getattr(m, k).detach().cpu().contiguous()
               for n, m in quant_linears(qb) for k in ("gamma", "beta", "A", "B")}
    tmp = out / "blocks" / f".block_{l:03d}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp))
    tmp.replace(out / "blocks" / f"block_{l:03d}.safetensors")


def load_block(out: Path, l: int, qb):
    from safetensors.torch import load_file
    t = load_file(str(out / "blocks" / f"block_{l:03d}.safetensors"))
    with torch.no_grad():
        for n, m in quant_linears(qb):
            for k in ("gamma", "beta", "A", "B"):
                getattr(m, k).copy_(t[f"{n}.{k}"])
            m.freeze()
    return qb


def start_or_resume(out: Path, config: dict, resume: bool) -> list:
    """The per-block logs of the finished blocks of an earlier run of the same settings in OUT."""
    if (out / "apiq.json").exists():
        raise ValueError(f"{out} already holds a finished model: choose another --out (nothing was overwritten)")
    progress = out / "progress.json"
    if not progress.exists():
        if resume:
            raise FileNotFoundError(f"--resume: {out} holds no unfinished calibration (no progress.json)")
        return []
    old = json.loads(progress.read_text())
    diff = [f"{k}: {old['config'].get(k)!r} there, {config.get(k)!r} now" for k in RESULT_KEYS
            if old["config"].get(k) != config.get(k)]
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}): use the same settings "
                         f"to continue it or another --out (nothing was overwritten)")
    blocks = old["blocks"]
    print(f"resuming {out}: {len(blocks)} block(s) already calibrated")
    return blocks


def keep_light(qb, src):
    """The calibrated block as held until the final save: its QuantLinear point back at the
    checkpoint's own weights (mmap'd, original dtype) instead of the fp32 working copies, and
    cache no Q(W), so the host never holds a second full copy of the model. export() quantizes
    in fp32 from these same values, so the saved codes are unchanged."""
    qb = qb.cpu()
    for name, m in quant_linears(qb):
        m.weight = src.get_submodule(name).weight.detach()
        m.w_hat, m._stamp = None, None
        for p in m.clip_parameters() + m.lora_parameters():
            p.grad = None
    return qb


QUICK = dict(nsamples=32, seqlen=256, epochs=2)  # the CPU demo (README); the paper: 128 x 2048, 20 epochs


def main(a):
    from cli import check_writable, write_json
    from data import calib_windows
    from llama import load
    from qmodel import check_linears, round_kept_params, save_quantized
    from quant import validate

    for k, v in QUICK.items():
        if getattr(a, k) is None:
            setattr(a, k, v if a.quick else {"nsamples": 128, "seqlen": 2048, "epochs": 20}[k])
    validate(a.bits, a.group_size, a.group_size)
    if min(a.nsamples, a.seqlen, a.epochs, a.rank) <= 0:
        raise ValueError("--nsamples, --seqlen, --epochs and --rank must be positive")
    name = Path(a.ckpt).name.removesuffix(".gguf") if Path(a.ckpt).exists() else a.ckpt
    out = Path(a.out or f"out/{name}-apiq-{a.method}-w{a.bits}g{a.group_size}{'-quick' if a.quick else ''}")
    check_writable(out)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError("on CPU calibration runs in fp32 (--dtype fp32)")
    config = dict(vars(a))
    done = start_or_resume(out, config, a.resume)
    print("config:", json.dumps(config))
    if a.threads:
        torch.set_num_threads(a.threads)

    # the checkpoint stays on the host in its own dtype (mmap'd where the format allows): only
    # the block being calibrated is copied, converted and moved to the device
    model, tok = load(a.ckpt, device="cpu", dtype=None)
    if any(True for _ in quant_linears(model)):
        raise ValueError(f"{a.ckpt} is already quantized: calibrate the full-precision checkpoint")
    check_linears(model, a.group_size)
    if a.seqlen > model.args.max_seq_len:
        raise ValueError(f"--seqlen {a.seqlen} is beyond the model's context of {model.args.max_seq_len}")
    round_kept_params(model)  # embeddings/norms as they will be stored
    tokens = calib_windows(tok, a.nsamples, a.seqlen, a.seed, a.dataset, a.data_dir)  # (n, T)
    penalty = None
    if a.saliency or a.weight_penalty:
        from saliency import make_penalty
        penalty = make_penalty(a, model)

    write_json(out / "config.json", config)  # after every input check: a refused run leaves nothing

    # activations live on the device when 4 copies fit in half its free memory, else on the host
    act_bytes = 4 * tokens.numel() * model.args.dim * dtype.itemsize
    cache = device if device.type == "cuda" and act_bytes < 0.5 * torch.cuda.mem_get_info()[0] else torch.device("cpu")
    ctx = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else nullcontext()
    freqs = model.freqs_cis(a.seqlen, device)
    with torch.no_grad():
        X = model.tok_embeddings(tokens).to(device=cache, dtype=dtype)             # (n, T, dim)
    if cache.type == "cpu" and device.type == "cuda":
        X = X.pin_memory()
    Xq = X                                   # step 1: X = X^q = embeddings
    logs = list(done)
    t_all = time.time()
    for l in range(model.args.n_layers):
        t0 = time.time()
        reset_peak_memory(device)
        fp_block = copy.deepcopy(model.layers[l]).to(device=device, dtype=dtype)
        Y = run_block(fp_block, X, freqs, device, ctx, X.dtype)                    # step 2: targets F(W, X)
        if l < len(done):                    # finished in an earlier run: replay it
            qb = load_block(out, l, quant_block(fp_block, a, a.seed + l).to(device))
            Xq_next = run_block(qb, Xq, freqs, device, ctx, X.dtype)
        else:
            Y2 = (Y if Xq is X else run_block(fp_block, Xq, freqs, device, ctx, X.dtype)) if a.aug_loss else None
            mse_before = block_mse(quant_block(fp_block, a, a.seed + l).to(device), Xq, Y, freqs, device, ctx)
            qb, retries = calibrate_block(l, fp_block, X, Xq, Y, Y2, freqs, a, device, ctx, penalty)   # step 3
            Xq_next = run_block(qb, Xq, freqs, device, ctx, X.dtype)
            mse_after = (Xq_next.float() - Y.float()).pow(2).mean().item()
            target_ms = Y.float().pow(2).mean().item()
            log = {"block": l, "mse_before": mse_before, "mse_after": mse_after, "target_ms": target_ms,
                   "rel_before": mse_before / target_ms, "rel_after": mse_after / target_ms,
                   "weight_error": block_stats(qb, fp_block), "retries": retries,
                   "seconds": round(time.time() - t0, 2), "peak_gib": round(peak_memory_gib(device), 3)}
            if penalty is not None:
                log.update(penalty.report(qb, l, mse_after))
            save_block(out, l, qb)
            logs.append(log)
            write_json(out / "progress.json", {"config": config, "blocks": logs})
            tqdm.write(f"block {l:2d}/{model.args.n_layers}: mse {mse_before:.4g} -> {mse_after:.4g} "
                       f"(rel {log['rel_before']:.3%} -> {log['rel_after']:.3%}), {log['seconds']:.1f} s, "
                       f"peak {log['peak_gib']:.2f} GiB" + (f", retried {retries}x" if retries else "")
                       + (f", penalty {log['penalty']:.4g} ({log['penalty_over_mse']:.3g} x mse)" if penalty else ""))
        model.layers[l] = keep_light(qb, model.layers[l])  # step 4: freeze, X <- Y, X^q <- F_q(X^q)
        del fp_block, qb
        X, Xq = Y, Xq_next
        if a.stop_after and l + 1 - len(done) >= a.stop_after and l + 1 < model.args.n_layers:
            print(f"stopped after {a.stop_after} block(s) as asked; the same command continues from block {l + 1}")
            return out
    seconds = time.time() - t_all
    write_json(out / "calib_log.json", {"config": config, "blocks": logs})
    save_quantized(model, tok, out, {"method": f"apiq-{a.method}", "source": a.ckpt, "made_by": config,
                                     "calibration_seconds": round(seconds, 1)})
    (out / "progress.json").unlink(missing_ok=True)
    print(f"calibrated {model.args.n_layers} blocks in {seconds / 60:.1f} min; saved {out}")
    return out


if __name__ == "__main__":
    import argparse

    from cli import run

    p = argparse.ArgumentParser(description="ApiQ calibration: quantize a Llama checkpoint block by block.")
    p.add_argument("--ckpt", default="smollm2-135m", help="checkpoint name or path (see llama.resolve_ckpt)")
    p.add_argument("--bits", type=int, default=2, help="weight bits (1..8)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (input columns)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--method", default="bw", choices=["bw", "lw"], help="ApiQ-bw (block-wise) or ApiQ-lw (layer-wise)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (paper: 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (paper: 2048)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the windows per block (paper: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sampler and LoRA init")
    p.add_argument("--lr-clip", type=float, default=5e-3, help="AdamW learning rate of the clipping logits")
    p.add_argument("--lr-lora", type=float, default=5e-4, help="AdamW learning rate of A and B")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (both groups)")
    p.add_argument("--aug-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="also match F(W, X^q), as the official scripts do")
    p.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "c4"], help="calibration text")
    p.add_argument("--data-dir", default=None, help="local data directory (default $APIQ_DATA_DIR or ../shared/data)")
    p.add_argument("--quick", action="store_true",
                   help=f"CPU demo: {QUICK['nsamples']} windows x {QUICK['seqlen']} tokens, {QUICK['epochs']} epochs")
    p.add_argument("--saliency", default=None, help="saliency file from saliency.py: adds the weight-preservation penalty")
    p.add_argument("--sal-lambda", type=float, default=1.0, help="penalty strength lambda")
    p.add_argument("--sal-multiplier", type=float, default=1.0, help="lambda_l = lambda * multiplier^l")
    p.add_argument("--sal-variant", default="after", choices=["after", "before"],
                   help="penalise Q(W) + sBA (AfterLoRA) or Q(W) (BeforeLoRA)")
    p.add_argument("--weight-penalty", type=float, default=0.0, help="naive unweighted penalty (alpha_i = 1) strength")
    p.add_argument("--out", default=None, help="output directory (default out/<ckpt>-apiq-<method>-w<bits>g<group>)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out (also automatic)")
    p.add_argument("--stop-after", type=int, default=None, help="calibrate this many blocks, then stop (continue later)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32" if not torch.cuda.is_available() else "bf16",
                   choices=["fp32", "bf16", "fp16"], help="weights and cached activations (CPU: fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run(main, p.parse_args())
