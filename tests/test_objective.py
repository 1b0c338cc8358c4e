"""calibrate.bw_objective and lw_objective against ApiQ eq. (1) and Cao & Aref eq. (2), written out
here with plain torch on a tiny block: the quantizer (LWC, STE), the LoRA path, the mean squares and
the penalty; the loss, its parts and the gradients in gamma, beta, A, B must match.

    loss_bw = mean((Y - F_q(X^q))^2) [+ mean((Y_aug - F_q(X^q))^2)] [+ lambda_l sum alpha_i (w_i - W_eff,i)^2]
    loss_lw = mean((X W^T - X^q (Q + s B A)^T)^2) [+ the same penalty over one linear]
    lambda_l = lambda * multiplier^l;  W_eff = Q(W) + s B A ("after") or Q(W) ("before")
"""
import pytest
import torch
from safetensors.torch import save_file
from torch.func import functional_call

import calibrate
from llama import LINEARS, ModelArgs, TransformerBlock, precompute_freqs_cis
from lora import QuantLinear, quant_linears
from saliency import SaliencyPenalty

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=128, max_seq_len=128)
BITS, GS, RANK, LORA_ALPHA = 2, 32, 8, 16.0          # every linear has 2 or 4 groups; s = 16 / 8 = 2
EPS = torch.finfo(torch.float32).eps                 # 1.19e-7
# The two sides compute the same numbers in a different order (x Q^T + s (x A^T) B^T against
# x (Q + s B A)^T, a fused quantizer against the formula): fp32 rounding errors, which add up over a
# dot product of length K <= 128 to ~sqrt(K) eps relative; the loss squares residuals whose RMS is
# >= 10% of Y's (asserted below), which amplifies a relative error in the outputs by <= 10.
RTOL = 10 * 128**0.5 * EPS                           # 1.35e-5


def ref_fake_quant(w, gamma, beta, bits=BITS, gs=GS):
    """quant.py's eq. (3)-(6) with LWC and the straight-through round, written out again."""
    qmax = 2**bits - 1
    g = w.reshape(w.shape[0], -1, gs)                                          # (out, n_groups, gs)
    xmax = torch.sigmoid(gamma)[..., None] * g.amax(-1, keepdim=True)          # (out, n_groups, 1)
    xmin = torch.sigmoid(beta)[..., None] * g.amin(-1, keepdim=True)
    step = ((xmax - xmin) / qmax).clamp(1e-5, 1e4)                             # eq. (3)
    zero = torch.round(-xmin / step).clamp(0, qmax)                            # eq. (4), round: no gradient
    u = g / step
    code = torch.clamp(u + (torch.round(u) - u).detach() + zero, 0, qmax)     # eq. (5), STE
    return ((code - zero) * step).reshape(w.shape)                             # eq. (6)


def ref_weights(fp, linears):
    """{name: (W, Q(W), W_eff = Q(W) + s B A)}: W from the fp block, gamma, beta, A, B from each
    QuantLinear."""
    out = {}
    for name, m in linears.items():
        w = fp.get_submodule(name).weight
        q = ref_fake_quant(w, m.gamma, m.beta)
        out[name] = (w, q, q + (LORA_ALPHA / RANK) * m.B @ m.A)
    return out


def ref_penalty(weights, alphas, lam, multiplier, variant, l):
    """lambda * multiplier^l * sum over the linears of sum_i alpha_i (w_i - W_eff,i)^2, eq. (2)."""
    total = 0.0
    for name, (w, q, w_eff) in weights.items():
        diff = w - (w_eff if variant == "after" else q)
        total = total + ((1.0 if alphas is None else alphas[name]) * diff**2).sum()
    return lam * multiplier**l * total


