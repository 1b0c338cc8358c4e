"""ApiQ calibration (Liao et al., EMNLP 2024, arXiv 2402.05147, section 3): initialise the
quantized weights Q (learnable clipping gamma, beta) and the LoRA factors A, B so that the
quantized model's activations match the full-precision model's, block by block.

    python calibrate.py --bits 2 --ckpt llama2-7b           # the paper's setting, one GPU
    python calibrate.py --bits 2 --quick                    # SmolLM2-135M on a laptop CPU
    python calibrate.py --bits 2 --method loftq             # a baseline init of section 3

Every initialisation of section 3 is made here (--method): rtn, qlora and loftq are data-free
(lora.py); lw (ApiQ-lw) and bw (ApiQ-bw, the default) train on calibration windows. Going
through the blocks in order, with X the block's input in the full-precision model and X^q its
input in the model quantized so far, ApiQ-bw takes optimizer steps on windows of X^q with

    loss = ||F(W, X) - F_q(X^q)||^2                                          eq. (1)
         + ||F(W, X^q) - F_q(X^q)||^2                       --aug-loss (on by default, as the official scripts)
         + lambda_l sum_i alpha_i (w_i - W_eff,i)^2          --saliency: Cao & Aref (arXiv 2504.13932) eq. (2)

over gamma, beta, A, B of the block's seven linears: bw_objective, below. F is the block,
F_q the block with every linear y = x Q(W)^T + s (x A^T) B^T, ||.||^2 the mean square over the
output's elements. ApiQ-lw trains one linear at a time on ||X W^T - X^q (Q + s B A)^T||^2
(lw_objective). Only the current block is on the device. After every block its quantized
tensors are written atomically to OUT/blocks/, so a killed run continues (same command) from
the last finished block, bit-identical on CPU. The result is a quantized model directory
(qmodel.py); the paper's settings are in docs/method.md.
"""
import copy
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import (DTYPES, arg, as_flags, check_device, check_writable, peak_memory_gib, reset_peak_memory, result_settings,
                 with_default_dtype, write_json)
from llama import LINEARS, check_seqlen, release_pages
from lora import QuantLinear, quant_linears, swap_linears, use_qweights, weight_errors
from qmodel import INITS, check_linears, linear_part, linear_tensors, load, require_fp, round_kept_params, save_quantized

METHODS = ("bw", "lw") + INITS
ON_GPU = torch.cuda.is_available()


# Beyond the paper, for a CPU budget (measured in bench/bench_recipes.py, README): the LoRA factors
# start from the SVD of W - Q(W), every weight learns a rounding offset, higher learning rates
# decay along a cosine. --quick drops the --aug-loss term (no measured effect with these options).
FAST = dict(lora_init="svd", learn_rounding=True, lr_schedule="cosine", lr_lora=2e-3, lr_clip=1e-2)
QUICK = dict(nsamples=32, seqlen=256, epochs=2, aug_loss=False, **FAST)
LONG = dict(nsamples=64, seqlen=512, epochs=4, **FAST)



