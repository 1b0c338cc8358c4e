"""Saliency-aware weight preservation for ApiQ (Cao & Aref 2025, arXiv 2504.13932, "saliency-aware
partial retraining", section 3.2, eq. (2)): the saliency alpha of every weight of the seven
linears of every block, and the penalty that calibrate.py adds to ApiQ's loss.

    python saliency.py --ckpt smollm2-135m --out out/saliency-smollm2      # 100 x 512 WikiText-2, the paper
    python calibrate.py --quick --saliency out/saliency-smollm2 --sal-lambda 1

Saliency is SqueezeLLM's diagonal Fisher approximation (Kim et al. 2024, section 4.1), one
gradient per sequence (batch 1):

    alpha_i = sum_s (dL_s / dw_i)^2      L_s: mean next-token cross-entropy of the
                                         full-precision model on calibration sequence s

and block l (0-based) of ApiQ-bw then minimises

    mse + lambda_l * sum_{7 linears} sum_i alpha_i (w_i - W_eff,i)^2                  eq. (2)
    lambda_l = lambda * multiplier^l
    W_eff = Q(W) + s B A   --sal-variant after (the paper's best): A, B feel the penalty too
    W_eff = Q(W)           --sal-variant before: only the clipping logits gamma, beta (and the
                           rounding offsets V of --learn-rounding) feel it

--weight-penalty X is the naive baseline of section 3.1: alpha_i = 1, lambda = X. alpha is not
normalised (as in the public code) and tiny, so lambda needs a scale: calibrate.py logs the
penalty and penalty / mse per block; --sal-ratio R (beyond the paper) sets lambda_l so that the
penalty starts at R times the block's output MSE.

Output: OUT/block_NNN.safetensors (alpha of each linear, in the weight's shape) and
OUT/saliency.json, written last (runs.py). Memory, bf16 and --stream (one block on the device at
a time), torchrun: docs/scaling.md and scaleout.py.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import (DEFAULT_DEVICE, DTYPES, arg, check_device, check_writable, default_dtype, parse_config, rss_gib,
                 run, write_json)
from data import calib_windows
from llama import LINEARS, check_seqlen
from qmodel import load, require_fp
from runs import (SALIENCY_FORMAT, check_saliency, load_block_saliency, model_shape, output_dir, refuse_finished,
                  save_saliency_block)
from scaleout import check_ranks_agree, gather_losses, leave_group, process_group, streamed_saliency, sum_over_ranks


def square_grads_into(w, acc):
    """From now on each backward adds (dL/dw)^2 to `acc` (w's shape), the moment autograd has the
    gradient, and frees w.grad: alpha accumulates without a full set of gradients ever existing.
    Returns the hook's handle (.remove() it when done)."""
    def square_into(w):
        acc.add_(w.grad.float().square_().to(acc.device))      # alpha_i += (dL_s / dw_i)^2
        w.grad = None                                          # the next sequence starts from nothing
    w.requires_grad_(True)
    return w.register_post_accumulate_grad_hook(square_into)


class Saliency(NamedTuple):
    alphas: list   # per block {linear name: alpha (out, in)}
    losses: list   # L_s of every sequence


def compute_saliency(model, windows, device, alpha_dtype=torch.float32, alpha_device=None) -> Saliency:
    """alpha for the seven linears of every block of `model` (already on `device`) over the
    calibration windows (n, T), one forward and backward per window. The model's requires_grad
    flags are restored afterwards."""
    alpha_device = torch.device(alpha_device or device)
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)            # embeddings, norms, head: no gradient needed
    alphas, hooks = [], []
    try:
        for layer in model.layers:
            block = {}
            for name in LINEARS:
                w = layer.get_submodule(name).weight
                block[name] = torch.zeros(w.shape, dtype=alpha_dtype, device=alpha_device)
                hooks.append(square_grads_into(w, block[name]))               # alpha_i += (dL_s / dw_i)^2
            alphas.append(block)
        losses = []
        bar = tqdm(range(len(windows)), desc="saliency", unit="seq", mininterval=1.0)
        for seq in bar:
            tokens = windows[seq:seq + 1].to(device)                              # (1, T)
            logits = model(tokens)                                             # (1, T, vocab) fp32
            loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:])             # L_s: predict token t+1 from <= t
            del logits
            loss.backward()                                                    # the hooks fill alphas
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return Saliency(alphas, losses)


