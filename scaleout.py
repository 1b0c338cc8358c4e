"""Scale-out: what lets the same code run a 7B-70B model on one GPU (docs/scaling.md): the
saliency pass with one block on the device at a time, torchrun process groups that split its
sequences, where calibration keeps its activations and finished blocks, and the pages of a
memory-mapped checkpoint given back once a block is copied.

    torchrun --standalone --nproc-per-node 2 saliency.py --stream --out out/saliency-smollm2
"""
import copy
import ctypes
import mmap
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama import LINEARS
from lora import quant_linears


# ---- a checkpoint memory-mapped from disk (calibrate.py, saliency.py --stream)

def release_pages(block):
    """Give back the resident pages of a block's seven linear weights where they are a checkpoint
    memory-mapped by checkpoints.load_pth and already copied (calibrate.py and saliency.py --stream
    copy one block at a time): madvise(MADV_DONTNEED) on the whole pages inside each weight, so a 7B
    run keeps ~one block of the file resident instead of all of it; a page touched again is read
    again from the file. Only file-backed mappings and only the linear weights, which nothing
    writes (norms may hold rounded copies). Linux; elsewhere nothing."""
    try:
        maps = [ln.split(maxsplit=5) for ln in Path("/proc/self/maps").read_text().splitlines()]
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return
    files = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if len(m) == 6 and m[5].startswith("/")]
    page = mmap.PAGESIZE
    for name in LINEARS:
        w = block.get_submodule(name).weight
        if w is None or w.device.type != "cpu":
            continue
        start, end = w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()
        if any(lo <= start and end <= hi for lo, hi in files):
            lo, hi = -(-start // page) * page, end // page * page          # whole pages inside the weight
            if hi > lo:
                libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)   # 4 = MADV_DONTNEED


# ---- calibrate.py: memory placement

def activation_home(device, n_tokens, dim, dtype) -> torch.device:
    """Where calibration keeps X, X^q, Y (and the aug-loss target): on the GPU when the copies
    alive at once (X, Xq, Y, Y_aug, Xq_next and run_block's concatenation) fit in half its free
    memory, else on the host."""
    act_bytes = 6 * n_tokens * dim * dtype.itemsize
    if device.type == "cuda" and act_bytes < 0.5 * torch.cuda.mem_get_info(device.index)[0]:
        return device
    return torch.device("cpu")


def to_host(qblock, stored):
    """The calibrated block as kept until the final save: on the host, packed codes only (no
    fp W, no cached Q(W)), so the host never holds a second full copy of the model; its norms are
    the stored block's own (not the copies rounded to a bf16 --dtype)."""
    for _, m in quant_linears(qblock):
        m.weight = None                          # dropped before the copy: nothing but codes crosses
        m.drop_cache()
        m.A.grad = m.B.grad = None
    qblock = qblock.cpu()
    for name in ("attention_norm", "ffn_norm"):
        getattr(qblock, name).weight = getattr(stored, name).weight
    return qblock


# ---- saliency.py --stream

def streamed_saliency(model, windows, device, dtype=None, alpha_dtype=torch.float32, on_block=None):
    """saliency.compute_saliency's alpha with one block on `device` at a time. The model stays on
    the host, untouched and in its storage dtype (a checkpoint memory-mapped from disk stays so);
    each block, and the head, is copied to the device in `dtype` (default: the model's) when needed:

        1. forward: X_0 = embeddings, X_{l+1} = F_l(X_l) for every sequence, each X_l kept on the host
        2. head: G[s] = dL_s / dX_L[s] through the final norm, the output layer and the cross-entropy
        3. l = L-1 .. 0: block l on the device; per sequence F_l(X_l[s]) again, with gradients, and its
           backward from G[s]: the weights' gradients are squared into alpha_l and G[s] becomes
           dL_s / dX_l[s]; then alpha_l is complete: on_block(l, alpha_l) (e.g. sum it over
           processes and write it) returns what to keep of it

    Device memory: one block, its accumulators, the head, one sequence's X_l[s], G[s] and the block's
    activations. Host memory: X_l of every block and sequence, (L + 1) x n x T x dim in `dtype`.
    Returns saliency.Saliency's fields: (alphas, losses)."""
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
        weights = {name: block.get_submodule(name).weight.requires_grad_(True) for name in LINEARS}
        for name, w in weights.items():
            alpha[name] = torch.zeros(w.shape, dtype=alpha_dtype, device=device)
        for s in range(n):
            x = X[l][s:s + 1].to(device).requires_grad_(True)                 # (1, T, dim)
            block(x, freqs).backward(G[s].to(device))
            for name, w in weights.items():                                    # alpha_i += (dL_s / dw_i)^2
                alpha[name] += w.grad.float().square()
                w.grad = None
            G[s] = x.grad.to(host)                                             # dL_s / dX_l
        del block
        X.pop()                                                                # X_l is not needed any more
        alphas[l] = alpha if on_block is None else on_block(l, alpha)
    return alphas, losses


# ---- torchrun

def process_group(device):
    """(rank, world size, this process's device) under torchrun (WORLD_SIZE > 1: the process
    group is started; on CUDA each process takes GPU LOCAL_RANK, nccl between GPUs and gloo for
    host tensors such as --alpha-device cpu; gloo on CPU), else (0, 1, device). Ranks split the
    sequences and sum their alphas."""
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


def check_ranks_agree(model, windows, device, shape: dict):
    """Every rank must hold the same model and the same windows, else their sums mean nothing."""
    import torch.distributed as dist
    w = model.layers[0].attention.wq.weight
    mine = torch.tensor([windows.double().sum().item(), *windows.shape, *shape.values(),
                         w.double().sum().item()], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for r, t in enumerate(every):
        if not torch.equal(t, every[0]):
            raise ValueError(f"torchrun ranks disagree on the model or the data (rank {r} differs from rank 0): give "
                             f"every rank the same --ckpt, --dataset, --nsamples, --seqlen and --seed")