@dataclass
class Config:
    """One run of calibrate.py. The defaults are the ApiQ paper's main setting (section 4)."""
    ckpt: str = arg("smollm2-135m", "checkpoint to quantize: a path or a name (README, Checkpoints)")
    method: str = arg("bw", "bw = ApiQ-bw, lw = ApiQ-lw; rtn, qlora, loftq = the data-free inits", choices=METHODS)
    bits: int = arg(2, "weight bits (1..8)")
    group_size: int = arg(64, "quantization group size (input columns per scale and zero)")
    rank: int = arg(64, "LoRA rank r")
    lora_alpha: float = arg(16.0, "LoRA alpha: the update B A is scaled by lora_alpha / rank")
    loftq_iters: int = arg(5, "LoftQ alternating steps T (--method loftq)")
    nsamples: int = arg(128, "calibration windows")
    seqlen: int = arg(2048, "tokens per calibration window")
    epochs: int = arg(20, "passes over the windows per block")
    batch_size: int = arg(1, "windows per optimizer step")
    seed: int = arg(0, "seed of the window sampler and of the LoRA init")
    lr_clip: float = arg(5e-3, "AdamW learning rate of the clipping logits gamma, beta")
    lr_lora: float = arg(5e-4, "AdamW learning rate of A and B")
    wd: float = arg(0.1, "AdamW weight decay (both groups)")
    aug_loss: bool = arg(True, "also match F(W, X^q), as the official scripts do")
    lr_schedule: str = arg("constant", "learning rates over a block's steps: constant (paper), or decaying to 0 "
                           "linearly or along a cosine", choices=("constant", "linear", "cosine"))
    learn_rounding: bool = arg(False, "beyond the paper: also learn a rounding offset per weight in [-0.5, 0.5] "
                               "(AutoRound); the codes stay N-bit")
    lr_round: float = arg(5e-3, "AdamW learning rate of the rounding offsets (--learn-rounding)")
    lora_init: str = arg("standard", "A, B at the start of a block: standard (A random, B = 0; paper) or svd "
                         "(rank-r SVD of W - Q(W), one LoftQ step)", choices=("standard", "svd"))
    dataset: str = arg("wikitext2", "calibration text", choices=("wikitext2", "c4"))
    saliency: Optional[str] = arg(None, "saliency directory from saliency.py: adds the penalty of Cao & Aref eq. (2)")
    sal_lambda: float = arg(1.0, "penalty strength lambda")
    sal_multiplier: float = arg(1.0, "lambda_l = lambda * multiplier^l")
    sal_variant: str = arg("after", "penalise Q(W) + sBA (after, AfterLoRA) or Q(W) (before)", choices=("after", "before"))
    weight_penalty: float = arg(0.0, "strength of the naive unweighted penalty (alpha_i = 1)")
    sal_ratio: Optional[float] = arg(None, "beyond the paper, scale-free: lambda_l set so that the penalty is this "
                                     "times the block's output MSE at its start (replaces --sal-lambda)", type=float)
    dtype: str = arg("bf16" if ON_GPU else "fp32", "weights and cached activations; bf16/fp16 also on CPU (slow "
                     "there, the same code path as on a GPU)", choices=tuple(DTYPES))
    quick: bool = arg(False, f"the CPU recipe (SmolLM2: < 10 min on one core): {as_flags(QUICK)}", result=False)
    long: bool = arg(False, f"the long CPU recipe (SmolLM2: ~1 h on one core): {as_flags(LONG)}", result=False)
    out: Optional[str] = arg(None, "output directory (default out/<ckpt>-<method>-w<bits>g<group>)", result=False)
    data_dir: Optional[str] = arg(None, "local data directory (default $APIQ_DATA_DIR or ../shared/data)", result=False)
    stop_after: Optional[int] = arg(None, "calibrate this many blocks, then stop (the same command continues)",
                                    result=False, type=int)
    device: str = arg("cuda" if ON_GPU else "cpu", "cpu or cuda", result=False)
    threads: Optional[int] = arg(None, "torch CPU threads (pass 1 beside another job)", result=False, type=int)


def make_config(**given) -> Config:
    """Config from the given settings, --quick's or --long's recipe filling what was not given."""
    if given.get("quick") and given.get("long"):
        raise ValueError("--quick and --long are two recipes: give one")
    preset = QUICK if given.get("quick") else LONG if given.get("long") else {}
    return Config(**with_default_dtype(preset | given))


# ---- the objective of one optimizer step

def effective(m, q):
    """W_eff = Q(W) + s B A (out, in) of QuantLinear m, differentiable in Q(W), B and A. With the
    AfterLoRA penalty the step computes it once: the forward x W_eff^T costs about what the LoRA
    path x Q^T + s (x A^T) B^T does at a few hundred tokens, and the penalty then needs no
    product B A of its own (bench/bench_penalty.py)."""
    return torch.addmm(q, m.B, m.A, alpha=m.scaling)


def merges(penalty, q) -> bool:
    """Whether a step computes W_eff once (effective): with the AfterLoRA penalty, in fp32. In
    bf16 / fp16 a small s B A would round away in one low-precision W_eff, so there the forward
    keeps the separate LoRA path and the penalty its own B A."""
    return penalty is not None and penalty.variant == "after" and q.dtype == torch.float32


