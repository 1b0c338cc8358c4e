"""ApiQ calibration (Liao et al., EMNLP 2024, arXiv 2402.05147, section 3): initialise the quantized
weights Q (learnable clipping gamma, beta) and the LoRA factors A, B so that the quantized model's
activations match the full-precision model's, one transformer block at a time (ApiQ-bw).

    python calibrate.py --bits 2 --ckpt llama2-7b           # the paper's setting, one GPU
    python calibrate.py --bits 2 --quick                    # SmolLM2-135M on a laptop CPU (recipes.py)
    python calibrate.py --bits 2 --method loftq             # a baseline init of section 3

F is one block, F_q the same block with every linear y = x Q(W)^T + s (x A^T) B^T (lora.py),
X its input in the full-precision model, X^q its input in the model quantized so far:

    1. X = X^q = the embeddings of the calibration windows
    2. for block l: targets Y = F(W, X)
    3.   train gamma, beta, A, B of its seven linears (AdamW) on
            ||Y - F_q(X^q)||^2                                                        eq. (1)
          + ||F(W, X^q) - F_q(X^q)||^2        --aug-loss, as the official scripts
          + lambda_l sum_i alpha_i (w_i - W_eff,i)^2   --saliency: Cao & Aref (arXiv 2504.13932) eq. (2)
    4.   freeze; X <- Y, X^q <- F_q(X^q); next block
    5.   --e2e-epochs, beyond the paper: the step sizes (and A, B) of the whole model trained end
         to end on the windows' next-token cross-entropy (e2e.py; EfficientQAT's E2E-QP), or
         with --e2e-loss kd on the KL to the full-precision model's next-token distribution

||.||^2 is the mean square over the output's elements. ApiQ-lw trains one linear at a time on
||X W^T - X^q (Q + s B A)^T||^2. The data-free inits (rtn, qlora, loftq) are lora.py's.
"""
import copy
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fastpath
from cli import (DEFAULT_DEVICE, DTYPES, arg, as_flags, check_device, check_writable, compute_in, default_dtype,
                 parse_config, peak_memory_gib, reset_peak_memory, result_settings, run, write_json)
from data import CALIBRATION_SETS, c4_windows, calib_windows
from e2e import end_to_end
from llama import LINEARS, check_seqlen
from lora import QuantLinear, quant_linears, swap_linears
from qmodel import INITS, METHODS, check_linears, load, quantize_model, require_fp, round_kept_params, save_quantized
from quant import validate
from recipes import (CALIBRATE_PRESETS, LONG, LONG_E2E, QUICK, QUICK_E2E, SCHEDULES, BestStep, SignSGD, clamp_offsets, lr_factor, preset, rounding_group,
                     svd_start)
from runs import (block_errors, load_block, made_by, output_dir, print_log, refuse_finished, resume_blocks,
                  save_block, save_progress)
from saliency import make_penalty
from scaleout import activation_home, release_pages, to_host


def autocast_like(x):
    """The matmuls at x's dtype: weights and cached activations are stored in it (cli.compute_in)."""
    return compute_in(x.device, x.dtype)


def bw_objective(qblock, xq, y, freqs, y_aug=None, penalty=None, l=0):
    """ApiQ-bw, eq. (1), on windows X^q (B, T, dim) of block l with targets Y = F(W, X):

        loss = ||Y - F_q(X^q)||^2 [+ ||F(W, X^q) - F_q(X^q)||^2] [+ lambda_l sum_i alpha_i (w_i - W_eff,i)^2]

    qblock: the block with QuantLinear linears. Returns (loss, its parts for the progress bar)."""
    with autocast_like(xq):
        out = qblock(xq, freqs).float()                     # F_q(X^q), (B, T, dim)
    mse = F.mse_loss(out, y.float())                        # eq. (1)
    if y_aug is not None:
        mse = mse + F.mse_loss(out, y_aug.float())          # --aug-loss
    if penalty is None:
        return mse, {"mse": mse.item()}
    pen = penalty(l, dict(quant_linears(qblock)))           # Cao & Aref eq. (2)
    return mse + pen, {"mse": mse.item(), "pen": pen.item()}