def tiny_qblock(seed=0):
    """(fp block, its quantized copy with gamma, beta, A and B all moved from their init)."""
    torch.manual_seed(seed)
    fp = TransformerBlock(ARGS)
    for p in fp.parameters():                         # norms away from 1: they scale what each linear sees
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    fp.attention.wq.weight.data[:4, :GS].abs_().add_(0.1)          # groups of one sign: eq. (4)'s zero
    fp.feed_forward.w2.weight.data[:4, GS:2 * GS].abs_().add_(0.1).neg_()   # point clamps to 0, to 2^N - 1
    fp.requires_grad_(False)
    cfg = calibrate.make_config(bits=BITS, group_size=GS, rank=RANK, lora_alpha=LORA_ALPHA)
    qb = calibrate.quant_block(fp, cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for _, m in quant_linears(qb):
        m.gamma.data = 1.0 + torch.randn(m.gamma.shape, generator=g)             # sigmoid ~ 0.5..0.9: clipping bites
        m.beta.data = 1.0 + torch.randn(m.beta.shape, generator=g)
        m.A.data += 0.05 * torch.randn(m.A.shape, generator=g)
        m.B.data = 0.05 * torch.randn(m.B.shape, generator=g)                    # B = 0 at init: s B A would vanish
    return fp, qb


def params_of(linears):
    return [p for m in linears.values() for p in (m.gamma, m.beta, m.A, m.B)]


def assert_grads_close(got, want):
    """Each parameter's gradient within RTOL of the reference in norm (elementwise, a gradient near 0
    has no relative precision)."""
    for a, b in zip(got, want):
        assert a is not None and b.norm() > 0
        assert (a - b).norm() <= RTOL * b.norm(), ((a - b).norm().item(), b.norm().item())


def write_saliency(path, l, linears, seed=5):
    """A saliency directory's block file for block l: one positive alpha per linear name (runs.py's
    format), spread over 4 orders of magnitude as real alphas are."""
    g = torch.Generator().manual_seed(seed)
    alphas = {name: 10 ** (4 * torch.rand(m.weight.shape, generator=g) - 2) for name, m in linears.items()}
    save_file(alphas, str(path / f"block_{l:03d}.safetensors"))
    return alphas


# (case id, y_aug, penalty kind, variant, lambda, multiplier, block l)
CASES = [
    ("mse", False, None, None, 0.0, 1.0, 0),
    ("aug", True, None, None, 0.0, 1.0, 0),
    ("naive-after", True, "naive", "after", 5e-2, 1.0, 0),
    ("naive-before", False, "naive", "before", 5e-2, 1.0, 0),
    ("saliency-after-l2", True, "alpha", "after", 2e-3, 1.5, 2),
    ("saliency-before-l3", False, "alpha", "before", 1e-2, 0.7, 3),
]


def make_penalty(kind, variant, lam, multiplier, l, linears, tmp_path):
    if kind is None:
        return None, None
    if kind == "naive":
        return SaliencyPenalty(None, lam, multiplier, variant), None
    alphas = write_saliency(tmp_path, l, linears)
    return SaliencyPenalty(str(tmp_path), lam, multiplier, variant), alphas


@pytest.mark.parametrize("T", [8, 48], ids=["T8", "T48"])   # 16 tokens: the LoRA path; 96: W_eff merged
@pytest.mark.parametrize("case,aug,kind,variant,lam,multiplier,l", CASES, ids=[c[0] for c in CASES])
def test_bw_objective_is_eq_1_plus_eq_2(tmp_path, T, case, aug, kind, variant, lam, multiplier, l):
    fp, qb = tiny_qblock()
    linears = dict(quant_linears(qb))
    assert sorted(linears) == sorted(LINEARS)
    g = torch.Generator().manual_seed(7)
    x, xq = torch.randn(2, T, ARGS.dim, generator=g), torch.randn(2, T, ARGS.dim, generator=g)   # (B, T, dim)
    freqs = precompute_freqs_cis(ARGS.head_dim, T, ARGS.rope_theta)
    with torch.no_grad():
        y = fp(x, freqs)                                                   # Y = F(W, X)
        y_aug = fp(xq, freqs) if aug else None                             # F(W, X^q)
    penalty, alphas = make_penalty(kind, variant, lam, multiplier, l, linears, tmp_path)

    loss, parts = calibrate.bw_objective(qb, xq, y, freqs, y_aug, penalty, l)

    # the reference: the fp block run with each linear's weight replaced by W_eff = Q(W) + s B A
    weights = ref_weights(fp, linears)
    out = functional_call(fp, {f"{n}.weight": w_eff for n, (_, _, w_eff) in weights.items()}, (xq, freqs))
    mse = ((y - out) ** 2).mean()                                          # eq. (1)
    if aug:
        mse = mse + ((y_aug - out) ** 2).mean()
    pen = ref_penalty(weights, alphas, lam, multiplier, variant, l) if penalty else torch.zeros(())
    want = mse + pen
    assert ((y - out) ** 2).mean() > 0.01 * (y**2).mean()                   # the residual is not small
    if penalty:
        assert 0.05 < (pen / mse).item() < 20, (pen.item(), mse.item())     # both terms count
    assert loss.item() == pytest.approx(want.item(), rel=RTOL)
    assert parts["mse"] == pytest.approx(mse.item(), rel=RTOL)
    if penalty:
        assert parts["pen"] == pytest.approx(pen.item(), rel=RTOL)

    params = params_of(linears)
    assert_grads_close(torch.autograd.grad(loss, params), torch.autograd.grad(want, params))


@pytest.mark.parametrize("case,aug,kind,variant,lam,multiplier,l", [c for c in CASES if c[0] != "aug"],
                         ids=[c[0] for c in CASES if c[0] != "aug"])
@pytest.mark.parametrize("name", ["attention.wk", "feed_forward.w2"])   # out < in, and out > in
def test_lw_objective_is_the_linear_error_plus_eq_2(tmp_path, name, case, aug, kind, variant, lam, multiplier, l):
    fp, qb = tiny_qblock()
    lin = qb.get_submodule(name)
    assert isinstance(lin, QuantLinear)
    w = fp.get_submodule(name).weight
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 48, lin.in_features, generator=g)                   # (B, T, in): input in the fp block
    xq = x + 0.3 * torch.randn(x.shape, generator=g)                       # and in the quantized one
    penalty, alphas = make_penalty(kind, variant, lam, multiplier, l, {name: lin}, tmp_path)

    loss, parts = calibrate.lw_objective(name, lin, x, xq, w, penalty, l)

    weights = ref_weights(fp, {name: lin})
    _, _, w_eff = weights[name]
    mse = ((x @ w.T - xq @ w_eff.T) ** 2).mean()
    assert mse > 0.01 * ((x @ w.T) ** 2).mean()                              # the residual is not small
    pen = ref_penalty(weights, alphas, lam, multiplier, variant, l) if penalty else torch.zeros(())
    want = mse + pen
    if penalty:
        assert 0.05 < (pen / mse).item() < 20, (pen.item(), mse.item())
    assert loss.item() == pytest.approx(want.item(), rel=RTOL)
    assert parts["mse"] == pytest.approx(mse.item(), rel=RTOL)
    params = [lin.gamma, lin.beta, lin.A, lin.B]
    assert_grads_close(torch.autograd.grad(loss, params), torch.autograd.grad(want, params))