def weighted_distance(w, w_eff, alpha=None):
    """sum_i alpha_i (w_i - W_eff,i)^2 over a weight (out, in), an fp32 scalar; alpha None:
    alpha_i = 1 (the naive penalty of section 3.1)."""
    d = (w.float() - w_eff.float()).square()                                  # (out, in)
    return (d if alpha is None else alpha * d).sum()


class SaliencyPenalty:
    """The second term of eq. (2) for block l:

        lambda_l * sum over the block's linears of sum_i alpha_i (w_i - W_eff,i)^2

    W_eff = Q(W) + s B A (variant "after") or Q(W) ("before"); path None: alpha_i = 1 (the
    naive weight penalty of section 3.1). One block's alphas are in memory at a time."""

    def __init__(self, path, lam, multiplier=1.0, variant="after", ratio=None):
        self.path, self.lam, self.multiplier, self.variant, self.ratio = path, lam, multiplier, variant, ratio
        self._key, self._alphas, self._scale = None, None, {}

    def lambda_l(self, l):
        """lambda * multiplier^l (the paper); with `ratio`, the scale-free strength set by normalise()."""
        if self.ratio is None:
            return self.lam * self.multiplier ** l
        if l not in self._scale:
            raise RuntimeError(f"block {l}: normalise() must set the penalty's scale before the block trains")
        return self._scale[l]

    @torch.no_grad()
    def normalise(self, l, linears, mse):
        """Beyond the paper, scale-free (--sal-ratio): lambda_l = ratio * multiplier^l * mse / distance
        at the block's start, so that the penalty starts at `ratio` times the block's output MSE
        whatever the scale of alpha, of the block's activations or of the model."""
        if self.ratio is not None:
            dist = self.distance(l, linears).item()
            self._scale[l] = self.ratio * self.multiplier ** l * mse / dist if dist > 0 else 0.0

    def alphas(self, l, device):
        if self.path is None:
            return None
        if self._key != (l, device):           # calibrate.py goes block by block: load each once
            self._alphas = None                # free the last block before loading the next
            self._alphas = {n: a.to(device) for n, a in load_block_saliency(self.path, l).items()}
            self._key = (l, device)
        return self._alphas

    def linear_distance(self, m, alpha):
        """sum_i alpha_i (w_i - W_eff,i)^2 of QuantLinear m."""
        w_eff = m.effective_weight() if self.variant == "after" else m.qweight()
        return weighted_distance(m.weight, w_eff, alpha)

    def distance(self, l, linears):
        """The sum over `linears` ({name in the block: QuantLinear}) of their distances, fp32."""
        total = 0.0
        for name, m in linears.items():
            alphas = self.alphas(l, m.weight.device)
            total = total + self.linear_distance(m, None if alphas is None else alphas[name])
        return total

    def __call__(self, l, linears):
        return self.lambda_l(l) * self.distance(l, linears)                            # eq. (2)

    @torch.no_grad()
    def report(self, l, linears, mse=None) -> dict:
        """For the per-block log, after calibration; `mse` is the block's output MSE, so
        penalty_over_mse shows the balance of the two terms of eq. (2)."""
        dist = self.distance(l, linears).item()
        out = {"penalty": self.lambda_l(l) * dist, "lambda_l": self.lambda_l(l), "penalty_distance": dist}
        if mse is not None:
            out["penalty_over_mse"] = out["penalty"] / mse if mse > 0 else float("inf")
        return out