def lw_objective(name, lin, x, xq, w, penalty=None, l=0):
    """ApiQ-lw for linear `name` of block l on its inputs X (B, T, in) in the fp block and X^q in
    the quantized one:

        loss = ||X W^T - X^q (Q(W) + s B A)^T||^2 [+ lambda_l sum_i alpha_i (w_i - W_eff,i)^2]"""
    with autocast_like(xq):
        out = lin(xq).float()                               # X^q (Q + s B A)^T, (B, T, out)
    mse = F.mse_loss(out, F.linear(x, w).float())           # against X W^T
    if penalty is None:
        return mse, {"mse": mse.item()}
    pen = penalty(l, {name: lin})
    return mse + pen, {"mse": mse.item(), "pen": pen.item()}


def train(linears, objective, n, cfg, desc, lr_scale=1.0, optimizer=torch.optim.AdamW):
    """AdamW with the paper's two parameter groups, clipping logits and LoRA factors (and the
    rounding offsets of --learn-rounding), cfg.epochs passes over the n windows in fixed order,
    cfg.batch_size windows a step. --sign-steps: the clipping logits and offsets take signed steps
    instead (recipes.SignSGD); --best-step: the parameters of the lowest-loss step are kept
    (recipes.BestStep). objective(slice) -> (loss, parts). Returns False if a loss went non-finite
    (the caller retries with lower learning rates)."""
    linears = list(linears)
    clip = [p for m in linears for p in m.clip_parameters()]
    lora = [p for m in linears for p in m.lora_parameters()]
    groups = [{"params": clip, "lr": cfg.lr_clip * lr_scale}, {"params": lora, "lr": cfg.lr_lora * lr_scale}]
    groups += rounding_group(linears, cfg.lr_round * lr_scale)
    params = [p for g in groups for p in g["params"]]
    if cfg.sign_steps:                      # A, B keep AdamW; the quantizer's parameters step by their sign
        opts = [optimizer([groups[1]], weight_decay=cfg.wd), SignSGD([groups[0], *groups[2:]])]
    else:
        opts = [optimizer(groups, weight_decay=cfg.wd)]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    starts = range(0, n, cfg.batch_size)
    total = cfg.epochs * len(starts)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: lr_factor(cfg.lr_schedule, k, total))  # paper: constant
              for o in opts]
    best = BestStep(params) if cfg.best_step else None
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=1.0)
    for _ in range(cfg.epochs):
        for i in starts:
            loss, parts = objective(slice(i, i + cfg.batch_size))
            if not torch.isfinite(loss):
                bar.close()
                return False
            if best:
                best.see(loss.item())       # the parameters that gave this loss, before the update
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sched in zip(opts, scheds):
                o.step()
                sched.step()
            clamp_offsets(linears)
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()}, refresh=False)
            bar.update()
    bar.close()
    if best:
        best.restore()
    return True


def quant_block(fp_block, cfg, seed):
    """A copy of the block with its seven linears as QuantLinear: clipping logits 4.0, A the
    standard LoRA init (seeded per block, so a resumed run draws the same A), B = 0; --lora-init
    svd starts A, B from the SVD of W - Q(W) instead (recipes.py). Shares the fp weights."""
    qblock = copy.deepcopy(fp_block, memo={id(p): p for p in fp_block.parameters()})
    torch.manual_seed(seed)
    swap_linears(qblock, lambda lin: QuantLinear.from_linear(lin, cfg.bits, cfg.group_size, cfg.rank,
                                                             cfg.lora_alpha, cfg.learn_rounding))
    if cfg.lora_init == "svd":
        for _, m in quant_linears(qblock):
            svd_start(m)
    return qblock