def bw_objective(qb, linears, xq, y, y2, freqs, ctx, penalty=None, l=0):
    """ApiQ-bw on windows X^q (B, T, dim) of block l with targets Y = F(W, X), Y2 = F(W, X^q):

        loss = ||Y - F_q(X^q)||^2 [+ ||Y2 - F_q(X^q)||^2] [+ lambda_l sum_i alpha_i (w_i - W_eff,i)^2]

    linears: {name: QuantLinear} of the block qb. Returns (loss, its parts for the progress bar)."""
    qs = [m.qweight() for m in linears.values()]      # Q(W) of this step, differentiable in gamma, beta
    merged = merges(penalty, qs[0])
    if merged:                                         # W_eff = Q(W) + s B A once, for the forward and the penalty
        qs = [effective(m, q) for m, q in zip(linears.values(), qs)]
    with use_qweights(linears.values(), qs, merged), ctx:
        out = qb(xq, freqs).float()                    # F_q(X^q), (B, T, dim)
    mse = F.mse_loss(out, y.float())                   # eq. (1)
    if y2 is not None:
        mse = mse + F.mse_loss(out, y2.float())        # --aug-loss
    if penalty is None:
        return mse, {"mse": mse.item()}
    pen = penalty(l, linears, qs, merged)              # Cao & Aref eq. (2)
    return mse + pen, {"mse": mse.item(), "pen": pen.item()}


def lw_objective(name, lin, x, xq, w, ctx, penalty=None, l=0):
    """ApiQ-lw for one linear on its inputs X (B, T, in) in the fp block and X^q in the quantized one:

        loss = ||X W^T - X^q (Q(W) + s B A)^T||^2 [+ lambda_l sum_i alpha_i (w_i - W_eff,i)^2]"""
    q = lin.qweight()
    merged = merges(penalty, q)
    q = effective(lin, q) if merged else q             # W_eff once, for the forward and the penalty
    with use_qweights([lin], [q], merged), ctx:
        out = lin(xq).float()                          # X^q (Q + s B A)^T, (B, T, out)
    mse = F.mse_loss(out, F.linear(x, w).float())      # against X W^T
    if penalty is None:
        return mse, {"mse": mse.item()}
    pen = penalty(l, {name: lin}, [q], merged)
    return mse + pen, {"mse": mse.item(), "pen": pen.item()}


# ---- training one block

def lr_factor(schedule, step, total):
    """Multiplier of the learning rates at `step` of `total` (a block's steps)."""
    if schedule == "linear":
        return 1 - step / total
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    return 1.0


def train(linears, objective, n, cfg, desc, lr_scale=1.0):
    """AdamW, parameter groups clipping and LoRA (the paper's) and rounding offsets
    (--learn-rounding, no weight decay), cfg.epochs passes over the n windows in fixed order,
    cfg.batch_size windows a step. objective(slice) -> (loss, parts). Returns False if a loss
    went non-finite (the caller retries with lower learning rates)."""
    linears = list(linears)
    clip = [p for m in linears for p in m.clip_parameters()]
    lora = [p for m in linears for p in m.lora_parameters()]
    offsets = [p for m in linears for p in m.round_parameters()]
    groups = [{"params": clip, "lr": cfg.lr_clip * lr_scale}, {"params": lora, "lr": cfg.lr_lora * lr_scale}]
    if offsets:
        groups.append({"params": offsets, "lr": cfg.lr_round * lr_scale, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.wd)
    for p in clip + lora + offsets:
        p.requires_grad_(True)
        p.grad = None
    starts = range(0, n, cfg.batch_size)
    total = cfg.epochs * len(starts)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(cfg.lr_schedule, k, total))
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=1.0)
    for _ in range(cfg.epochs):
        for i in starts:
            loss, parts = objective(slice(i, i + cfg.batch_size))
            if not torch.isfinite(loss):
                bar.close()
                return False
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for v in offsets:
                    v.clamp_(-0.5, 0.5)      # V stays a rounding offset: W / step moves by less than one code
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()}, refresh=False)
            bar.update()
    bar.close()
    return True


def quant_block(fp_block, cfg, seed):
    """A copy of the block with its seven linears as QuantLinear (clipping logits 4.0, LoRA init
    seeded per block, so a resumed run draws the same A). Shares the fp weights: no copy."""
    qb = copy.deepcopy(fp_block, memo={id(p): p for p in fp_block.parameters()})
    torch.manual_seed(seed)
    swap_linears(qb, lambda lin: QuantLinear.from_linear(lin, cfg.bits, cfg.group_size, cfg.rank, cfg.lora_alpha,
                                                         cfg.learn_rounding))
    if cfg.lora_init == "svd":
        for _, m in quant_linears(qb):
            svd_start(m)
    return qb


