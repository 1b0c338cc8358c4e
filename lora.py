"""LoRA on a quantized weight, QuantLinear, and the initialisations that ApiQ compares with.

ApiQ (Liao et al., EMNLP 2024, arXiv 2402.05147), sections 2-3. Every linear of a transformer
block becomes

    y = x Q(W)^T + s (x A^T) B^T,   s = lora_alpha / rank,   A: rank x in,  B: out x rank   (LoRA)

with Q the quantizer of quant.py (learnable clipping gamma, beta) and the usual LoRA init
B = 0 (Hu et al. 2021, section 4.1) and A ~ kaiming_uniform(a=sqrt(5)), as peft draws it (the
paper says a random Gaussian). Naming as in the LoRA
paper and peft: A is the input-side factor (random init), B the output-side factor (zero
init), and the update is B @ A. The ApiQ paper writes the update with the factors' names
swapped; the product is the same.

The initialisations of ApiQ section 3 that are not ApiQ itself, each a pure function of W:
qlora_init (Q = RTN(W), B = 0; Dettmers et al. 2023) and loftq_init (Li et al. 2023,
Algorithm 1). ApiQ-lw and ApiQ-bw train QuantLinear's gamma, beta, A, B: calibrate.py.

    python -c "import torch, lora; print(lora.loftq_init(torch.randn(64, 128), 2, 64, 16, 16).errors)"
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import dequantize, fake_quant, pack, quantize, unpack, validate


def lora_init(out_features, in_features, rank, device=None):
    """Standard LoRA init: A (rank, in) ~ U(-1/sqrt(in), 1/sqrt(in)), B (out, rank) = 0."""
    A = torch.empty(rank, in_features, device=device)
    if rank > 0:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # same bound as nn.Linear: 1/sqrt(in)
    return A, torch.zeros(out_features, rank, device=device)


class QuantLinear(nn.Module):
    """y = x Q(W)^T + s (x A^T) B^T  (LoRA on a quantized weight; s = lora_alpha / rank).

    A (rank, in), B (out, rank): the LoRA factors, fp32 parameters; rank 0: no adapter.
    Q(W) is one of two things:
    - calibrating (from_linear): Q(W) = quant.fake_quant(W, gamma, beta[, offset]) in every
      forward, differentiable in the clipping logits gamma, beta (out, in // group_size), init 4.0
      (sigmoid = 0.982), and in the rounding offset V (out, in) of --learn-rounding (recipes.py);
      `weight` is the full-precision W (out, in), frozen.
    - frozen (freeze(), from_codes): Q(W) = quant.dequantize(codes, scale, zero), the codes
      packed by quant.pack; cache_qweight() keeps Q(W) dequantized so a forward does not unpack.
      `weight` is W where it is still known (the weight error, the saliency penalty), else None.
    """

    def __init__(self, A, B, bits=2, group_size=64, lora_alpha=16.0):
        super().__init__()
        (self.rank, self.in_features), self.out_features = A.shape, B.shape[0]
        validate(bits, group_size, self.in_features)
        self.bits, self.group_size, self.lora_alpha = bits, group_size, lora_alpha
        self.scaling = lora_alpha / self.rank if self.rank > 0 else 0.0
        # row-major copies: an SVD factor is often a strided view, and a strided weight takes a
        # different GEMM path whose rounding differs from the reloaded (contiguous) model's
        self.A = nn.Parameter(A.detach().float().clone(memory_format=torch.contiguous_format))
        self.B = nn.Parameter(B.detach().float().clone(memory_format=torch.contiguous_format))
        for name in ("weight", "bias", "codes", "scale", "zero"):
            self.register_buffer(name, None)
        self.register_buffer("q_cache", None, persistent=False)
        for name in ("gamma", "beta", "offset"):
            self.register_parameter(name, None)

    @classmethod
    def from_linear(cls, linear, bits=2, group_size=64, rank=64, lora_alpha=16.0, learn_rounding=False):
        """ApiQ's starting point: W as it is, clipping logits 4.0, the standard LoRA init."""
        w = linear.weight
        A, B = lora_init(*w.shape, rank, device=w.device)
        m = cls(A, B, bits, group_size, lora_alpha)
        m.weight, m.bias = w.detach(), None if linear.bias is None else linear.bias.detach()
        n_groups = m.in_features // group_size
        m.gamma = nn.Parameter(torch.full((m.out_features, n_groups), 4.0, device=w.device))
        m.beta = nn.Parameter(torch.full((m.out_features, n_groups), 4.0, device=w.device))
        if learn_rounding:   # beyond ApiQ: a rounding offset per weight (quant.fake_quant), zero at the start
            m.offset = nn.Parameter(torch.zeros_like(w, dtype=torch.float32))
        return m

    @classmethod
    def from_codes(cls, codes, scale, zero, A, B, bits, group_size, lora_alpha=16.0, bias=None, weight=None):
        """A frozen QuantLinear: codes packed by quant.pack, scale and zero (out, in // group_size),
        the factors A, B; weight: W if it is to be kept."""
        m = cls(A, B, bits, group_size, lora_alpha)
        m.codes, m.scale, m.zero, m.bias, m.weight = codes, scale, zero, bias, weight
        return m

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    def qweight(self):
        """Q(W) (out, in): the cached copy, else the stored codes dequantized, else fake_quant of
        W with the clipping (differentiable in gamma and beta: calibration)."""
        if self.q_cache is not None:
            return self.q_cache
        if self.quantized:
            codes = unpack(self.codes, self.bits, (self.out_features, self.in_features))
            return dequantize(codes, self.scale, self.zero.float(), self.group_size)
        return fake_quant(self.weight, self.bits, self.group_size, self.gamma, self.beta, self.offset)  # eq. (3)-(6)

    def lora_weight(self):
        return self.scaling * self.B @ self.A  # s B A, (out, in)

    def effective_weight(self):
        """W_eff = Q(W) + s B A (out, in): the weight the layer applies."""
        return self.qweight().float() + self.lora_weight()

    def clip_parameters(self):
        return [p for p in (self.gamma, self.beta) if p is not None]

    def round_parameters(self):
        return [] if self.offset is None else [self.offset]

    def lora_parameters(self):
        return [self.A, self.B]

    @torch.no_grad()
    def freeze(self, cache=True):
        """Calibration done: store Q(W) as integer codes with its scale and zero (the clipping is
        in them now, so gamma and beta go) and, with cache=True, keep it dequantized for speed.
        A and B stay trainable: they are what finetuning trains."""
        if self.quantized:
            raise ValueError("freeze() of a QuantLinear that is frozen already (its codes would be made again from W)")
        codes, self.scale, self.zero = quantize(self.weight, self.bits, self.group_size, self.gamma, self.beta,
                                                self.offset)
        self.codes = pack(codes, self.bits)
        self.gamma = self.beta = self.offset = None
        self.q_cache = None
        if cache:
            self.cache_qweight()

    @torch.no_grad()
    def cache_qweight(self, dtype=None):
        """Keep Q(W) dequantized, in `dtype` (default fp32: 4 bytes a weight; bf16: 2): forwards
        skip the unpacking. Forwards in that dtype see the same values as from the packed codes."""
        self.q_cache = None
        q = self.qweight().detach()
        self.q_cache = q if dtype is None else q.to(dtype)

    def drop_cache(self):
        self.q_cache = None

    def forward(self, x):
        """x (..., in) -> (..., out)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.qweight().to(x.dtype), bias)                     # x Q(W)^T (+ bias)
        lora = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))  # (x A^T) B^T
        return y + self.scaling * lora                                        # (LoRA)

    def export(self) -> dict:
        """Tensors to save: packed codes, scale and zero (out, in // group_size), A, B (and bias)."""
        if not self.quantized:
            raise ValueError("export() of a QuantLinear that is still calibrating: freeze() it first")
        out = {"qweight": self.codes, "scale": self.scale, "zero": self.zero,
               "A": self.A.detach(), "B": self.B.detach()}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def from_export(cls, t, bits, group_size, lora_alpha, weight=None, device="cpu"):
        """The inverse of export(): a frozen QuantLinear from its saved tensors `t` (keys qweight
        (packed codes), scale, zero, A, B, optionally bias)."""
        t = {k: v.to(device) for k, v in t.items()}
        return cls.from_codes(t["qweight"], t["scale"], t["zero"], t["A"], t["B"], bits, group_size, lora_alpha,
                              t.get("bias"), weight)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, lora_alpha={self.lora_alpha}, "
                f"quantized={self.quantized}, cached={self.q_cache is not None}")


class LoraLinear(nn.Module):
    """y = x W^T + s (x A^T) B^T on a frozen full-precision W: plain LoRA (Hu et al. 2021), the
    reference that finetuning from a quantized start is measured against (finetune.py --fp-lora)."""

    def __init__(self, linear, rank=64, lora_alpha=16.0):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.rank, self.lora_alpha, self.scaling = rank, lora_alpha, lora_alpha / rank
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        A, B = lora_init(self.out_features, self.in_features, rank, device=linear.weight.device)
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)

    def forward(self, x):
        lora = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))  # (x A^T) B^T
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias) + self.scaling * lora


