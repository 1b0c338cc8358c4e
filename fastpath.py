"""Speed devices: the numbers of quant.py, lora.py, calibrate.py and saliency.py computed with
fewer passes over the weights or less memory, installed by one explicit call,

    qblock, penalty, AdamW = fastpath.accelerate(qblock, penalty, compile=False)

which calibrate.py makes with --fast (and --compile and every preset) and finetune.py with
--packed. Without it the concept files run their formulas as written. accelerate returns:

- the module with every lora.QuantLinear swapped for a FastQuantLinear (the same tensors):
  - Q(W) through FakeQuant: quant.fake_quant (LWC, rounding offset, STE) as one autograd Function
    with its backward written out; the forward keeps no (out, in) intermediate for the backward,
    which recomputes the codes. compile=True fuses each of its two passes into one loop with
    torch.compile (~5 s per weight shape, cached on disk by torch).
  - in a calibration step in fp32, W_eff = Q(W) + s B A formed once where that takes fewer flops
    than the LoRA path x Q^T + s (x A^T) B^T: T (in + out) > in out for the step's T tokens (or
    always with the AfterLoRA penalty, which then needs no B A of its own; never with the
    BeforeLoRA one, nor in bf16 / fp16, where a small s B A would round away); the forward is then
    x W_eff^T alone, and the step's Q(W) or W_eff is handed on to the penalty.
  - PackedMatmul: x Q(W)^T from the packed codes while the adapters of a frozen model train, Q(W)
    dequantized in the forward and again in the backward, never kept (~2.6 bits a weight).
- the penalty as a FastPenalty: sum_i alpha_i (w_i - W_eff,i)^2 of Cao & Aref eq. (2) through
  WeightedDistance, its gradients written out (half the passes of autograd over the weights),
  on the weights the step's forward applied.
- torch's fused AdamW (one pass over each parameter a step; the rounding offsets are as many as
  the weights).

Each device has the plain formula's values: FakeQuant's W_hat and PackedMatmul bit for bit,
FakeQuant's gradients (eager and compiled), the merged W_eff and WeightedDistance within fp32
rounding, fused AdamW within its kernel's rounding (tests/test_fastpath.py;
bench/bit_identity.py holds whole runs to the code before this became one call;
bench/bench_quantizer.py times them).

    python -c "import fastpath, lora, torch; print(fastpath.accelerate(lora.QuantLinear.from_linear(
        torch.nn.Linear(64, 8), rank=4)).module)"
"""
import warnings
from functools import cache, partial
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from lora import QuantLinear
from saliency import SaliencyPenalty


class Accelerated(NamedTuple):
    module: torch.nn.Module                 # the QuantLinears swapped for FastQuantLinear
    penalty: Optional[SaliencyPenalty]      # a FastPenalty, or None
    optimizer: Callable                     # an AdamW factory: torch.optim.AdamW with fused=True


def accelerate(module, penalty=None, compile=False) -> Accelerated:
    """Install the speed devices (the module docstring) in `module` (a block or a whole model: its
    QuantLinears swapped in place, the same tensors; a bare QuantLinear: its fast copy returned)
    and in `penalty`."""
    kernels = compiled_kernels() if compile else EAGER
    variant = None if penalty is None else penalty.variant

    def fast(m):
        return FastQuantLinear.of(m, variant, kernels)
    if isinstance(module, QuantLinear):
        module = fast(module)
    else:
        for name, m in [(n, m) for n, m in module.named_modules() if type(m) is QuantLinear]:
            module.set_submodule(name, fast(m))
    return Accelerated(module, None if penalty is None else FastPenalty(penalty),
                       partial(torch.optim.AdamW, fused=True))


