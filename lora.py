"""LoRA on a quantized weight: the calibration module QuantLinear and the baseline inits.

ApiQ (Liao et al., EMNLP 2024, arXiv 2402.05147), section 3; docs/METHOD.md sections 2-3.
Every linear of a transformer block becomes

    y = x Q(W)^T + (alpha / r) * (x A^T) B^T        A: r x in,  B: out x r          (LoRA)

with Q the quantizer of quant.py (learnable clipping gamma, beta) and the usual LoRA init
A ~ kaiming_uniform(a=sqrt(5)), B = 0. The seed text writes the update as A B^T, i.e. with
transposed naming; here, as in the LoRA/peft code, A (r x in) is the input-side factor with
random init, B (out x r) the output-side factor that starts at zero, and the update is B @ A.

Contents: lora_init; QuantLinear (the one module that holds frozen W, clipping logits and
A, B; quant.py holds only pure tensor functions); the baselines of section 3, qlora_init and
loftq_init (LoftQ, Li et al. 2023, Algorithm 1); swap_linears / quant_linears to put
QuantLinear into the seven linears of a Llama block.

Example:
    python -c "import torch, lora; print(lora.loftq_init(torch.randn(64, 128), 2, 64, 16, 16).errors)"
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import fake_quant, pack, quantize, rtn, validate


def lora_init(out_features, in_features, rank, device=None):
    """Standard LoRA init: A (rank x in) ~ U(-1/sqrt(in), 1/sqrt(in)), B (out x rank) = 0."""
    A = torch.empty(rank, in_features, device=device)
    if rank > 0:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # same bound as nn.Linear: 1/sqrt(in)
    return A, torch.zeros(out_features, rank, device=device)


class QuantLinear(nn.Module):
    """y = x Q(W)^T + (alpha / r) (x A^T) B^T, with learnable clipping inside Q.

    weight: frozen buffer, the tensor that gets quantized (W itself for ApiQ and QLoRA; the
        residual W - s B_prev A_prev for LoftQ, see loftq_linear); shares storage with the
        tensor given.
    gamma, beta: clipping logits (out, in // group_size), init 4.0 (sigmoid = 0.982);
        absent when clip=False, which makes Q plain RTN.
    A (rank x in), B (out x rank): LoRA factors, fp32. rank=0 gives no adapter.
    """

    def __init__(self, weight, bias=None, bits=2, group_size=64, rank=64, alpha=16.0,
                 clip=True, A=None, B=None):
        super().__init__()
        out_features, in_features = weight.shape
        validate(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rank, self.alpha = bits, group_size, rank, alpha
        self.scaling = alpha / rank if rank > 0 else 0.0
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        n_groups = in_features // group_size
        for name in ("gamma", "beta"):
            logits = torch.full((out_features, n_groups), 4.0, device=weight.device)
            self.register_parameter(name, nn.Parameter(logits) if clip else None)
        if A is None:
            A, B = lora_init(out_features, in_features, rank, device=weight.device)
        # row-major copies: an SVD factor is often a strided view, and a strided weight takes a
        # different GEMM path whose rounding differs from the reloaded (contiguous) model's
        self.A = nn.Parameter(A.detach().float().clone(memory_format=torch.contiguous_format))
        self.B = nn.Parameter(B.detach().float().clone(memory_format=torch.contiguous_format))
        self.register_buffer("w_hat", None, persistent=False)  # Q(W) cached by freeze()
        self.last_qweight = None  # Q(W) of the last training forward, still in the autograd graph
        self._stamp = None

    @classmethod
    def from_linear(cls, linear, bits=2, group_size=64, rank=64, alpha=16.0, clip=True):
        return cls(linear.weight, linear.bias, bits, group_size, rank, alpha, clip)

    def qweight(self):
        """Q(W), fake-quantized, differentiable in gamma and beta."""
        return fake_quant(self.weight, self.bits, self.group_size, self.gamma, self.beta)

    def lora_weight(self):
        return self.scaling * self.B @ self.A  # (out, in)

    def merged_weight(self):
        """Q(W) + (alpha / r) B A: the weight the layer applies (the saliency 'AfterLoRA' W_eff).
        Once frozen, Q(W) is the cached (or stored) one that forward uses."""
        frozen = self.w_hat is not None and self._versions() == self._stamp
        return (self.w_hat if frozen else self.qweight()).float() + self.lora_weight()

    def clip_parameters(self):
        return [p for p in (self.gamma, self.beta) if p is not None]

    def lora_parameters(self):
        return [self.A, self.B]

    def _versions(self):
        # in-place updates (optimizer steps, load_state_dict) bump a tensor's version counter
        return tuple(t._version for t in (self.weight, self.gamma, self.beta) if t is not None)

    def freeze(self):
        """Calibration done: stop training the clipping and quantize W once for all forwards.

        A and B keep requires_grad (they are what gets finetuned afterwards).
        """
        for p in self.clip_parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            self.w_hat = self.qweight()
        self._stamp = self._versions()
        self.last_qweight = None

    def unfreeze(self):
        for p in self.clip_parameters():
            p.requires_grad_(True)
        self.w_hat, self._stamp = None, None

    def forward(self, x):
        if self.w_hat is None:
            w = self.qweight()
            if torch.is_grad_enabled():  # a training step: saliency's penalty reuses this Q(W)
                self.last_qweight = w
        else:
            if self._versions() != self._stamp:  # W, gamma or beta changed since freeze()
                self.freeze()
            w = self.w_hat
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, w.to(x.dtype), bias)  # x Q(W)^T
        lora = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))  # (x A^T) B^T
        return y + self.scaling * lora  # (LoRA)

    def export(self):
        """Tensors to save: packed codes (ceil(out*in*bits/8) bytes), scale and zero
        (out, in // group_size), A, B (and bias). Back to Q(W) with
        dequantize(unpack(qweight, bits, (out, in)), scale, zero, group_size)."""
        codes, scale, zero = quantize(self.weight, self.bits, self.group_size,
                                      self.gamma, self.beta)
        out = {"qweight": pack(codes, self.bits), "scale": scale, "zero": zero,
               "A": self.A.detach().clone(), "B": self.B.detach().clone()}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, alpha={self.alpha}, "
                f"clip={self.gamma is not None}, frozen={self.w_hat is not None}")


# ---- the initialisations compared in the paper (METHOD.md section 3) ----

class LoraInit(NamedTuple):
    q: torch.Tensor       # Q(base), the quantized weight (out, in)
    A: torch.Tensor       # (rank, in)
    B: torch.Tensor       # (out, rank)
    base: torch.Tensor    # the tensor whose RTN is q: QuantLinear(base, clip=False) reproduces q
    errors: list          # ||W - (Q + s B A)||_F after each iteration (one entry for QLoRA)


def weight_error(w, q, A, B, scaling):
    return torch.linalg.matrix_norm(w.float() - (q.float() + scaling * B @ A)).item()


@torch.no_grad()
def weight_errors(model, ref) -> list[dict]:
    """ApiQ paper fig. 3: ||W - (Q + s B A)||_F of every QuantLinear in `model` against the
    full-precision W of the same name in `ref` (and relative to ||W||_F), Q the Q(W) the layer
    applies. `model` and `ref` may be whole models or one block each."""
    rows = []
    for name, m in quant_linears(model):
        w = ref.get_submodule(name).weight.float().to(m.A.device)
        err = torch.linalg.matrix_norm(w - m.merged_weight().float()).item()
        rows.append({"layer": name, "error": err, "rel": err / torch.linalg.matrix_norm(w).item()})
    return rows


@torch.no_grad()
def qlora_init(w, bits, group_size, rank):
    """QLoRA: Q = RTN(W), standard A, B = 0, so the start W' = Q differs from W."""
    q = rtn(w, bits, group_size)
    A, B = lora_init(*w.shape, rank, device=w.device)
    return LoraInit(q, A, B, w, [weight_error(w, q, A, B, 0.0)])


def _svd(r, rank, lowrank):
    if lowrank:  # randomized: much faster on big matrices, close to the exact top-rank part
        u, s, v = torch.svd_lowrank(r, q=min(rank + 10, *r.shape), niter=4)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


@torch.no_grad()
def loftq_init(w, bits, group_size, rank, alpha, iters=5, lowrank=False):
    """LoftQ (Li et al. 2023, Algorithm 1): alternate T = iters times

        Q   = RTN(W - s B A)
        B A = rank-r SVD of (W - Q),  B = U sqrt(S) / sqrt(s),  A = sqrt(S) V^T / sqrt(s)

    with s = alpha / rank. Dividing by sqrt(s) makes s B A equal the SVD term; without it the
    adapter would add only s times the residual (the peft trap in METHOD.md).
    """
    scaling = alpha / rank
    w = w.float()
    A = torch.zeros(rank, w.shape[1], device=w.device)
    B = torch.zeros(w.shape[0], rank, device=w.device)
    errors = []
    for _ in range(iters):
        base = w - scaling * B @ A
        q = rtn(base, bits, group_size)
        u, s, vh = _svd(w - q, rank, lowrank)  # (out, r), (r,), (r, in)
        B = u * (s.sqrt() / math.sqrt(scaling))  # (out, r)
        A = (s.sqrt() / math.sqrt(scaling)).unsqueeze(1) * vh  # (r, in)
        errors.append(weight_error(w, q, A, B, scaling))
    return LoraInit(q, A, B, base, errors)


def qlora_linear(linear, bits=2, group_size=64, rank=64, alpha=16.0):
    return QuantLinear.from_linear(linear, bits, group_size, rank, alpha, clip=False)


def loftq_linear(linear, bits=2, group_size=64, rank=64, alpha=16.0, iters=5):
    init = loftq_init(linear.weight, bits, group_size, rank, alpha, iters)
    # base stays fp32: cast down, its RTN would no longer be exactly init.q
    return QuantLinear(init.base, linear.bias, bits, group_size, rank, alpha, clip=False,
                       A=init.A, B=init.B)


# ---- putting QuantLinear into a block ----

def swap_linears(block, make):
    """Replace every nn.Linear inside block (for a Llama block: attention.wq, wk, wv, wo,
    feed_forward.w1, w2, w3) by make(linear). Returns {qualified name: new module}."""
    targets = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    swapped = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        swapped[name] = make(linear)
        setattr(parent, child, swapped[name])
    return swapped


def quant_linears(module):
    """(name, QuantLinear) pairs inside module, in module order."""
    for name, m in module.named_modules():
        if isinstance(m, QuantLinear):
            yield name, m