@torch.no_grad()
def svd_start(m):
    """A, B from the rank-r SVD of W - Q(W) at the starting clipping (one step of LoftQ's
    Algorithm 1), so the block starts at Q + s B A, closer to W than Q alone."""
    w = m.weight.float()
    u, sv, vh = torch.linalg.svd(w - m.qweight().float(), full_matrices=False)   # (out, k), (k,), (k, in)
    root = (sv[:m.rank] / m.scaling).sqrt()                                       # s B A = U S V^T
    m.B.copy_(u[:, :m.rank] * root)                                               # (out, r)
    m.A.copy_(root.unsqueeze(1) * vh[:m.rank])                                    # (r, in)


def calibrate_block(l, fp_block, X, Xq, Y, Y2, freqs, cfg, device, ctx, penalty=None, start=None):
    """Train block l; returns (the quantized block, frozen, on the device; retries needed).
    start: quant_block(fp_block, cfg, cfg.seed + l) on the device, if the caller already made it."""
    def dev(t, idx):
        return None if t is None else t[idx].to(device)

    for attempt, lr_scale in enumerate((1.0, 0.5)):
        qb = start if attempt == 0 and start is not None else quant_block(fp_block, cfg, cfg.seed + l).to(device)
        linears = dict(quant_linears(qb))
        desc = f"block {l} {cfg.method}"
        if cfg.method == "bw":
            ok = train(linears.values(), lambda i: bw_objective(qb, linears, dev(Xq, i), dev(Y, i), dev(Y2, i),
                                                                freqs, ctx, penalty, l), len(Xq), cfg, desc, lr_scale)
            if ok:
                for m in linears.values():
                    m.freeze()
        else:
            for name in LINEARS:             # in the order of use: each sees its frozen predecessors
                lin, w = linears[name], fp_block.get_submodule(name).weight
                x, xq = capture_inputs(fp_block, qb, name, X, Xq, freqs, device, ctx)
                ok = train([lin], lambda i: lw_objective(name, lin, dev(x, i), dev(xq, i), w, ctx, penalty, l),
                           len(Xq), cfg, f"{desc} {name}", lr_scale)
                if not ok:
                    break
                lin.freeze()
        if ok:
            return qb, attempt
        tqdm.write(f"block {l}: non-finite loss, retrying with learning rates x{lr_scale / 2}")
    raise FloatingPointError(f"block {l}: the loss became NaN/inf twice (also with halved learning rates); "
                             f"try --dtype fp32 or lower --lr-clip / --lr-lora")


PASS_BATCH = 4  # windows per forward in the passes without gradients


@torch.no_grad()
def run_block(block, X, freqs, device, ctx, out_dtype):
    """block(X) over all windows, PASS_BATCH at a time."""
    outs = []
    for i in range(0, len(X), PASS_BATCH):
        with ctx:
            outs.append(block(X[i:i + PASS_BATCH].to(device), freqs).to(device=X.device, dtype=out_dtype))
    return torch.cat(outs)                                                       # (n, T, dim)


@torch.no_grad()
def block_mse(block, Xq, Y, freqs, device, ctx):
    """mse(Y, F_q(X^q)) over all windows: the block's activation error."""
    total = 0.0
    for i in range(0, len(Xq), PASS_BATCH):
        with ctx:
            out = block(Xq[i:i + PASS_BATCH].to(device), freqs)
        total += F.mse_loss(out.float(), Y[i:i + PASS_BATCH].to(device).float(), reduction="sum").item()
    return total / Y.numel()


@torch.no_grad()
def capture_inputs(fp_block, qb, name, X, Xq, freqs, device, ctx):
    """Inputs of linear `name` in the fp block (on X) and in the quantized block (on X^q)."""
    def grab(block, inputs):
        got = []
        h = block.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(i[0].to(inputs.device)))
        try:
            run_block(block, inputs, freqs, device, ctx, inputs.dtype)
        finally:
            h.remove()
        return torch.cat(got)                                                 # (n, T, in)
    return grab(fp_block, X), grab(qb, Xq)


# ---- the block loop: resumable, one block on the device at a time

