"""Saliency-aware weight preservation for ApiQ (Cao & Aref 2025, arXiv 2504.13932,
"saliency-aware partial retraining", section 3.2, eq. (2); docs/method.md §5): the saliency alpha of every weight
of the seven linears of every block, and the penalty that calibrate.py adds to ApiQ's loss.

    python saliency.py --ckpt smollm2-135m --out out/saliency-smollm2      # 100 x 512 WikiText-2, the paper
    python calibrate.py --quick --saliency out/saliency-smollm2 --sal-lambda 1

Saliency is SqueezeLLM's diagonal Fisher approximation (Kim et al. 2024, section 4.1), one gradient per sequence (batch 1):

    alpha_i = sum_s (dL_s / dw_i)^2      L_s: mean next-token cross-entropy of the
                                         full-precision model on calibration sequence s

and block l (0-based) of ApiQ-bw then minimises

    mse + lambda_l * sum_{7 linears} sum_i alpha_i (w_i - W_eff,i)^2                  eq. (2)
    lambda_l = lambda * multiplier^l
    W_eff = Q(W) + s B A   --sal-variant after (the paper's best): A, B feel the penalty too
    W_eff = Q(W)           --sal-variant before: only the clipping logits gamma, beta feel it

--weight-penalty X is the naive baseline of section 3.1: alpha_i = 1, lambda = X. alpha is not
normalised (as in the public code) and tiny, so lambda needs a scale: calibrate.py logs the
penalty and penalty / mse per block.

Output: OUT/block_NNN.safetensors (keys attention.wq ... feed_forward.w2, alpha in the weight's
shape) and OUT/saliency.json (model shape, data, time, memory, per-block stats). Every file is
written atomically and saliency.json last: a directory without it is unfinished.

Speed on a CPU. Where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16), --dtype bf16 is
faster than the CPU's fp32 default and gives the same alpha (SmolLM2, 16 x 256 WikiText-2 tokens,
1 thread: 1.7 against 10.2 s a sequence beside two other jobs on one machine, ~6x; 1.6 against 3.2
alone on an AMD EPYC with AVX512-BF16, 2.0x, bench/bench_penalty.py --pass; cosine >= 0.997 per
linear between the two alphas, while 16 x 256 and the paper's 100 x 512 tokens agree to
0.77-0.99). On other CPUs it is untested here: time a few sequences before choosing.

Memory. A hook squares each weight's gradient into its accumulator the moment autograd has it
and drops it, so no full set of gradients ever exists. Peak = the weights + the accumulators,
4 bytes per linear weight (--alpha-dtype bf16: 2; bf16 rounds every partial sum, ~1% error, 3%
at the 99th percentile, after 100 sequences) + one sequence's activations kept for backward
(linear in seqlen; includes the fp32 logits, T x vocab x 4 bytes, a few times over).
Measured, SmolLM2-135M, fp32, CPU, 512 tokens: 0.50 GiB of weights + 0.40 GiB of accumulators
+ ~1.2 GiB of activations = peak RSS 2.44 GiB, 4.9x the fp32 model (0.86 GiB after loading).
Llama-2-7B, bf16, GPU: 12.6 GiB of weights + 24.1 GiB of fp32 accumulators (6.5e9 linear
weights) + ~3 GiB at 512 tokens, ~40 GiB: an 80 GB GPU, not a 24-40 GB one. --alpha-device cpu
keeps the accumulators in host memory instead (each squared gradient crosses PCIe, 26 GB a
sequence) and leaves the GPU the weights and one sequence, ~16 GiB.

--stream (streamed_saliency) gives the same alpha with one block on the device at a time: the
model stays on the host, every block's input is kept there for every sequence, and the backward
pass goes block by block from the head, recomputing each block's forward; each block's alpha is
finished, summed over processes and written before the next. Device memory: one block + its
accumulators + one sequence's activations + the head. Under torchrun (WORLD_SIZE > 1; gloo on
CPU, nccl on CUDA) the sequences are split over the processes and the per-block sums combined;
ranks that load a different model or data stop with one line.

    torchrun --standalone --nproc-per-node 2 saliency.py --stream --out out/saliency-smollm2
"""
import copy
import json
import resource
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama import LINEARS, release_pages

FORMAT = "apiq-saliency-v1"
SHAPE_KEYS = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")


class Saliency(NamedTuple):
    alphas: list   # per block {linear name: alpha (out, in)}
    losses: list   # L_s of every sequence