def adapters(model) -> dict:
    """{name: module} of every LoRA-carrying linear (QuantLinear or LoraLinear) with rank > 0."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, LoraLinear)) and m.rank > 0}


# ---- the initialisations compared in ApiQ section 3 ----

class LoraInit(NamedTuple):
    codes: torch.Tensor   # integer codes of Q (out, in), uint8
    scale: torch.Tensor   # step per group (out, in // group_size)
    zero: torch.Tensor    # zero point per group (out, in // group_size)
    A: torch.Tensor       # (rank, in)
    B: torch.Tensor       # (out, rank)
    errors: list          # ||W - (Q + s B A)||_F after each iteration (one entry for QLoRA)


def weight_error(w, w_eff) -> float:
    """||W - W_eff||_F, the weight error of the ApiQ paper's fig. 3 (W_eff = Q + s B A)."""
    return torch.linalg.matrix_norm(w.float() - w_eff.float()).item()


@torch.no_grad()
def weight_errors(model, ref) -> list[dict]:
    """weight_error of every QuantLinear in `model` against the full-precision W of the same name
    in `ref` (and relative to ||W||_F). `model` and `ref` may be whole models or one block each."""
    rows = []
    for name, m in quant_linears(model):
        w = ref.get_submodule(name).weight.float().to(m.A.device)
        err = weight_error(w, m.effective_weight())
        rows.append({"layer": name, "error": err, "rel": err / torch.linalg.matrix_norm(w).item()})
    return rows