def save_block(out: Path, l: int, qb):
    from safetensors.torch import save_file

    from cli import atomic_write
    tensors = {k: v for name, m in quant_linears(qb) for k, v in linear_tensors(name, m).items()}
    atomic_write(out / "blocks" / f"block_{l:03d}.safetensors", lambda tmp: save_file(tensors, tmp))


def load_block(out: Path, l: int, fp_block, cfg, device):
    """The quantized block l of an earlier run, as calibrate_block returned it."""
    from safetensors.torch import load_file
    t = load_file(str(out / "blocks" / f"block_{l:03d}.safetensors"), device=str(device))
    qb = copy.deepcopy(fp_block, memo={id(p): p for p in fp_block.parameters()})
    for name in LINEARS:
        lin = fp_block.get_submodule(name)
        m = QuantLinear.from_export(linear_part(t, name), cfg.bits, cfg.group_size, cfg.rank, cfg.lora_alpha,
                                    tuple(lin.weight.shape), weight=lin.weight, device=device)
        m.cache_qweight()
        parent, _, child = name.rpartition(".")
        setattr(qb.get_submodule(parent), child, m)
    return qb


def start_or_resume(out: Path, settings: dict) -> list:
    """The per-block logs of the finished blocks of an earlier run of the same settings in OUT."""
    if (out / "apiq.json").exists():
        raise ValueError(f"{out} already holds a finished model: choose another --out (nothing was overwritten)")
    progress = out / "progress.json"
    if not progress.exists():
        return []
    old = json.loads(progress.read_text())
    diff = [f"{k}: {old['settings'].get(k)!r} there, {v!r} now" for k, v in settings.items()
            if old["settings"].get(k) != v]
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}): use the same settings "
                         f"to continue it or another --out (nothing was overwritten)")
    print(f"resuming {out}: {len(old['blocks'])} block(s) already calibrated")
    return old["blocks"]


def to_host(qb, stored):
    """The calibrated block as kept until the final save: on the host, packed codes only (no
    fp W, no cached Q(W)), so the host never holds a second full copy of the model; its norms are
    the stored block's own (not the copies rounded to a bf16 --dtype)."""
    for _, m in quant_linears(qb):
        m.weight = None                          # dropped before the copy: nothing but codes crosses
        m.drop_cache()
        m.A.grad = m.B.grad = None
    qb = qb.cpu()
    for name in ("attention_norm", "ffn_norm"):
        getattr(qb, name).weight = getattr(stored, name).weight
    return qb


def block_log(l, qb, fp_block, Xq_next, Y, mse_before, retries, t0, device, linears, penalty):
    sq_err = sq_ref = 0.0
    for i in range(0, len(Y), PASS_BATCH):       # in chunks: no fp32 copy of all of (n, T, dim) on the device
        y = Y[i:i + PASS_BATCH].float()
        sq_err += (Xq_next[i:i + PASS_BATCH].float() - y).pow(2).sum().item()
        sq_ref += y.pow(2).sum().item()
    mse_after, target_ms = sq_err / Y.numel(), sq_ref / Y.numel()
    log = {"block": l, "mse_before": mse_before, "mse_after": mse_after, "target_ms": target_ms,
           "rel_before": mse_before / target_ms, "rel_after": mse_after / target_ms,
           "weight_error": math.sqrt(sum(r["error"] ** 2 for r in weight_errors(qb, fp_block))),
           "retries": retries, "seconds": round(time.time() - t0, 2), "peak_gib": round(peak_memory_gib(device), 3)}
    if penalty is not None:
        log.update(penalty.report(l, linears, mse_after))
    return log


def print_log(log, n_layers, prev_target_ms):
    line = (f"block {log['block']:2d}/{n_layers}: mse {log['mse_before']:.4g} -> {log['mse_after']:.4g} "
            f"(rel {log['rel_before']:.3%} -> {log['rel_after']:.3%}), {log['seconds']:.1f} s, "
            f"peak {log['peak_gib']:.2f} GiB")
    if log["retries"]:
        line += f", retried {log['retries']}x"
    if "penalty" in log:
        line += f", penalty {log['penalty']:.4g} ({log['penalty_over_mse']:.3g} x mse)"
    if prev_target_ms and log["target_ms"] > 10 * prev_target_ms:
        line += (f"\n  (the hidden states' mean square grew x{log['target_ms'] / prev_target_ms:.0f} here: a few "
                 f"huge channels appear, so the absolute mse jumps; the relative error compares blocks)")
    tqdm.write(line)


