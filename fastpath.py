"""Speed devices: the same numbers as the formulas of quant.py, lora.py, calibrate.py and
saliency.py, computed with fewer passes over the weights or less memory. None of them changes the
math; each is tested against the plain formula (tests/test_lora.py, tests/test_saliency.py).

- qmatmul / PackedMatmul: x Q(W)^T for a QuantLinear, from its cached Q(W), its packed codes
  (dequantized in the forward and again in the backward, so autograd keeps ~2.6 bits a weight,
  not a dequantized copy: finetune.py --packed), or fake_quant of W (calibration).
- step_weights / use_qweights: one calibration step quantizes every linear once and hands the
  same Q(W) tensors to the forward and to the saliency penalty; in fp32 it forms W_eff = Q(W) +
  s B A once where that takes fewer flops than the LoRA path x Q^T + s (x A^T) B^T (the step's
  tokens T: T (in + out) > in out), or for the AfterLoRA penalty, which then needs no B A of its
  own; the forward is x W_eff^T alone (bench/bench_penalty.py, bench/bench_quantizer.py).
- WeightedDistance: sum_i alpha_i (w_i - W_eff,i)^2 of Cao & Aref eq. (2) with its gradients
  written out, half the passes of autograd over the block's weights.
- square_grads_into: the saliency pass squares each weight's gradient into its accumulator the
  moment autograd has it and drops it, so no full set of gradients ever exists.
- autocast_like: bf16 / fp16 activations compute their matmuls under autocast.
- FakeQuant: quant.fake_quant (LWC, rounding offset, STE) as one autograd Function with its
  backward written out: the forward keeps no (out, in) intermediate for the backward, which
  recomputes the codes from W, the step and the zero point; compile_quantizer() fuses each pass
  into one loop with torch.compile (tests/test_quant.py checks values and gradients against
  quant.fake_quant, eager and compiled; bench/bench_quantizer.py times them).

    python -c "import torch, fastpath; print(fastpath.autocast_like(torch.zeros(1, dtype=torch.bfloat16)))"
"""
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from quant import fake_quant as reference_fake_quant


def autocast_like(x):
    """Autocast to x's dtype where it is bf16 / fp16 (weights and cached activations in that
    dtype, matmuls under autocast, CUDA and CPU alike), nothing in fp32."""
    return nullcontext() if x.dtype == torch.float32 else torch.autocast(x.device.type, dtype=x.dtype)


def _square_into(acc, p):
    g = p.grad.float()                     # a new tensor unless the grad is fp32 already: free to square in place
    acc.add_(g.square_().to(acc.device))   # acc += (dL / dw)^2
    p.grad = None                          # so the next sequence starts from nothing, and memory is freed now


def square_grads_into(w, acc):
    """From now on each backward adds (dL/dw)^2 to `acc` (w's shape) and frees w.grad; returns the
    hook's handle (.remove() it when done)."""
    w.requires_grad_(True)
    return w.register_post_accumulate_grad_hook(partial(_square_into, acc))


# ---- Q(W) while calibrating

FUSED_QUANT = True      # QuantLinear.qweight() calibrates through FakeQuant; False: quant.fake_quant (reference)


def fake_quant(w, bits, group_size, gamma=None, beta=None, offset=None):
    """quant.fake_quant's values and gradients in gamma, beta, offset, through FakeQuant where it
    applies (W frozen, both clipping logits given), else through the reference itself."""
    if not FUSED_QUANT or w.requires_grad or gamma is None or beta is None:
        return reference_fake_quant(w, bits, group_size, gamma, beta, offset)
    return FakeQuant.apply(w, gamma, beta, offset, bits, group_size)


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


_QUANT_KERNELS = {"forward": _fq_forward, "backward": _fq_backward}


def compile_quantizer(on=True):
    """FakeQuant's two elementwise passes through torch.compile (one fused loop each, ~5 s to
    compile per weight shape, cached on disk by torch) or back to eager. calibrate.py --compile."""
    if on:
        _QUANT_KERNELS.update(forward=_compiled(_fq_forward), backward=_compiled(_fq_backward))
    else:
        _QUANT_KERNELS.update(forward=_fq_forward, backward=_fq_backward)