def make_penalty(model, saliency=None, sal_lambda=1.0, sal_multiplier=1.0, sal_variant="after",
                 weight_penalty=0.0, sal_ratio=None):
    """The penalty that these settings ask for (saliency: a directory from this script), or None
    where it would be zero, so that lambda = 0 runs plain ApiQ bit for bit. sal_ratio: the
    scale-free strength (SaliencyPenalty.normalise) instead of sal_lambda / weight_penalty."""
    if saliency and weight_penalty:
        raise ValueError("--saliency and --weight-penalty are two different penalties: give only one")
    if min(sal_lambda, weight_penalty, sal_multiplier) < 0 or (sal_ratio is not None and sal_ratio < 0):
        raise ValueError("--sal-lambda, --sal-multiplier, --sal-ratio and --weight-penalty must not be negative")
    if sal_ratio is not None and not saliency and not weight_penalty:
        raise ValueError("--sal-ratio scales a penalty: give --saliency DIR (or --weight-penalty 1 for alpha_i = 1)")
    if sal_variant not in ("after", "before"):
        raise ValueError(f"--sal-variant must be 'after' or 'before', got {sal_variant!r}")
    if saliency:
        check_saliency(saliency, model)      # a wrong directory is an error even where lambda is 0
        path, lam = saliency, sal_lambda
    else:
        path, lam = None, weight_penalty
    if sal_ratio is not None:
        return SaliencyPenalty(path, 1.0, sal_multiplier, sal_variant, ratio=sal_ratio) if sal_ratio > 0 else None
    return SaliencyPenalty(path, lam, sal_multiplier, sal_variant) if lam > 0 else None


@dataclass
class Config:
    """One run of saliency.py. The defaults are the paper's: 100 sequences of 512 tokens."""
    ckpt: str = arg("smollm2-135m", "full-precision checkpoint: a path or a name (docs/usage.md, Checkpoints)")
    out: Optional[str] = arg(None, "output directory (default out/saliency-<ckpt>)", type=str)
    dataset: str = arg("wikitext2", "calibration text (paper: either)", choices=("wikitext2", "c4"))
    nsamples: int = arg(100, "sequences, one gradient each")
    seqlen: int = arg(512, "tokens per sequence")
    seed: int = arg(0, "seed of the window sampler")
    data_dir: Optional[str] = arg(None, "local data directory (default $APIQ_DATA_DIR or ../shared/data)", type=str)
    device: str = arg(DEFAULT_DEVICE, "cpu or cuda")
    dtype: Optional[str] = arg(None, "model weights and activations (default bf16 on a GPU, fp32 on the CPU; no "
                               "fp16: its squared gradients underflow)", choices=("fp32", "bf16"), type=str)
    alpha_dtype: str = arg("fp32", "accumulators and saved alpha (bf16 halves their memory, a few %% rounding error)",
                           choices=("fp32", "bf16"))
    alpha_device: Optional[str] = arg(None, "where the accumulators live (default --device; cpu frees GPU memory)",
                                      type=str)
    stream: bool = arg(False, "one block on the device at a time (scaleout.streamed_saliency): the same alpha, for "
                       "models whose weights, activations and accumulators do not fit the device together")
    threads: Optional[int] = arg(None, "torch CPU threads (on a busy shared CPU, 1 can be far faster)", type=int)

    def __post_init__(self):
        self.dtype = self.dtype or default_dtype(self.device)