def _accumulate(acc, p):
    g = p.grad.float()                     # a new tensor unless the grad is fp32 already: free to square in place
    acc.add_(g.square_().to(acc.device))   # alpha_i += (dL_s / dw_i)^2
    p.grad = None                          # so the next sequence starts from nothing, and memory is freed now


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
                w.requires_grad_(True)
                hooks.append(w.register_post_accumulate_grad_hook(partial(_accumulate, block[name])))
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


def streamed_saliency(model, windows, device, dtype=None, alpha_dtype=torch.float32, on_block=None) -> Saliency:
    """compute_saliency's alpha with one block on `device` at a time. The model stays on the host,
    untouched and in its storage dtype (a checkpoint memory-mapped from disk stays so); each block,
    and the head, is copied to the device in `dtype` (default: the model's) when it is needed:

        1. forward: X_0 = embeddings, X_{l+1} = F_l(X_l) for every sequence, each X_l kept on the host
        2. head: G[s] = dL_s / dX_L[s] through the final norm, the output layer and the cross-entropy
        3. l = L-1 .. 0: block l on the device; per sequence F_l(X_l[s]) again, with gradients, and its
           backward from G[s]: the weights' gradients are squared into alpha_l (the same hooks as
           compute_saliency) and G[s] becomes dL_s / dX_l[s]; then alpha_l is complete: on_block(l,
           alpha_l) (e.g. sum it over processes and write it) returns what to keep of it

    Device memory: one block, its accumulators, the head, one sequence's X_l[s], G[s] and the block's
    activations. Host memory: X_l of every block and sequence, (L + 1) x n x T x dim in `dtype`."""
    host = next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype

    def on_device(module):                       # a frozen copy on the device; the model is not changed
        copied = copy.deepcopy(module).to(device=device, dtype=dtype).requires_grad_(False)
        if hasattr(module, "attention"):
            release_pages(module)                # a block of a mmap'd checkpoint: its pages can go
        return copied

    n, T = windows.shape
    freqs = model.freqs_cis(T, device)
    with torch.no_grad():                                                      # 1. boundary activations
        X = [model.tok_embeddings(windows.to(host)).to(dtype)]                # [(n, T, dim)]
        for layer in tqdm(model.layers, desc="saliency forward", unit="block", leave=False):
            block = on_device(layer)
            X.append(torch.cat([block(X[-1][s:s + 1].to(device), freqs).to(host) for s in range(n)]))
            del block
    norm, output = on_device(model.norm), on_device(model.output)
    G, losses = [], []
    for s in range(n):                                                         # 2. dL_s / dX_L
        x = X[-1][s:s + 1].to(device).requires_grad_(True)                     # (1, T, dim)
        loss = F.cross_entropy(output(norm(x)).float()[0, :-1], windows[s, 1:].to(device))
        loss.backward()
        G.append(x.grad.to(host))
        losses.append(loss.item())
    del norm, output
    X.pop()
    alphas = [None] * len(model.layers)
    for l in tqdm(reversed(range(len(model.layers))), total=len(model.layers), desc="saliency backward", unit="block"):
        block, alpha = on_device(model.layers[l]), {}                          # 3. block by block, from the top
        for name in LINEARS:
            w = block.get_submodule(name).weight
            alpha[name] = torch.zeros(w.shape, dtype=alpha_dtype, device=device)
            w.requires_grad_(True)
            w.register_post_accumulate_grad_hook(partial(_accumulate, alpha[name]))
        for s in range(n):
            x = X[l][s:s + 1].to(device).requires_grad_(True)                 # (1, T, dim)
            block(x, freqs).backward(G[s].to(device))                          # the hooks fill alpha_l
            G[s] = x.grad.to(host)                                             # dL_s / dX_l
        del block
        X.pop()                                                                # X_l is not needed any more
        alphas[l] = alpha if on_block is None else on_block(l, alpha)
    return Saliency(alphas, losses)


def rss_gib(peak=False) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30


def model_shape(args) -> dict:
    return {k: getattr(args, k) for k in SHAPE_KEYS}


def save_block(out, l, block) -> dict:
    """Write block l's alphas ({linear name: alpha}) atomically; returns its stats for saliency.json."""
    from safetensors.torch import save

    from cli import atomic_write
    data = save({n: a.detach().cpu().contiguous() for n, a in block.items()})  # one block's bytes
    atomic_write(Path(out) / f"block_{l:03d}.safetensors", data)
    total = sum(a.double().sum().item() for a in block.values())
    count = sum(a.numel() for a in block.values())
    return {"block": l, "mean": total / count, "max": max(a.max().item() for a in block.values()),
            "zero_fraction": sum((a == 0).sum().item() for a in block.values()) / count,
            "linear_mean": {n: a.double().mean().item() for n, a in block.items()}}