@torch.no_grad()
def qlora_init(w, bits, group_size, rank):
    """QLoRA: Q = RTN(W), standard A, B = 0, so the start W' = Q differs from W."""
    codes, scale, zero = quantize(w, bits, group_size)
    A, B = lora_init(*w.shape, rank, device=w.device)
    return LoraInit(codes, scale, zero, A, B, [weight_error(w, dequantize(codes, scale, zero, group_size))])


def svd_split(r, rank, scaling, lowrank=False):
    """B (out, rank), A (rank, in) with s B A = the rank-r SVD U S V^T of r (out, in):
    B = U sqrt(S / s), A = sqrt(S / s) V^T. Dividing by s makes s B A equal the SVD term; without
    it the adapter would add only s times the residual (peft's LoftQ once had exactly this bug)."""
    if lowrank:  # randomized: much faster on big matrices, close to the exact top-rank part
        u, sv, v = torch.svd_lowrank(r, q=min(rank + 10, *r.shape), niter=4)
        u, sv, vh = u[:, :rank], sv[:rank], v[:, :rank].T
    else:
        u, sv, vh = torch.linalg.svd(r, full_matrices=False)
        u, sv, vh = u[:, :rank], sv[:rank], vh[:rank]                  # (out, r), (r,), (r, in)
    root = (sv / scaling).sqrt()
    return u * root, root.unsqueeze(1) * vh                             # B (out, r), A (r, in)


@torch.no_grad()
def loftq_init(w, bits, group_size, rank, lora_alpha, iters=5, lowrank=False):
    """LoftQ (Li et al. 2023, Algorithm 1), with s = lora_alpha / rank: alternate T = iters times

        Q   = RTN(W - s B A)
        s B A = rank-r SVD of (W - Q)                                      (svd_split)
    """
    scaling = lora_alpha / rank
    w = w.float()
    A = torch.zeros(rank, w.shape[1], device=w.device)
    B = torch.zeros(w.shape[0], rank, device=w.device)
    errors = []
    for _ in range(iters):
        codes, scale, zero = quantize(w - scaling * B @ A, bits, group_size)   # Q = RTN(W - s B A)
        q = dequantize(codes, scale, zero, group_size)
        B, A = svd_split(w - q, rank, scaling, lowrank)                        # s B A = SVD_r(W - Q)
        errors.append(weight_error(w, q + scaling * B @ A))
    return LoraInit(codes, scale, zero, A, B, errors)


def init_linear(linear, method, bits=2, group_size=64, rank=64, lora_alpha=16.0, loftq_iters=5):
    """A QuantLinear for `linear` made by one of the data-free inits: rtn (no adapter), qlora or
    loftq. It keeps W as its `weight` (drop it with `.weight = None` when not needed)."""
    w = linear.weight
    if method == "loftq":
        init = loftq_init(w, bits, group_size, rank, lora_alpha, loftq_iters)
    else:
        init = qlora_init(w, bits, group_size, 0 if method == "rtn" else rank)
    return QuantLinear.from_codes(pack(init.codes, bits).to(w.device), init.scale, init.zero, init.A, init.B, bits,
                                  group_size, lora_alpha, None if linear.bias is None else linear.bias.detach(),
                                  w.detach())


# ---- putting QuantLinear into a block ----

def swap_linears(block, make):
    """Replace every nn.Linear inside block (for a Llama block: llama.LINEARS) by make(linear).
    Returns {qualified name: new module}."""
    targets = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    swapped = {name: make(linear) for name, linear in targets}
    for name, m in swapped.items():
        block.set_submodule(name, m)
    return swapped


def quant_linears(module):
    """(name, QuantLinear) pairs inside module, in module order."""
    for name, m in module.named_modules():
        if isinstance(m, QuantLinear):
            yield name, m


def is_quantized(model) -> bool:
    return any(True for _ in quant_linears(model))