class FastQuantLinear(QuantLinear):
    """lora.QuantLinear with FakeQuant, the merged W_eff of a calibration step and PackedMatmul.
    penalty_variant: the variant of the penalty the step adds (None: no penalty), which decides
    merging; the step's weight is kept for the penalty only where there is one."""

    @classmethod
    def of(cls, m, penalty_variant=None, kernels=None):
        """m's state, its parameters and buffers the same tensors (not copies), in a FastQuantLinear."""
        f = object.__new__(cls)
        f.__dict__ = {**m.__dict__, "_parameters": dict(m._parameters), "_buffers": dict(m._buffers)}
        f.penalty_variant, f.kernels, f.step = penalty_variant, kernels or EAGER, None
        return f

    def qweight(self):
        if self.q_cache is None and not self.quantized and self.gamma is not None and self.beta is not None \
                and not self.weight.requires_grad:
            return FakeQuant.apply(self.weight, self.gamma, self.beta, self.offset, self.bits, self.group_size,
                                   self.kernels)
        return super().qweight()

    def merges(self, q, tokens) -> bool:
        """Whether a step forms W_eff = Q(W) + s B A once (fp32 only): with the AfterLoRA penalty
        always; with none where it takes fewer flops: the LoRA path x A^T, (x A^T) B^T and their
        gradients cost 6 r T (in + out) for T tokens, the merged one (B A, dL/dB = s G A^T,
        dL/dA = s B^T G with G = dL/dW_eff, which Q(W)'s clipping needs anyway) 6 r in out; with
        the BeforeLoRA penalty never (it needs Q(W) alone)."""
        if q.dtype != torch.float32 or self.penalty_variant == "before":
            return False
        return self.penalty_variant == "after" or tokens * (self.in_features + self.out_features) > \
            self.in_features * self.out_features

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.quantized and self.q_cache is None and torch.is_grad_enabled():    # a calibration step
            q = self.qweight()
            merged = self.merges(q, x.shape[:-1].numel())
            w = torch.addmm(q, self.B, self.A, alpha=self.scaling) if merged else q     # W_eff or Q(W), (out, in)
            if self.penalty_variant is not None:
                self.step = (w, merged, self.versions())             # for the penalty of the same step
            y = F.linear(x, w.to(x.dtype), bias)
            if merged:
                return y
        elif self.quantized and self.q_cache is None and torch.is_grad_enabled() and x.requires_grad:
            y = PackedMatmul.apply(x, self)                          # training the adapters of a packed model
            y = y if bias is None else y + bias
        else:
            return super().forward(x)
        lora = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))  # (x A^T) B^T
        return y + self.scaling * lora

    def versions(self):
        """The parameters' version counters: an optimizer step changes them."""
        return tuple(p._version for p in (self.gamma, self.beta, self.offset, self.A, self.B) if p is not None)

    def take_step(self):
        """(the weight the last calibration step applied, whether it is W_eff), once, while the
        parameters are those it was made from; else None (the penalty then computes its own)."""
        step, self.step = self.step, None
        return step[:2] if step is not None and step[2] == self.versions() else None

    def freeze(self, cache=True):
        self.step = None
        super().freeze(cache)


class FastPenalty(SaliencyPenalty):
    """saliency.SaliencyPenalty (the same state: alphas, lambdas, scales) with each linear's
    distance through WeightedDistance, on the Q(W) or W_eff that the step's forward applied."""

    def __init__(self, plain: SaliencyPenalty):
        self.__dict__ = plain.__dict__                              # shared, not copied

    def linear_distance(self, m, alpha):
        step = m.take_step() if isinstance(m, FastQuantLinear) else None
        if step is not None and step[1]:                             # the step's W_eff
            return WeightedDistance.apply(m.weight, step[0], alpha, None, None, 0.0)
        q = m.qweight() if step is None else step[0]
        lora = (m.B, m.A, m.scaling) if self.variant == "after" else (None, None, 0.0)  # W_eff = q + s B A, or q
        return WeightedDistance.apply(m.weight, q, alpha, *lora)


# ---- Q(W): FakeQuant

def _fq_codes(g, step, zero, offset):
    """c = round(W / step + V) + zero, eq. (5) before its clamp: (out, G, gs) from W grouped, step and
    zero (out, G, 1), the offset V (out, G, gs) or None; one new tensor, the rest in place."""
    u = g / step
    if offset is not None:
        u += offset
    return u.round_().add_(zero)


def _fq_forward(g, step, zero, offset, qmax: int):
    """W_hat (out, G, gs), the arguments as _fq_codes'."""
    return _fq_codes(g, step, zero, offset).clamp_(0, qmax).sub_(zero).mul_(step)   # eq. (5), eq. (6)


def _fq_backward(g, grad, step, zero, offset, qmax: int):
    """(dL/dstep (out, G), dL/dV (out, G, gs)) from dL/dW_hat = grad, the codes recomputed."""
    c = _fq_codes(g, step, zero, offset)
    q = c.clamp(0, qmax)
    gm = grad * (q == c)                                                    # G m: the clamp passes the gradient
    gstep = (grad * q.sub_(zero)).sum(-1) - (gm * g).sum(-1) / step.squeeze(-1)
    return gstep, gm.mul_(step)


class Kernels(NamedTuple):
    forward: object       # _fq_forward or its compiled form
    backward: object


EAGER = Kernels(_fq_forward, _fq_backward)


@cache
def compiled_kernels() -> Kernels:
    """FakeQuant's two elementwise passes through torch.compile, made once a process."""
    return Kernels(Compiled(_fq_forward), Compiled(_fq_backward))