class Start(NamedTuple):
    """What a block's calibration starts from."""
    block: torch.nn.Module       # quant_block on the device
    penalty: object              # the run's penalty (or None)
    optimizer: type              # torch.optim.AdamW


def start_block(fp_block, l, cfg, penalty=None) -> Start:
    """quant_block for block l on cfg.device; with --fast (or --compile) the speed devices of
    fastpath.accelerate installed in it, its penalty and its optimizer (the same math)."""
    qblock = quant_block(fp_block, cfg, cfg.seed + l).to(cfg.device)
    if cfg.fast or cfg.compile:
        return Start(*fastpath.accelerate(qblock, penalty, compile=cfg.compile))
    return Start(qblock, penalty, torch.optim.AdamW)


class Acts(NamedTuple):
    """One block's activations, (n, T, dim) each."""
    X: torch.Tensor                  # its input in the full-precision model
    Xq: torch.Tensor                 # its input in the model quantized so far, X^q
    Y: torch.Tensor                  # its full-precision output F(W, X): the target
    Y_aug: Optional[torch.Tensor]    # F(W, X^q), the --aug-loss target, or None


def calibrate_block(l, fp_block, acts, freqs, cfg, start=None):
    """Step 3 for block l: returns (the quantized block, frozen, on the device; retries needed).
    start: start_block(fp_block, l, cfg, penalty), if the caller already made it (else no penalty)."""
    def dev(t, idx):
        return None if t is None else t[idx].to(cfg.device)

    X, Xq, Y, Y_aug = acts
    start = start or start_block(fp_block, l, cfg)
    for attempt, lr_scale in enumerate((1.0, 0.5)):
        qblock, penalty, optimizer = start if attempt == 0 else start_block(fp_block, l, cfg, start.penalty)
        linears = dict(quant_linears(qblock))
        desc = f"block {l} {cfg.method}"
        if cfg.method == "bw":
            ok = train(linears.values(), lambda i: bw_objective(qblock, dev(Xq, i), dev(Y, i), freqs, dev(Y_aug, i),
                                                                penalty, l), len(Xq), cfg, desc, lr_scale, optimizer)
            if ok:
                for m in linears.values():
                    m.freeze()
        else:
            for name in LINEARS:             # in the order of use: each sees its frozen predecessors
                lin, w = linears[name], fp_block.get_submodule(name).weight
                x, xq = capture_inputs(fp_block, qblock, name, X, Xq, freqs, cfg.device)
                ok = train([lin], lambda i: lw_objective(name, lin, dev(x, i), dev(xq, i), w, penalty, l),
                           len(Xq), cfg, f"{desc} {name}", lr_scale, optimizer)
                if not ok:
                    break
                lin.freeze()
        if ok:
            return qblock, attempt
        if attempt == 0:
            tqdm.write(f"block {l}: non-finite loss, retrying with learning rates x{lr_scale / 2}")
    raise FloatingPointError(f"block {l}: the loss became NaN/inf twice (also with halved learning rates); "
                             f"try --dtype fp32 or lower --lr-clip / --lr-lora")


PASS_BATCH = 4  # windows per forward in the passes without gradients


@torch.no_grad()
def run_block(block, X, freqs, device):
    """block(X) over all windows X (n, T, dim), PASS_BATCH at a time, kept where X is, in its dtype."""
    outs = []
    for i in range(0, len(X), PASS_BATCH):
        x = X[i:i + PASS_BATCH].to(device)                                       # (b, T, dim)
        with autocast_like(x):
            outs.append(block(x, freqs).to(device=X.device, dtype=X.dtype))
    return torch.cat(outs)                                                       # (n, T, dim)