def calibrate_blocks(model, tokens, cfg, out, done, penalty):
    """The block loop (steps 1-4 of the paper's procedure). Returns the per-block logs, or None
    when --stop-after stopped it early."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    # activations live on the device when the copies alive at once (X, Xq, Y, Y2, Xq_next and
    # run_block's concatenation) fit in half its free memory, else on the host
    act_bytes = 6 * tokens.numel() * model.args.dim * dtype.itemsize
    cache = device if device.type == "cuda" and act_bytes < 0.5 * torch.cuda.mem_get_info(device.index)[0] else \
        torch.device("cpu")
    # bf16 / fp16: weights and cached activations in that dtype, matmuls under autocast (CUDA and CPU
    # alike); the clipping logits, A, B, the rounding offsets and AdamW's state stay fp32 (QuantLinear),
    # the RMSNorm statistic and the losses are taken in fp32
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    freqs = model.freqs_cis(cfg.seqlen, device)
    with torch.no_grad():
        X = model.tok_embeddings(tokens).to(device=cache, dtype=dtype)            # (n, T, dim)
    if cache.type == "cpu" and device.type == "cuda":
        X = X.pin_memory()
    Xq, logs, n_layers = X, list(done), model.args.n_layers                      # 1. X = X^q = embeddings
    for l in tqdm(range(n_layers), desc="blocks", unit="block"):
        t0 = time.time()
        reset_peak_memory(device)
        fp_block = copy.deepcopy(model.layers[l]).to(device=device, dtype=dtype)
        release_pages(model.layers[l])                    # copied: a mmap'd checkpoint's pages of it can go
        Y = run_block(fp_block, X, freqs, device, ctx, X.dtype)                   # 2. targets F(W, X)
        if not torch.isfinite(Y).all():
            raise FloatingPointError(f"block {l}: the full-precision block's outputs overflow --dtype {cfg.dtype} "
                                     f"(largest finite value {torch.finfo(dtype).max:.4g})" +
                                     (": use --dtype bf16" if dtype == torch.float16 else ""))
        Y2 = None
        if l < len(done):                                                         # finished earlier: replay
            qb = load_block(out, l, fp_block, cfg, device)
            Xq_next = run_block(qb, Xq, freqs, device, ctx, X.dtype)
        else:
            Y2 = (Y if Xq is X else run_block(fp_block, Xq, freqs, device, ctx, X.dtype)) if cfg.aug_loss else None
            start = quant_block(fp_block, cfg, cfg.seed + l).to(device)
            mse_before = block_mse(start, Xq, Y, freqs, device, ctx)
            if penalty is not None:
                penalty.normalise(l, dict(quant_linears(start)), mse_before)              # --sal-ratio only
            qb, retries = calibrate_block(l, fp_block, X, Xq, Y, Y2, freqs, cfg, device, ctx, penalty, start)  # 3. train
            Xq_next = run_block(qb, Xq, freqs, device, ctx, X.dtype)
            logs.append(block_log(l, qb, fp_block, Xq_next, Y, mse_before, retries, t0, device,
                                  dict(quant_linears(qb)), penalty))
            save_block(out, l, qb)
            write_json(out / "progress.json", {"settings": result_settings(cfg), "blocks": logs})
            print_log(logs[-1], n_layers, logs[-2]["target_ms"] if l > 0 else None)
        model.layers[l] = to_host(qb, model.layers[l])                            # 4. freeze, move on
        del fp_block, qb, Y2
        X, Xq = Y, Xq_next
        if cfg.stop_after and l + 1 - len(done) >= cfg.stop_after and l + 1 < n_layers:
            print(f"stopped after {cfg.stop_after} block(s) as asked; the same command continues from block {l + 1}")
            return None
    return logs


# ---- the script

def check_config(cfg):
    from quant import validate
    validate(cfg.bits, cfg.group_size, cfg.group_size)
    if min(cfg.nsamples, cfg.seqlen, cfg.epochs, cfg.batch_size, cfg.loftq_iters) <= 0 or cfg.rank < 0:
        raise ValueError("--nsamples, --seqlen, --epochs, --batch-size and --loftq-iters must be positive, --rank >= 0")
    if cfg.rank == 0 and cfg.method not in ("rtn",):
        raise ValueError(f"--method {cfg.method} needs a LoRA rank > 0")
    check_device(cfg.device, DTYPES[cfg.dtype] if cfg.method not in INITS else None)   # the inits compute in fp32


def method_name(cfg) -> str:
    """apiq-bw, apiq-lw, or the data-free init's name: what apiq.json and the default --out call it."""
    return f"apiq-{cfg.method}" if cfg.method in ("bw", "lw") else cfg.method