def save_saliency(out, alphas, meta):
    """Write the block files, then saliency.json with `meta` and per-block stats (atomically)."""
    from cli import write_json
    stats = [save_block(out, l, block) for l, block in enumerate(alphas)]
    write_json(Path(out) / "saliency.json", {"format": FORMAT, **meta, "blocks": stats})


def load_block_saliency(path, l) -> dict:
    """{linear name: alpha (out, in) fp32} of block l."""
    from safetensors.torch import load_file
    f = Path(path) / f"block_{l:03d}.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f} does not exist: an unfinished or foreign saliency directory")
    return {n: a.float() for n, a in load_file(str(f)).items()}


def check_saliency(path, model) -> dict:
    """The saliency.json of `path`, after checking that it was computed for this model's shape."""
    from safetensors import safe_open
    path = Path(path)
    if not (path / "saliency.json").exists():
        raise FileNotFoundError(f"--saliency {path}: no saliency.json there (not a saliency directory, or "
                                f"saliency.py did not finish)")
    meta = json.loads((path / "saliency.json").read_text())
    have, want = meta.get("model", {}), model_shape(model.args)
    diff = [f"{k} {have.get(k)} there, {v} here" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise ValueError(f"--saliency {path} was computed for another model ({meta.get('ckpt')}: "
                         f"{', '.join(diff)}): run saliency.py on this checkpoint")
    for l, layer in enumerate(model.layers):   # headers only: cheap
        f = path / f"block_{l:03d}.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"--saliency {path}: {f.name} is missing")
        with safe_open(str(f), framework="pt") as st:
            for name in LINEARS:
                shape = tuple(layer.get_submodule(name).weight.shape)
                got = tuple(st.get_slice(name).get_shape()) if name in st.keys() else None
                if got != shape:
                    raise ValueError(f"--saliency {path}: {f.name} {name} has shape {got}, the model's "
                                     f"layers.{l}.{name} has {shape}")
    return meta


class WeightedDistance(torch.autograd.Function):
    """sum_i alpha_i (w_i - W_eff,i)^2 with W_eff = q + s B A (B, A given: AfterLoRA) or q
    (BeforeLoRA), alpha None: alpha_i = 1. Its gradients are written out, the same as autograd's
    (tests/test_saliency.py), in half the passes over the block's weights: with r = w - W_eff,

        d/dq = -2 alpha r,   d/dB = s (d/dq) A^T,   d/dA = s B^T (d/dq)."""

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)                                    # fp32 whatever the caller's context
    def forward(ctx, w, q, alpha, B, A, s):
        r = w.float() - q.float()                                            # (out, in)
        if B is not None:
            r = torch.addmm(r, B, A, alpha=-s)                               # w - q - s B A
        ar = r if alpha is None else alpha * r
        ctx.save_for_backward(ar, B, A)
        ctx.s, ctx.q_dtype = s, q.dtype
        return torch.dot(ar.flatten(), r.flatten())

    @staticmethod
    def backward(ctx, g):
        ar, B, A = ctx.saved_tensors
        gq = ar * (-2 * g)                                                   # (out, in)
        gB = gA = None
        if B is not None:
            gB, gA = (gq @ A.T) * ctx.s, (B.T @ gq) * ctx.s                  # (out, r), (r, in)
        return None, gq.to(ctx.q_dtype), None, gB, gA, None


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
            dist = self.distance(l, linears, [m.qweight() for m in linears.values()]).item()
            self._scale[l] = self.ratio * self.multiplier ** l * mse / dist if dist > 0 else 0.0

    def alphas(self, l, device):
        if self.path is None:
            return None
        if self._key != (l, device):           # calibrate.py goes block by block: load each once
            self._alphas = None                # free the last block before loading the next
            self._alphas = {n: a.to(device) for n, a in load_block_saliency(self.path, l).items()}
            self._key = (l, device)
        return self._alphas

    def distance(self, l, linears, qs, merged=False):
        """sum over `linears` ({name in the block: QuantLinear}) of sum_i alpha_i (w_i - W_eff,i)^2,
        an fp32 scalar tensor; qs: their Q(W), as the step's forward applied them, or (merged,
        AfterLoRA) their W_eff = Q(W) + s B A already (calibrate.effective)."""
        total, after = 0.0, self.variant == "after" and not merged
        for (name, m), q in zip(linears.items(), qs):
            alphas = self.alphas(l, m.weight.device)
            lora = (m.B, m.A, m.scaling) if after else (None, None, 0.0)   # W_eff = q + s B A, or q (is W_eff)
            total = total + WeightedDistance.apply(m.weight, q, None if alphas is None else alphas[name], *lora)
        return total

    def __call__(self, l, linears, qs, merged=False):
        return self.lambda_l(l) * self.distance(l, linears, qs, merged)                # eq. (2)

    @torch.no_grad()
    def report(self, l, linears, mse=None) -> dict:
        """For the per-block log, after calibration; `mse` is the block's output MSE, so
        penalty_over_mse shows the balance of the two terms of eq. (2)."""
        dist = self.distance(l, linears, [m.qweight() for m in linears.values()]).item()
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