@torch.no_grad()
def block_mse(block, Xq, Y, freqs, device):
    """mse(Y, F_q(X^q)) over all windows: the block's activation error."""
    total = 0.0
    for i in range(0, len(Xq), PASS_BATCH):
        xq = Xq[i:i + PASS_BATCH].to(device)                                     # (b, T, dim)
        with autocast_like(xq):
            out = block(xq, freqs)
        total += F.mse_loss(out.float(), Y[i:i + PASS_BATCH].to(device).float(), reduction="sum").item()
    return total / Y.numel()


@torch.no_grad()
def capture_inputs(fp_block, qblock, name, X, Xq, freqs, device):
    """Inputs of linear `name` in the fp block (on X) and in the quantized block (on X^q)."""
    def grab(block, inputs):
        got = []
        h = block.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(i[0].to(inputs.device)))
        try:
            run_block(block, inputs, freqs, device)
        finally:
            h.remove()
        return torch.cat(got)                                                 # (n, T, in)
    return grab(fp_block, X), grab(qblock, Xq)


def calibrate_blocks(model, tokens, cfg, out, done, penalty):
    """Steps 1-4 over every block, one block on the device at a time; after every block its
    quantized tensors go to OUT/blocks/ (runs.py), so a killed run continues (same command) from the
    last finished block, bit-identical on CPU. Returns the per-block logs, or None when
    --stop-after stopped it early."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    home = activation_home(device, tokens.numel(), model.args.dim, dtype)        # of X, X^q, Y
    freqs = model.freqs_cis(cfg.seqlen, device)
    with torch.no_grad():
        X = model.tok_embeddings(tokens).to(device=home, dtype=dtype)             # (n, T, dim)
    if home.type == "cpu" and device.type == "cuda":
        X = X.pin_memory()
    Xq, logs, n_layers = X, list(done), model.args.n_layers                      # 1. X = X^q = embeddings
    for l in tqdm(range(n_layers), desc="blocks", unit="block"):
        t0 = time.time()
        reset_peak_memory(device)
        fp_block = copy.deepcopy(model.layers[l]).to(device=device, dtype=dtype)
        release_pages(model.layers[l])                    # copied: a mmap'd checkpoint's pages of it can go
        Y = run_block(fp_block, X, freqs, device)                                 # 2. targets F(W, X)
        if not torch.isfinite(Y).all():
            raise FloatingPointError(f"block {l}: the full-precision block's outputs overflow --dtype {cfg.dtype} "
                                     f"(largest finite value {torch.finfo(dtype).max:.4g})" +
                                     (": use --dtype bf16" if dtype == torch.float16 else ""))
        Y_aug = start = None
        if l < len(done):                                                         # finished earlier: replay
            qblock = load_block(out, l, fp_block, cfg.bits, cfg.group_size, cfg.lora_alpha, device)
            Xq_next = run_block(qblock, Xq, freqs, device)
        else:
            if cfg.aug_loss:                                                      # F(W, X^q)
                Y_aug = Y if Xq is X else run_block(fp_block, Xq, freqs, device)
            start = start_block(fp_block, l, cfg, penalty)
            mse_before = block_mse(start.block, Xq, Y, freqs, device)
            if start.penalty is not None:
                start.penalty.normalise(l, dict(quant_linears(start.block)), mse_before)   # --sal-ratio only
            qblock, retries = calibrate_block(l, fp_block, Acts(X, Xq, Y, Y_aug), freqs, cfg, start)  # 3.
            Xq_next = run_block(qblock, Xq, freqs, device)
            log = {"block": l, **block_errors(qblock, fp_block, Y, Xq_next, mse_before), "retries": retries,
                   "seconds": round(time.time() - t0, 2), "peak_gib": round(peak_memory_gib(device), 3)}
            if start.penalty is not None:
                log.update(start.penalty.report(l, dict(quant_linears(qblock)), log["mse_after"]))
            logs.append(log)
            save_block(out, l, qblock)
            save_progress(out, result_settings(cfg), logs)
            print_log(logs[-1], n_layers, logs[-2]["target_ms"] if l > 0 else None)
        model.layers[l] = to_host(qblock, model.layers[l])                        # 4. freeze, move on
        del fp_block, qblock, Y_aug, start
        X, Xq = Y, Xq_next
        if cfg.stop_after and l + 1 - len(done) >= cfg.stop_after and l + 1 < n_layers:
            print(f"stopped after {cfg.stop_after} block(s) as asked; the same command continues from block {l + 1}")
            return None
    return logs


# ---- the script

@dataclass
class Config:
    """One run of calibrate.py. The defaults are the ApiQ paper's main setting (section 4)."""
    ckpt: str = arg("smollm2-135m", "checkpoint to quantize: a path or a name (docs/usage.md, Checkpoints)")
    method: str = arg("bw", "bw = ApiQ-bw, lw = ApiQ-lw; rtn, qlora, loftq = the data-free inits", choices=tuple(METHODS))
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
                           "linearly or along a cosine", choices=SCHEDULES)
    learn_rounding: bool = arg(False, "beyond the paper: also learn a rounding offset per weight in [-0.5, 0.5] "
                               "(AutoRound); the codes stay N-bit")
    lr_round: float = arg(5e-3, "AdamW learning rate of the rounding offsets (--learn-rounding)")
    sign_steps: bool = arg(False, "beyond the paper: the clipping logits and rounding offsets step by "
                           "-lr sign(grad) (AutoRound's optimiser) at --lr-clip / --lr-round; A, B keep AdamW")
    best_step: bool = arg(False, "beyond the paper: each block ends at its lowest-loss step's parameters "
                          "(AutoRound's best iteration), not its last")
    e2e_epochs: int = arg(0, "beyond the paper: passes over the calibration windows of an end-to-end stage after "
                          "the blocks (e2e.py, EfficientQAT's E2E-QP): the step sizes and A, B on next-token "
                          "cross-entropy; 0: none (paper)")
    e2e_lr_scale: float = arg(2e-5, "--e2e-epochs: AdamW learning rate of the step sizes (EfficientQAT's at 2 bits)")
    e2e_lr_lora: float = arg(5e-4, "--e2e-epochs: AdamW learning rate of A and B (0: they stay as calibrated)")
    e2e_loss: str = arg("ce", "--e2e-epochs: ce, next-token cross-entropy (EfficientQAT); kd, KL to the full-precision "
                        "model's next-token distribution (beyond it: keeps the model's function, not the text's)",
                        choices=("ce", "kd"))
    lora_init: str = arg("standard", "A, B at the start of a block: standard (A random, B = 0; paper) or svd "
                         "(rank-r SVD of W - Q(W), one LoftQ step)", choices=("standard", "svd"))
    dataset: str = arg("wikitext2", "calibration text: WikiText-2 train (paper), C4, or a mix (--c4-share; the C4 "
                       "part from documents no test window and no tuning window touches)", choices=CALIBRATION_SETS)
    c4_share: Optional[float] = arg(None, "--dataset wikitext2+c4: the share of the windows drawn from C4, the rest "
                                    "WikiText-2 train's (default: half)", type=float)
    saliency: Optional[str] = arg(None, "saliency directory from saliency.py: adds the penalty of Cao & Aref eq. (2)")
    sal_lambda: float = arg(1.0, "penalty strength lambda")
    sal_multiplier: float = arg(1.0, "lambda_l = lambda * multiplier^l")
    sal_variant: str = arg("after", "penalise Q(W) + sBA (after, AfterLoRA) or Q(W) (before)", choices=("after", "before"))
    weight_penalty: float = arg(0.0, "strength of the naive unweighted penalty (alpha_i = 1)")
    sal_ratio: Optional[float] = arg(None, "beyond the paper, scale-free: lambda_l set so that the penalty is this "
                                     "times the block's output MSE at its start (replaces --sal-lambda)", type=float)
    dtype: Optional[str] = arg(None, "weights and cached activations (default bf16 on a GPU, fp32 on the CPU); "
                               "bf16/fp16 also on the CPU, the GPU's code path (bf16: ~1.5x faster than fp32 where the "
                               "CPU has bf16 instructions, slower where not; RESULTS.md)",
                               choices=tuple(DTYPES), type=str)
    quick: bool = arg(False, f"the CPU recipe (SmolLM2: < 10 min on one core): {as_flags(QUICK)}", result=False)
    long: bool = arg(False, f"the long CPU recipe (SmolLM2: ~1 h on one core): {as_flags(LONG)}", result=False)
    quick_e2e: bool = arg(False, "--quick at rank 8 with signed steps and the end-to-end stage, half the text C4, "
                          f"chosen against AutoRound (SmolLM2: ~16 min on one core): {as_flags(QUICK_E2E)}",
                          result=False)
    long_e2e: bool = arg(False, "the same on 64 windows, the stage on the KL to full precision (SmolLM2: ~36 min "
                         f"on one core): {as_flags(LONG_E2E)}",
                         result=False)
    out: Optional[str] = arg(None, "output directory (default out/<ckpt>-<method>-w<bits>g<group>)", result=False)
    data_dir: Optional[str] = arg(None, "local data directory (default $APIQ_DATA_DIR or ../shared/data)", result=False)
    stop_after: Optional[int] = arg(None, "calibrate this many blocks, then stop (the same command continues)",
                                    result=False, type=int)
    device: str = arg(DEFAULT_DEVICE, "cpu or cuda", result=False)
    threads: Optional[int] = arg(None, "torch CPU threads (pass 1 beside another job)", result=False, type=int)
    fast: bool = arg(False, "speed only: fastpath.accelerate's devices (fused quantizer, merged W_eff, the penalty's "
                     "written-out gradients, fused AdamW): the formulas' numbers to fp32 rounding", result=False)
    compile: bool = arg(False, "speed only: --fast with the quantizer's two elementwise passes fused by torch.compile "
                               "(~5 s per weight shape once)", result=False)

    def __post_init__(self):
        self.dtype = self.dtype or default_dtype(self.device)