class Compiled:
    """torch.compile(fn), falling back to fn itself (the same values) where compiling fails, e.g. on a
    machine without the C++ compiler that inductor needs on a CPU (fell_back then says so)."""

    def __init__(self, fn):
        self.fn, self.compiled, self.fell_back, self.shapes = fn, torch.compile(fn, dynamic=False), False, set()

    def __call__(self, *args):
        if self.fell_back:
            return self.fn(*args)
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key in self.shapes:                             # compiled for these shapes: any error is a real one
            return self.compiled(*args)
        try:
            out = self.compiled(*args)                     # the first call of a shape compiles
        except Exception as e:                             # noqa: BLE001 (any compiler failure)
            warnings.warn(f"torch.compile of the quantizer failed ({type(e).__name__}): it runs eagerly")
            self.fell_back = True
            return self.fn(*args)
        self.shapes.add(key)
        return out


class FakeQuant(torch.autograd.Function):
    """W_hat = (clamp(round(W / step + V) + zero, 0, 2^N - 1) - zero) * step, quant.py's eq. (3)-(6)
    with LWC (gamma, beta) and the rounding offset V (or none), per (row, group). With
    c = round(W / step + V) + zero (before the clamp), q its clamped value, m = [0 <= c <= 2^N - 1]
    and G = dL/dW_hat, the STE gradients autograd takes through quant.fake_quant are

        dL/dV    = G step m
        dL/dstep = sum_group G ((q - zero) - m W / step)        (zero: round, no gradient)
        dL/dgamma = dL/dstep [step unclamped] max(group) sigmoid'(gamma) / (2^N - 1),  beta with -min(group)

    The forward saves only per-group tensors (step, zero, clipping factors, max and min); W and V
    are the caller's tensors, kept anyway, and the backward recomputes the codes from them. The
    two elementwise passes are `kernels` (EAGER: _fq_forward and _fq_backward; or compiled_kernels())."""

    @staticmethod
    def forward(ctx, w, gamma, beta, offset, bits, group_size, kernels):
        out, n_in = w.shape
        qmax = 2**bits - 1
        g = w.float().reshape(out, n_in // group_size, group_size)              # (out, G, gs), a view in fp32
        xmax0, xmin0 = g.amax(-1), g.amin(-1)                                   # (out, G)
        sg, sb = torch.sigmoid(gamma), torch.sigmoid(beta)
        raw = (sg * xmax0 - sb * xmin0) / qmax                                  # eq. (3) before its clamp
        step = raw.clamp(1e-5, 1e4)
        zero = torch.round(-(sb * xmin0) / step).clamp_(0, qmax)                # eq. (4)
        v = None if offset is None else offset.float().reshape(g.shape)
        w_hat = kernels.forward(g, step.unsqueeze(-1), zero.unsqueeze(-1), v, qmax)
        ctx.save_for_backward(w, offset, step, zero, sg, sb, xmax0, xmin0, raw)
        ctx.bits, ctx.group_size, ctx.kernels = bits, group_size, kernels
        return w_hat.reshape(out, n_in).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, offset, step, zero, sg, sb, xmax0, xmin0, raw = ctx.saved_tensors
        out, n_in = w.shape
        qmax = 2**ctx.bits - 1
        g = w.float().reshape(out, n_in // ctx.group_size, ctx.group_size)
        v = None if offset is None else offset.float().reshape(g.shape)
        gstep, goffset = ctx.kernels.backward(g, grad.float().reshape(g.shape), step.unsqueeze(-1),
                                              zero.unsqueeze(-1), v, qmax)
        gstep = gstep * ((raw >= 1e-5) & (raw <= 1e4))                          # through eq. (3)'s clamp
        ggamma = gstep * xmax0 * sg * (1 - sg) / qmax
        gbeta = -gstep * xmin0 * sb * (1 - sb) / qmax
        goffset = goffset.reshape(offset.shape).to(offset.dtype) if offset is not None else None
        return None, ggamma.to(sg.dtype), gbeta.to(sb.dtype), goffset, None, None, None


# ---- x Q(W)^T of a frozen, packed QuantLinear while its adapters train

class PackedMatmul(torch.autograd.Function):
    """x Q(W)^T with Q(W) dequantized from the codes in the forward and again in the backward (for
    dL/dx = g Q(W)). The same values as F.linear with the dequantized weight; Q(W) itself gets no
    gradient (it is frozen)."""

    @staticmethod
    def forward(ctx, x, m):
        ctx.m = m
        return F.linear(x, m.qweight().to(x.dtype))                       # (..., out)

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.m.qweight().to(g.dtype), None                      # (..., in)


# ---- the distance of Cao & Aref eq. (2)

class WeightedDistance(torch.autograd.Function):
    """sum_i alpha_i (w_i - W_eff,i)^2 with W_eff = q + s B A (B, A given: AfterLoRA) or q
    (BeforeLoRA), alpha None: alpha_i = 1. With r = w - W_eff its gradients are

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