def process_group(device):
    """(rank, world size, this process's device) under torchrun (WORLD_SIZE > 1: the process
    group is started; on CUDA each process takes GPU LOCAL_RANK, nccl between GPUs and gloo for
    host tensors such as --alpha-device cpu; gloo on CPU), else (0, 1, device). Ranks split the
    sequences and sum their alphas."""
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun process {local} has no GPU of its own ({torch.cuda.device_count()} here): "
                             f"--nproc-per-node must be at most the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)                 # before the group: collectives use this GPU
    if not dist.is_initialized():
        if device.type == "cuda":
            import inspect
            bind = {"device_id": device} if "device_id" in inspect.signature(dist.init_process_group).parameters else {}
            dist.init_process_group("cpu:gloo,cuda:nccl", **bind)
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), world, device


def sum_over_ranks(block: dict, world: int) -> dict:
    """Under torchrun, every rank's alpha of one block summed in place (each rank took its own
    sequences, so the sums make the alpha of all of them)."""
    if world > 1:
        import torch.distributed as dist
        for t in block.values():
            dist.all_reduce(t)
    return block


def gather_losses(losses: list, world: int) -> list:
    """Every rank's per-sequence losses, rank by rank (one rank: its own)."""
    if world == 1:
        return losses
    import torch.distributed as dist
    every = [None] * world
    dist.all_gather_object(every, losses)
    return [x for part in every for x in part]