def output_dir(cfg) -> Path:
    name = Path(cfg.ckpt).name.removesuffix(".gguf") if Path(cfg.ckpt).exists() else cfg.ckpt
    tag = method_name(cfg)
    recipe = "-quick" if cfg.quick else "-long" if cfg.long else ""
    return Path(cfg.out or f"out/{name}-{tag}-w{cfg.bits}g{cfg.group_size}{recipe}")


def info(cfg, **extra) -> dict:
    """What apiq.json records of how the model was made: only the settings this method uses."""
    unused = {"rtn": ("rank", "lora_alpha", "loftq_iters"), "qlora": ("loftq_iters",), "loftq": ()}.get(
        cfg.method, ("loftq_iters",))
    data = ("nsamples", "seqlen", "epochs", "batch_size", "seed", "lr_clip", "lr_lora", "wd", "aug_loss", "dataset",
            "saliency", "sal_lambda", "sal_multiplier", "sal_variant", "weight_penalty", "sal_ratio", "lr_schedule",
            "learn_rounding", "lr_round", "lora_init", "stop_after", "data_dir")
    skip = set(unused) | (set(data) | {"quick", "long"} if cfg.method in INITS else set())
    made_by = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return {"method": method_name(cfg), "source": cfg.ckpt, "made_by": made_by, **extra}


def main(cfg: Config):
    from data import calib_windows
    from saliency import make_penalty

    check_config(cfg)
    out = output_dir(cfg)
    check_writable(out)
    done = start_or_resume(out, result_settings(cfg)) if cfg.method in ("bw", "lw") else []
    if cfg.method in INITS and (out / "apiq.json").exists():
        raise ValueError(f"{out} already holds a finished model: choose another --out (nothing was overwritten)")
    print("config:", json.dumps(asdict(cfg)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the checkpoint stays on the host in its own dtype (mmap'd where the format allows): only
    # the block being calibrated is copied, converted and moved to the device
    model, tok = load(cfg.ckpt, device="cpu", dtype=None)
    require_fp(model, cfg.ckpt)
    check_linears(model, cfg.group_size)
    if cfg.method not in INITS:
        check_seqlen(model.args, cfg.seqlen)
    round_kept_params(model)                 # embeddings/norms as they will be stored
    t0 = time.time()
    if cfg.method in INITS:
        from qmodel import quantize_model
        quantize_model(model, cfg.method, cfg.bits, cfg.group_size, cfg.rank, cfg.lora_alpha, cfg.loftq_iters,
                       device=cfg.device, cache=False)
    else:
        tokens = calib_windows(tok, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.dataset, cfg.data_dir)  # (n, T)
        penalty = make_penalty(model, cfg.saliency, cfg.sal_lambda, cfg.sal_multiplier, cfg.sal_variant,
                               cfg.weight_penalty, cfg.sal_ratio)
        logs = calibrate_blocks(model, tokens, cfg, out, done, penalty)
        if logs is None:
            return out
        write_json(out / "calib_log.json", {"config": asdict(cfg), "blocks": logs})
    seconds = time.time() - t0
    save_quantized(model, tok, out, info(cfg, calibration_seconds=round(seconds, 1)))
    (out / "progress.json").unlink(missing_ok=True)
    shutil.rmtree(out / "blocks", ignore_errors=True)   # all in model.safetensors now
    print(f"{cfg.method}: {model.args.n_layers} blocks in {seconds / 60:.1f} min; saved {out}")
    return out


if __name__ == "__main__":
    from cli import parse_config, run
    run(lambda: main(parse_config(Config, "Quantize a Llama checkpoint with ApiQ (block-wise, resumable) or one of "
                                  "the data-free inits it is compared with.", sys.argv[1:], make_config)))