def _compiled(fn):
    """torch.compile(fn), falling back to fn itself (the same values) where compiling fails, e.g. on a
    machine without the C++ compiler that inductor needs on a CPU."""
    compiled = torch.compile(fn, dynamic=False)

    def call(*args):
        nonlocal compiled
        if compiled is not fn:
            try:
                return compiled(*args)
            except Exception as e:                          # noqa: BLE001 (any compiler failure)
                import warnings
                warnings.warn(f"torch.compile of the quantizer failed ({type(e).__name__}): it runs eagerly")
                compiled, call.fell_back = fn, True
        return fn(*args)
    call.fell_back = False
    return call


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
    two elementwise passes are _fq_forward and _fq_backward (compiled by compile_quantizer)."""

    @staticmethod
    def forward(ctx, w, gamma, beta, offset, bits, group_size):
        out, n_in = w.shape
        qmax = 2**bits - 1
        g = w.float().reshape(out, n_in // group_size, group_size)              # (out, G, gs), a view in fp32
        xmax0, xmin0 = g.amax(-1), g.amin(-1)                                   # (out, G)
        sg, sb = torch.sigmoid(gamma), torch.sigmoid(beta)
        raw = (sg * xmax0 - sb * xmin0) / qmax                                  # eq. (3) before its clamp
        step = raw.clamp(1e-5, 1e4)
        zero = torch.round(-(sb * xmin0) / step).clamp_(0, qmax)                # eq. (4)
        v = None if offset is None else offset.float().reshape(g.shape)
        w_hat = _QUANT_KERNELS["forward"](g, step.unsqueeze(-1), zero.unsqueeze(-1), v, qmax)
        ctx.save_for_backward(w, offset, step, zero, sg, sb, xmax0, xmin0, raw)
        ctx.bits, ctx.group_size = bits, group_size
        return w_hat.reshape(out, n_in).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, offset, step, zero, sg, sb, xmax0, xmin0, raw = ctx.saved_tensors
        out, n_in = w.shape
        qmax = 2**ctx.bits - 1
        g = w.float().reshape(out, n_in // ctx.group_size, ctx.group_size)
        v = None if offset is None else offset.float().reshape(g.shape)
        gstep, goffset = _QUANT_KERNELS["backward"](g, grad.float().reshape(g.shape), step.unsqueeze(-1),
                                                    zero.unsqueeze(-1), v, qmax)
        gstep = gstep * ((raw >= 1e-5) & (raw <= 1e4))                          # through eq. (3)'s clamp
        ggamma = gstep * xmax0 * sg * (1 - sg) / qmax
        gbeta = -gstep * xmin0 * sb * (1 - sb) / qmax
        goffset = goffset.reshape(offset.shape).to(offset.dtype) if offset is not None else None
        return None, ggamma.to(sg.dtype), gbeta.to(sb.dtype), goffset, None, None


# ---- x Q(W)^T

def qmatmul(x, m):
    """x Q(W)^T + bias for QuantLinear m (..., in) -> (..., out). While training the adapters of a
    packed model (no cached Q(W)), through PackedMatmul: Q(W) is not kept for the backward."""
    bias = None if m.bias is None else m.bias.to(x.dtype)
    if m.q_cache is None and m.quantized and torch.is_grad_enabled() and x.requires_grad:
        y = PackedMatmul.apply(x, m)
        return y if bias is None else y + bias
    return F.linear(x, m.qweight().to(x.dtype), bias)


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


# ---- one calibration step's weights

def merged_weight(m, q):
    """W_eff = Q(W) + s B A (out, in) of QuantLinear m, differentiable in Q(W), B and A."""
    return torch.addmm(q, m.B, m.A, alpha=m.scaling)


def merges(penalty, m, q, tokens) -> bool:
    """Whether a step forms W_eff = Q(W) + s B A of QuantLinear m once (fp32 only: in bf16 / fp16 a
    small s B A would round away in one low-precision W_eff):
    - with the AfterLoRA penalty always: the penalty needs W_eff itself;
    - with no penalty where it costs fewer flops than the LoRA path: over a step the separate path
      x A^T, (x A^T) B^T and their gradients take 6 r T (in + out) flops for T tokens, the merged one
      B A, dL/dB = s G A^T, dL/dA = s B^T G (G = dL/dW_eff, which Q(W)'s clipping needs anyway)
      6 r in out: so when T (in + out) > in out (SmolLM2, T = 256: k_proj, v_proj; T >= 512: all);
    - with the BeforeLoRA penalty never (it needs Q(W) alone)."""
    if q.dtype != torch.float32 or (penalty is not None and penalty.variant != "after"):
        return False
    return penalty is not None or tokens * (m.in_features + m.out_features) > m.in_features * m.out_features


def step_weights(linears, penalty=None, tokens=0):
    """(the weights one step applies, merged): Q(W) of each QuantLinear, differentiable in gamma,
    beta (and the rounding offsets), or W_eff = Q(W) + s B A where merges() says so (a list of
    bools, one a linear); tokens: how many the step's forward sees (B T)."""
    qs = [m.qweight() for m in linears]
    merged = [merges(penalty, m, q, tokens) for m, q in zip(linears, qs)]
    return [merged_weight(m, q) if mm else q for m, q, mm in zip(linears, qs, merged)], merged


@contextmanager
def use_qweights(linears, qs, merged=None):
    """Inside the block, each QuantLinear of `linears` applies the given Q(W) (still in the
    autograd graph) instead of computing its own; merged (step_weights' bools, one a linear; None:
    none) True: that tensor is W_eff and the forward is x W_eff^T alone, without the LoRA path."""
    linears = list(linears)
    merged = merged or [False] * len(linears)
    try:
        for m, q, mm in zip(linears, qs, merged):
            m.q_cache, m.merged = q, mm
        yield
    finally:
        for m in linears:
            m.q_cache, m.merged = None, False


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