def test_before_variant_gives_the_lora_factors_no_penalty_gradient(tmp_path):
    """BeforeLoRA: W_eff = Q(W), so d(penalty)/dA = d(penalty)/dB = 0 and the penalty's gradient
    reaches gamma, beta only; the difference of two objectives is the penalty alone."""
    fp, qb = tiny_qblock()
    linears = dict(quant_linears(qb))
    g = torch.Generator().manual_seed(9)
    xq = torch.randn(2, 8, ARGS.dim, generator=g)
    freqs = precompute_freqs_cis(ARGS.head_dim, 8, ARGS.rope_theta)
    with torch.no_grad():
        y = fp(torch.randn(2, 8, ARGS.dim, generator=g), freqs)
    plain, _ = calibrate.bw_objective(qb, xq, y, freqs)
    with_pen, _ = calibrate.bw_objective(qb, xq, y, freqs, None, SaliencyPenalty(None, 1e-3, 1.0, "before"), 0)
    lora = [p for m in linears.values() for p in (m.A, m.B)]
    clip = [p for m in linears.values() for p in (m.gamma, m.beta)]
    for a, b in zip(torch.autograd.grad(with_pen, lora, retain_graph=True), torch.autograd.grad(plain, lora,
                                                                                              retain_graph=True)):
        assert (a - b).norm() <= RTOL * b.norm()
    pen = ref_penalty(ref_weights(fp, linears), None, 1e-3, 1.0, "before", 0)
    gp = torch.autograd.grad(pen, clip)
    for a, b, c in zip(torch.autograd.grad(with_pen, clip), torch.autograd.grad(plain, clip), gp):
        assert c.norm() > 0 and (a - b - c).norm() <= RTOL * (b.norm() + c.norm())