def make_config(**given) -> Config:
    """Config from the given settings, the preset named (--quick, --long, --quick-e2e, --long-e2e)
    filling what was not given."""
    return Config(**preset(given, **CALIBRATE_PRESETS))


def check_config(cfg):
    validate(cfg.bits, cfg.group_size, cfg.group_size)
    if min(cfg.nsamples, cfg.seqlen, cfg.epochs, cfg.batch_size, cfg.loftq_iters) <= 0 or cfg.rank < 0:
        raise ValueError("--nsamples, --seqlen, --epochs, --batch-size and --loftq-iters must be positive, --rank >= 0")
    if cfg.e2e_epochs < 0 or cfg.e2e_lr_scale < 0 or cfg.e2e_lr_lora < 0:
        raise ValueError("--e2e-epochs, --e2e-lr-scale and --e2e-lr-lora must be >= 0")
    if cfg.c4_share is not None and cfg.dataset != "wikitext2+c4":
        raise ValueError(f"--c4-share mixes the two texts of --dataset wikitext2+c4, not --dataset {cfg.dataset}")
    if cfg.dataset == "wikitext2+c4":
        c4_windows(cfg.nsamples, cfg.c4_share)                  # a share that leaves a text no window: said now
    if cfg.e2e_epochs and cfg.e2e_lr_scale == 0 and cfg.e2e_lr_lora == 0:   # said before the block-wise pass
        raise ValueError("--e2e-epochs with --e2e-lr-scale 0 and --e2e-lr-lora 0 trains nothing: give one a rate")
    if cfg.e2e_epochs and cfg.method in INITS:
        raise ValueError(f"--e2e-epochs trains on the calibration windows: --method bw or lw, not {cfg.method}")
    if cfg.rank == 0 and cfg.method not in ("rtn",):
        raise ValueError(f"--method {cfg.method} needs a LoRA rank > 0")
    check_device(cfg.device, DTYPES[cfg.dtype] if cfg.method not in INITS else None)   # the inits compute in fp32