def leave_group(world: int):
    """End the process group; the barrier first, so no rank tears its connections down while
    another still reads."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def check_ranks_agree(model, windows, device):
    """Every rank must hold the same model and the same windows, else their sums mean nothing."""
    import torch.distributed as dist
    w = model.layers[0].attention.wq.weight
    mine = torch.tensor([windows.double().sum().item(), *windows.shape, *model_shape(model.args).values(),
                         w.double().sum().item()], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for r, t in enumerate(every):
        if not torch.equal(t, every[0]):
            raise ValueError(f"torchrun ranks disagree on the model or the data (rank {r} differs from rank 0): give "
                             f"every rank the same --ckpt, --dataset, --nsamples, --seqlen and --seed")


def run_meta(a, model, losses, seconds, world, rss_loaded, device) -> dict:
    """What saliency.json records besides the per-block stats: model, data, time, memory."""
    from cli import DTYPES
    params = {id(p): p for p in model.parameters()}.values()                  # tied embeddings once
    n_alpha = sum(m.weight.numel() for layer in model.layers for m in (layer.get_submodule(n) for n in LINEARS))
    meta = {"ckpt": a.ckpt, "model": model_shape(model.args), "dataset": a.dataset, "nsamples": a.nsamples,
            "seqlen": a.seqlen, "seed": a.seed, "dtype": a.dtype, "alpha_dtype": a.alpha_dtype,
            "streamed": a.stream, "processes": world,
            "seconds": round(seconds, 1), "seconds_per_sequence": round(seconds * world / a.nsamples, 2),
            "mean_loss": sum(losses) / len(losses),
            "model_gib": sum(p.numel() * p.element_size() for p in params) / 2**30,
            "alpha_gib": n_alpha * DTYPES[a.alpha_dtype].itemsize / 2**30,
            "rss_after_load_gib": round(rss_loaded, 3), "peak_rss_gib": round(rss_gib(peak=True), 3)}
    if device.type == "cuda":
        meta["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return meta


def main(a):
    from cli import DTYPES, check_device, check_writable, with_default_dtype, write_json
    from data import calib_windows
    from llama import check_seqlen
    from qmodel import load, require_fp

    if a.nsamples < 1 or a.seqlen < 2:
        raise ValueError("--nsamples must be positive and --seqlen at least 2 (a next token to predict)")
    name = Path(a.ckpt).name.removesuffix(".gguf") if Path(a.ckpt).exists() else a.ckpt
    out = Path(a.out or f"out/saliency-{name}")
    if (out / "saliency.json").exists():
        raise ValueError(f"{out} already holds a finished saliency: choose another --out (nothing was overwritten)")
    check_writable(out)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.dtype = with_default_dtype(vars(a))["dtype"]                           # bf16 on a GPU, fp32 on the CPU
    check_device(a.device, DTYPES[a.dtype])
    rank, world, device = process_group(torch.device(a.device))
    dtype = DTYPES[a.dtype]
    if rank == 0:
        print("config:", json.dumps(vars(a)))
    # --stream keeps the model on the host in its storage dtype and copies one block at a time to the device
    model, tok = load(a.ckpt, device="cpu" if a.stream else device, dtype=None if a.stream else dtype)
    require_fp(model, a.ckpt)
    check_seqlen(model.args, a.seqlen)
    windows = calib_windows(tok, a.nsamples, a.seqlen, a.seed, a.dataset, a.data_dir)  # (n, T)
    if world > 1:
        check_ranks_agree(model, windows, device)
        if a.nsamples < world:
            raise ValueError(f"--nsamples {a.nsamples} is fewer than the {world} torchrun processes")
    mine = windows[rank::world]                                                 # this rank's sequences
    rss_loaded = rss_gib()
    t0 = time.time()
    stats = []

    def finish_block(l, block):
        """Sum block l's alpha over the processes; rank 0 writes it (streamed: as soon as it is done)."""
        sum_over_ranks(block, world)
        if rank == 0:
            stats.append(save_block(out, l, block))
        return None if a.stream else block

    if a.stream:
        sal = streamed_saliency(model, mine, device, dtype, DTYPES[a.alpha_dtype], on_block=finish_block)
    else:
        sal = compute_saliency(model, mine, device, DTYPES[a.alpha_dtype], a.alpha_device)
        for l, block in enumerate(sal.alphas):
            finish_block(l, block)
    losses = gather_losses(sal.losses, world)
    seconds = time.time() - t0
    meta = run_meta(a, model, losses, seconds, world, rss_loaded, device)
    if rank == 0:
        write_json(out / "saliency.json", {"format": FORMAT, **meta, "blocks": sorted(stats, key=lambda b: b["block"])})
        print(f"saliency of {model.args.n_layers} blocks from {a.nsamples} x {a.seqlen} tokens in {seconds:.0f} s "
              f"({meta['seconds_per_sequence']} s a sequence per process, mean loss {meta['mean_loss']:.3f}); peak RSS "
              f"{meta['peak_rss_gib']:.2f} GiB (model {meta['model_gib']:.2f}, alpha {meta['alpha_gib']:.2f})" +
              (f", peak GPU memory {meta['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in meta else "") + f"; saved {out}")
    leave_group(world)
    return out


if __name__ == "__main__":
    import argparse

    from cli import run

    p = argparse.ArgumentParser(description="Saliency (summed squared gradients) of every linear weight, for calibrate.py --saliency.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m", help="full-precision checkpoint: a path or a name (README, Checkpoints)")
    p.add_argument("--out", default=None, help="output directory (default out/saliency-<ckpt>)")
    p.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "c4"], help="calibration text (paper: either)")
    p.add_argument("--nsamples", type=int, default=100, help="sequences, one gradient each (paper: 100)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (paper: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sampler")
    p.add_argument("--data-dir", default=None, help="local data directory (default $APIQ_DATA_DIR or ../shared/data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="model weights and activations (default: bf16 on a GPU, fp32 on the CPU; no fp16: its squared "
                        "gradients underflow)")
    p.add_argument("--alpha-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="accumulators and saved alpha (bf16 halves their memory, a few %% rounding error)")
    p.add_argument("--alpha-device", default=None, help="where the accumulators live (default --device; cpu frees GPU memory)")
    p.add_argument("--stream", action="store_true",
                   help="one block on the device at a time (streamed_saliency): the same alpha, for models whose "
                        "weights, activations and accumulators do not fit the device together")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (on a busy shared CPU, 1 can be far faster)")
    run(main, p.parse_args())