def saliency_meta(cfg, model, losses, seconds, world, rss_loaded, device) -> dict:
    """What saliency.json records besides the per-block stats: model, data, time, memory."""
    params = {id(p): p for p in model.parameters()}.values()                  # tied embeddings once
    n_alpha = sum(m.weight.numel() for layer in model.layers for m in (layer.get_submodule(n) for n in LINEARS))
    meta = {"ckpt": cfg.ckpt, "model": model_shape(model.args), "dataset": cfg.dataset, "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen, "seed": cfg.seed, "dtype": cfg.dtype, "alpha_dtype": cfg.alpha_dtype,
            "streamed": cfg.stream, "processes": world,
            "seconds": round(seconds, 1), "seconds_per_sequence": round(seconds * world / cfg.nsamples, 2),
            "mean_loss": sum(losses) / len(losses),
            "model_gib": sum(p.numel() * p.element_size() for p in params) / 2**30,
            "alpha_gib": n_alpha * DTYPES[cfg.alpha_dtype].itemsize / 2**30,
            "rss_after_load_gib": round(rss_loaded, 3), "peak_rss_gib": round(rss_gib(peak=True), 3)}
    if device.type == "cuda":
        meta["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return meta


def main(cfg: Config):
    if cfg.nsamples < 1 or cfg.seqlen < 2:
        raise ValueError("--nsamples must be positive and --seqlen at least 2 (a next token to predict)")
    out = output_dir(cfg.out, cfg.ckpt, "out/saliency-{name}")
    refuse_finished(out, "saliency.json", "saliency")
    check_writable(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_device(cfg.device, DTYPES[cfg.dtype])
    if cfg.nsamples < int(os.environ.get("WORLD_SIZE", "1")):          # before any rank waits for another
        raise ValueError(f"--nsamples {cfg.nsamples} is fewer than the {os.environ['WORLD_SIZE']} torchrun processes")
    rank, world, device = process_group(torch.device(cfg.device))
    dtype = DTYPES[cfg.dtype]
    if rank == 0:
        print("config:", json.dumps(asdict(cfg)))
    # --stream keeps the model on the host in its storage dtype and copies one block at a time to the device
    model, tok = load(cfg.ckpt, device="cpu" if cfg.stream else device, dtype=None if cfg.stream else dtype)
    require_fp(model, cfg.ckpt)
    check_seqlen(model.args, cfg.seqlen)
    windows = calib_windows(tok, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.dataset, cfg.data_dir)  # (n, T)
    if world > 1:
        check_ranks_agree(model, windows, device, model_shape(model.args))
    mine = windows[rank::world]                                                 # this rank's sequences
    rss_loaded = rss_gib()
    t0 = time.time()
    stats = []

    def finish_block(l, block):
        """Sum block l's alpha over the processes; rank 0 writes it (streamed: as soon as it is done)."""
        sum_over_ranks(block, world)
        if rank == 0:
            stats.append(save_saliency_block(out, l, block))
        return None if cfg.stream else block

    if cfg.stream:
        _, losses = streamed_saliency(model, mine, device, dtype, DTYPES[cfg.alpha_dtype], on_block=finish_block)
    else:
        alphas, losses = compute_saliency(model, mine, device, DTYPES[cfg.alpha_dtype], cfg.alpha_device)
        for l, block in enumerate(alphas):
            finish_block(l, block)
    losses = gather_losses(losses, world)
    seconds = time.time() - t0
    meta = saliency_meta(cfg, model, losses, seconds, world, rss_loaded, device)
    if rank == 0:
        write_json(out / "saliency.json", {"format": SALIENCY_FORMAT, **meta,
                                           "blocks": sorted(stats, key=lambda b: b["block"])})
        print(f"saliency of {model.args.n_layers} blocks from {cfg.nsamples} x {cfg.seqlen} tokens in {seconds:.0f} s "
              f"({meta['seconds_per_sequence']} s a sequence per process, mean loss {meta['mean_loss']:.3f}); peak RSS "
              f"{meta['peak_rss_gib']:.2f} GiB (model {meta['model_gib']:.2f}, alpha {meta['alpha_gib']:.2f})" +
              (f", peak GPU memory {meta['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in meta else "") + f"; saved {out}")
    leave_group(world)
    return out


if __name__ == "__main__":
    run(lambda: main(parse_config(Config, "Saliency (summed squared gradients) of every linear weight, for "
                                  "calibrate.py --saliency.", sys.argv[1:])))
