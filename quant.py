"""Uniform asymmetric group-wise weight quantization with learnable weight clipping (LWC).

The quantizer that ApiQ (Liao et al., EMNLP 2024, arXiv 2402.05147, section 3) trains: uniform
round-to-nearest as written in Cao & Aref (arXiv 2504.13932) Appendix C, eq. (3)-(6), with the
learnable weight clipping (LWC) of OmniQuant (Shao et al. 2024, section 3.2) on the group's
range. For a weight W (out x in), per (row, group of `group_size` inputs), N bits:

    xmax = sigmoid(gamma) * max(group)      xmin = sigmoid(beta) * min(group)        LWC
    step = clamp((xmax - xmin) / (2^N - 1), 1e-5, 1e4)                               eq. (3)
    zero = clamp(round(-xmin / step), 0, 2^N - 1)                                    eq. (4)
    code = clamp(round_ste(W / step) + zero, 0, 2^N - 1)                             eq. (5)
    W_hat = (code - zero) * step                                                     eq. (6)

gamma = beta = None is plain round-to-nearest (RTN, clipping factors 1.0). The clamp in eq. (4)
is ours: the papers write round(-xmin / step), which leaves 0..2^N - 1 for a group whose weights
all share a sign; clamped, the zero point is an N-bit integer like the codes, as packed formats
(GPTQ's qzeros, export.py) store it. SmolLM2-135M has no such group (0 of 1,658,880 at 2, 3 and
4 bits), so there it changes nothing. The settings sheet is docs/method.md.

Pure tensor functions only: quant_params, fake_quant (differentiable, for calibration),
quantize / dequantize (integer codes for storage), pack / unpack (codes into uint8 bytes).
The module that holds the clipping logits and the LoRA factors, QuantLinear, lives in lora.py.

Example:
    python -c "import torch, quant; w = torch.randn(8, 64); print((w - quant.rtn(w, 2, 64)).norm())"
"""

import torch