def main(cfg: Config):
    check_config(cfg)
    recipe = next((f"-{n.replace('_', '-')}" for n in CALIBRATE_PRESETS if getattr(cfg, n)), "")
    out = output_dir(cfg.out, cfg.ckpt, f"out/{{name}}-{METHODS[cfg.method].name}-w{cfg.bits}g{cfg.group_size}{recipe}")
    check_writable(out)
    if cfg.method in INITS:
        refuse_finished(out, "apiq.json", "model")
    done = [] if cfg.method in INITS else resume_blocks(out, result_settings(cfg))
    print("config:", json.dumps(asdict(cfg)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the checkpoint stays on the host in its own dtype (mmap'd where the format allows): only
    # the block being calibrated is copied, converted and moved to the device
    t_load = time.time()
    model, tok = load(cfg.ckpt, device="cpu", dtype=None)
    load_seconds = time.time() - t_load                 # bench/bench_peers.py: minutes = load + calibration
    require_fp(model, cfg.ckpt)
    check_linears(model, cfg.group_size, 0 if cfg.method == "rtn" else cfg.rank)
    if cfg.method not in INITS:
        check_seqlen(model.args, cfg.seqlen)
    round_kept_params(model)                 # embeddings/norms as they will be stored
    t0 = time.time()
    if cfg.method in INITS:
        quantize_model(model, cfg.method, cfg.bits, cfg.group_size, cfg.rank, cfg.lora_alpha, cfg.loftq_iters,
                       device=cfg.device, cache=False)
    else:
        tokens = calib_windows(tok, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.dataset, cfg.data_dir,
                               cfg.c4_share)                                                        # (n, T)
        penalty = make_penalty(model, cfg.saliency, cfg.sal_lambda, cfg.sal_multiplier, cfg.sal_variant,
                               cfg.weight_penalty, cfg.sal_ratio)
        logs = calibrate_blocks(model, tokens, cfg, out, done, penalty)
        if logs is None:
            return out
        e2e = None
        if cfg.e2e_epochs:                                                                      # 5.
            teacher = None                     # --e2e-loss kd: the full-precision model, loaded again
            if cfg.e2e_loss == "kd":
                teacher = load(cfg.ckpt, device=cfg.device, dtype=DTYPES[cfg.dtype])[0].eval().requires_grad_(False)
            e2e = end_to_end(model, tokens, cfg.e2e_epochs, cfg.e2e_lr_scale, cfg.e2e_lr_lora, cfg.device, teacher,
                             DTYPES[cfg.dtype])
            del teacher
            print(f"end to end: {len(e2e)} steps, loss {e2e[0]['loss']:.4f} -> {e2e[-1]['loss']:.4f}")
        write_json(out / "calib_log.json", {"config": asdict(cfg), "blocks": logs, "end_to_end": e2e})
    seconds = time.time() - t0
    save_quantized(model, tok, out, made_by(asdict(cfg), calibration_seconds=round(seconds, 1),
                                            load_seconds=round(load_seconds, 1)))
    (out / "progress.json").unlink(missing_ok=True)
    shutil.rmtree(out / "blocks", ignore_errors=True)   # all in model.safetensors now
    print(f"{cfg.method}: {model.args.n_layers} blocks in {seconds / 60:.1f} min; saved {out}")
    return out


if __name__ == "__main__":
    run(lambda: main(parse_config(Config, "Quantize a Llama checkpoint with ApiQ (block-wise, resumable) or one of "
                                  "the data-free inits it is compared with.", sys.argv[1:], make_config)),
        resume="the same command continues from the last finished block")