def validate(bits, group_size, in_features):
    """Raise ValueError unless 1 <= bits <= 8 and group_size divides in_features."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got bits={bits!r}")
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size != 0:
        raise ValueError(f"group_size must be a positive divisor of in_features, "
                         f"got group_size={group_size!r}, in_features={in_features}")


def _groups(w, group_size):
    """(out, in) -> (out, in // group_size, group_size), float32, after checking the shape."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-d weight (out, in), got shape {tuple(w.shape)}")
    out, n_in = w.shape
    return w.float().reshape(out, n_in // group_size, group_size)  # (out, n_groups, group_size)


def round_ste(x):
    """round(x) in the forward pass, identity in the backward pass (straight-through estimator)."""
    # exact in floating point: round(x) - x is exact by Sterbenz' lemma, so x + it == round(x)
    return x + (torch.round(x) - x).detach()


def quant_params(w, bits, group_size, gamma=None, beta=None):
    """Scale and zero point, each (out, in // group_size), float32; differentiable in gamma, beta.

    The group's own max and min are used: unlike some RTN codes, 0 is not forced into the range
    (OmniQuant and ApiQ do not). A group of positive weights would get a negative zero point; the
    clamp makes it 0 (and 2^N - 1 for a negative group), so weights above (2^N - 1) * step clip.
    """
    validate(bits, group_size, w.shape[-1])
    g = _groups(w, group_size)
    xmax, xmin = g.amax(dim=-1), g.amin(dim=-1)  # (out, n_groups) each
    if gamma is not None:
        xmax = torch.sigmoid(gamma) * xmax  # LWC: learnable clipping of the upper bound
    if beta is not None:
        xmin = torch.sigmoid(beta) * xmin  # LWC: and of the lower bound
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(1e-5, 1e4)  # eq. (3): step size, (out, n_groups)
    # plain round: no gradient flows through the zero point, only through the step (official code);
    # clamped into the code range, so that it is an N-bit integer (one-signed groups; see the top)
    zero = torch.round(-xmin / scale).clamp(0, 2**bits - 1)  # eq. (4): zero point, (out, n_groups)
    return scale, zero


def _scaled(w, group_size, step, offset):
    """W / step (+ the learned rounding offset V), grouped: (out, n_groups, group_size)."""
    x = _groups(w, group_size) / step
    return x if offset is None else x + offset.float().reshape(x.shape)


def fake_quant(w, bits, group_size, gamma=None, beta=None, offset=None):
    """Quantize-dequantize W (out, in) -> W_hat of the same shape and dtype.

    Differentiable: straight-through w.r.t. w (gradient 1 where the code is not clamped, 0 where
    it is), and w.r.t. gamma and beta through the scale. The scale is a function of the group's
    max and min, so those two weights also get a gradient through s (W is frozen in ApiQ).
    offset: beyond ApiQ, a learned rounding offset V (out, in) in [-0.5, 0.5] as in AutoRound
    (SignRound, Cheng et al. 2023, eq. (2)): code = clamp(round(W / step + V) + zero); the codes
    stay N-bit integers, so the storage does not change.
    """
    scale, zero = quant_params(w, bits, group_size, gamma, beta)
    step, zp = scale.unsqueeze(-1), zero.unsqueeze(-1)  # (out, n_groups, 1)
    q = torch.clamp(round_ste(_scaled(w, group_size, step, offset)) + zp, 0, 2**bits - 1)  # eq. (5), (out, n_groups, gs)
    w_hat = (q - zp) * step  # eq. (6), (out, n_groups, group_size)
    return w_hat.reshape(w.shape).to(w.dtype)  # (out, in)


def quantize(w, bits, group_size, gamma=None, beta=None, offset=None):
    """W (out, in) -> (codes uint8 (out, in), scale, zero); no gradient.

    Same float operations as fake_quant, so dequantize(*quantize(w), group_size) == fake_quant(w)
    exactly for an fp32 w (fake_quant returns w's dtype).
    """
    with torch.no_grad():
        scale, zero = quant_params(w, bits, group_size, gamma, beta)
        step, zp = scale.unsqueeze(-1), zero.unsqueeze(-1)  # (out, n_groups, 1)
        q = torch.clamp(torch.round(_scaled(w, group_size, step, offset)) + zp, 0, 2**bits - 1)  # eq. (5), (out, n_groups, gs)
    return q.reshape(w.shape).to(torch.uint8), scale, zero  # codes (out, in)


def dequantize(codes, scale, zero, group_size):
    """Codes (out, in), per-group scale and zero (out, in // group_size) -> W_hat, float32."""
    out, n_in = codes.shape
    q = codes.float().reshape(out, n_in // group_size, group_size)  # (out, n_groups, group_size)
    w_hat = (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)  # eq. (6), (out, n_groups, group_size)
    return w_hat.reshape(out, n_in)  # (out, in)


def rtn(w, bits, group_size):
    """Round-to-nearest W_hat, eq. (3)-(6): the quantizer with no clipping."""
    return fake_quant(w, bits, group_size)


# Storage. Codes go into a little-endian bit stream: code i takes bits [i*N, (i+1)*N) of the
# stream, and stream bit k is bit (k % 8) of byte k // 8. So four 2-bit codes make one byte
# (code 0 in the low bits), two 4-bit codes make one byte, eight 3-bit codes make three bytes,
# and any shape packs into ceil(numel * N / 8) bytes.

def pack(codes, bits):
    """Codes (any shape, values < 2^bits) -> flat uint8 tensor of ceil(numel * bits / 8) bytes."""
    validate(bits, 1, 1)
    c = codes.reshape(-1).to(torch.int32)  # (numel,)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1} for bits={bits}, "
                         f"got range {c.min().item()}..{c.max().item()}")
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole codes per byte, a shift and a sum
        per = 8 // bits
        c = torch.nn.functional.pad(c, (0, -c.numel() % per))
        shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
        return (c.reshape(-1, per) << shifts).sum(-1).to(torch.uint8)  # (n_bytes,), (n_bytes, per) summed
    # 3, 5, 6, 7 bits: codes straddle bytes; go through single bits
    stream = (c.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32, device=c.device)) & 1  # (numel, bits)
    stream = torch.nn.functional.pad(stream.reshape(-1), (0, -stream.numel() % 8))  # (numel * bits + pad,)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=c.device)
    return (stream.reshape(-1, 8) * weights).sum(-1).to(torch.uint8)  # (n_bytes,)


def unpack(packed, bits, shape):
    """Inverse of pack: flat uint8 bytes -> uint8 codes of the given shape."""
    validate(bits, 1, 1)
    numel = int(torch.Size(shape).numel())
    p = packed.reshape(-1).to(torch.int32)  # (n_bytes,)
    if p.numel() * 8 < numel * bits:
        raise ValueError(f"{p.numel()} bytes cannot hold {numel} codes of {bits} bits")
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        c = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (n_bytes, per)
    else:
        stream = (p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1  # (n_bytes, 8)
        stream = stream.reshape(-1)[: numel * bits].reshape(numel, bits)  # (numel, bits)
        c = (stream << torch.arange(bits, dtype=torch.int32, device=p.device)).sum(-1)  # (numel,)
    return c.reshape(-1)[:numel].to(torch.uint8).reshape(shape)  # (numel,) -> shape
