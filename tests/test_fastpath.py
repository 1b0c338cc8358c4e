"""fastpath.accelerate's speed devices against the plain formulas of quant.py, lora.py, calibrate.py
and saliency.py: FakeQuant (eager and compiled), the merged W_eff of a calibration step, the penalty
through WeightedDistance, PackedMatmul. Each must give the plain formula's values: bit for bit where
the arithmetic is the same, within fp32 rounding where it sums in another order."""
import pytest
import torch
import torch.nn as nn

import calibrate
import fastpath
from fastpath import FakeQuant, FastQuantLinear, WeightedDistance, accelerate
from llama import ModelArgs, Transformer
from lora import QuantLinear, init_linear, quant_linears
from quant import fake_quant, quant_params
from saliency import SaliencyPenalty

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_fused_matches_reference(w, bits, gamma, beta, offset, up, kernels=fastpath.EAGER):
    """FakeQuant's W_hat equals quant.fake_quant's bit for bit; its gradients in gamma, beta and the
    offset (for dL/dW_hat = up) equal autograd's through the reference within fp32 rounding."""
    want = fake_quant(w, bits, 64, gamma, beta, offset)
    want_grads = torch.autograd.grad((want * up).sum(), (gamma, beta, offset))
    got = FakeQuant.apply(w, gamma, beta, offset, bits, 64, kernels)
    got_grads = torch.autograd.grad((got * up).sum(), (gamma, beta, offset))
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("logit", [4.0, -1.0])        # clipping factor 0.98 (few codes clamped), 0.27 (many)
def test_fused_fake_quant_equals_the_reference(bits, logit):
    """The same W_hat bit for bit, and the gradients in gamma, beta and the rounding offset within
    fp32 rounding of autograd's through quant.fake_quant, with clamped and unclamped codes and a
    one-signed group (its zero point clamped) among them."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 256, generator=g) * 0.05
    w[3, :64] = w[3, :64].abs() + 0.01
    gamma = (logit + 0.3 * torch.randn(32, 4, generator=g)).requires_grad_()
    beta = (logit + 0.3 * torch.randn(32, 4, generator=g)).requires_grad_()
    offset = (torch.rand(32, 256, generator=g) - 0.5).requires_grad_()
    up = torch.randn(32, 256, generator=g)                                  # dL/dW_hat
    step, zero = quant_params(w, bits, 64, gamma, beta)
    c = torch.round(w.reshape(32, 4, 64) / step.unsqueeze(-1) + offset.reshape(32, 4, 64)) + zero.unsqueeze(-1)
    clamped = ((c < 0) | (c > 2**bits - 1)).float().mean().item()
    assert 0 < clamped < 1 and zero[3, 0] == 0                              # both kinds of codes are tested
    assert_fused_matches_reference(w, bits, gamma, beta, offset, up)


def test_compiled_quantizer_equals_the_reference():
    """accelerate(..., compile=True)'s kernels: the same W_hat, gradients within fp32 rounding
    (inductor sums in another order), at 2 and 3 bits with clamped codes."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=g) * 0.05
    kernels = fastpath.compiled_kernels()
    for bits in (2, 3):
        gamma = (-1 + 0.3 * torch.randn(64, 2, generator=g)).requires_grad_()
        beta = (2 + 0.3 * torch.randn(64, 2, generator=g)).requires_grad_()
        offset = (torch.rand(64, 128, generator=g) - 0.5).requires_grad_()
        assert_fused_matches_reference(w, bits, gamma, beta, offset, torch.randn(64, 128, generator=g), kernels)
    assert not kernels.forward.fell_back and not kernels.backward.fell_back   # compiled, not the eager fallback


def calibrating(n_in=128, out=48, seed=0):
    torch.manual_seed(seed)
    m = QuantLinear.from_linear(nn.Linear(n_in, out, bias=False), bits=2, group_size=64, rank=8, learn_rounding=True)
    with torch.no_grad():
        m.B.normal_(0, 0.1)                        # B != 0: the LoRA path matters
        m.offset.uniform_(-0.3, 0.3)
    return m


def params_of(m):
    return m.clip_parameters() + m.round_parameters() + m.lora_parameters()


def test_accelerate_swaps_the_linears_and_keeps_their_tensors():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=96))
    block = calibrate.quant_block(model.layers[0], calibrate.make_config(bits=2, group_size=32, rank=4), 0)
    before = dict(quant_linears(block))
    fast = accelerate(block).module
    after = dict(quant_linears(fast))
    assert after.keys() == before.keys() and all(type(m) is FastQuantLinear for m in after.values())
    for n, m in after.items():                      # the same parameters and buffers, not copies
        assert m.A is before[n].A and m.gamma is before[n].gamma and m.weight is before[n].weight
    assert type(model.layers[0].attention.wq) is nn.Linear    # the fp block untouched


def test_fast_linear_calibrates_like_the_plain_one():
    """A calibration step through FastQuantLinear (FakeQuant; W_eff merged where it saves flops)
    against lora.QuantLinear's formula: Q(W) bit for bit; output and gradients within fp32 rounding.
    T = 48 tokens: 48 * (128 + 32) > 128 * 32 merges, 48 * (128 + 512) < 128 * 512 does not."""
    for out, merges in ((32, True), (512, False)):
        plain = calibrating(out=out)
        fast = accelerate(calibrating(out=out)).module
        x = torch.randn(2, 24, 128)
        up = torch.randn(2, 24, out)
        assert fast.merges(fast.qweight(), 48) == merges and not fast.merges(fast.qweight().bfloat16(), 10**6)
        assert torch.equal(fast.qweight(), plain.qweight())
        y_fast, y_plain = fast(x), plain(x)
        g_fast = torch.autograd.grad((y_fast * up).sum(), params_of(fast))
        g_plain = torch.autograd.grad((y_plain * up).sum(), params_of(plain))
        torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_fast, g_plain):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("variant,weighted", [("after", True), ("before", True), ("after", False)])
def test_written_out_gradients_equal_autograd(variant, weighted):
    """WeightedDistance's hand-written backward against autograd through the plain formula."""
    g = torch.Generator().manual_seed(3)
    w, alpha = torch.randn(48, 32, generator=g), torch.rand(48, 32, generator=g) if weighted else None
    q, B, A = (torch.randn(*s, generator=g).requires_grad_() for s in ((48, 32), (48, 8), (8, 32)))
    lora = (B, A, 0.7) if variant == "after" else (None, None, 0.0)
    got = WeightedDistance.apply(w, q, alpha, *lora)
    w_eff = q + 0.7 * B @ A if variant == "after" else q
    want = ((1 if alpha is None else alpha) * (w - w_eff) ** 2).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    params = [q, B, A] if variant == "after" else [q]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):                     # inside a bf16 context: still fp32
        torch.testing.assert_close(WeightedDistance.apply(w, q, alpha, *lora), got, rtol=1e-6, atol=0)


@pytest.mark.parametrize("objective", ["bw", "lw"])
@pytest.mark.parametrize("variant", ["after", "before"])
def test_accelerated_objective_equals_the_plain_one(objective, variant):
    """eq. (1) + eq. (2) on a block: accelerated (the step's W_eff merged for AfterLoRA, handed to the
    penalty, WeightedDistance) against the plain objective: loss and every gradient within fp32
    rounding."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=96))
    model.requires_grad_(False)
    cfg = calibrate.make_config(bits=2, group_size=32, rank=4)
    fp = model.layers[0]
    xq = torch.randn(2, 16, 64)                                                # (B, T, dim)
    freqs = model.freqs_cis(16, "cpu")
    y = calibrate.run_block(fp, xq, freqs, "cpu")
    results = []
    for fast in (False, True):
        qb = calibrate.quant_block(fp, cfg, 0)
        for _, m in quant_linears(qb):
            with torch.no_grad():
                m.B.normal_(0, 0.05)
        pen = SaliencyPenalty(None, 3.0, 1.0, variant)                          # alpha_i = 1
        if fast:
            qb, pen, _ = accelerate(qb, pen)
        linears = dict(quant_linears(qb))
        params = [p for m in linears.values() for p in m.clip_parameters() + m.lora_parameters()]
        for p in params:
            p.requires_grad_(True)
        name, lin = next(iter(linears.items()))
        if objective == "bw":
            loss, parts = calibrate.bw_objective(qb, xq, y, freqs, None, pen, 0)
        else:
            loss, parts = calibrate.lw_objective(name, lin, xq, xq, lin.weight, pen, 0)
        assert parts["pen"] > 0.01 * parts["mse"]                               # the penalty weighs in
        results.append((loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    used = [(a, b) for a, b in zip(g1, g0) if b is not None]
    assert len(used) >= 2 and all(a is not None for a, _ in used)
    for a, b in used:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_packed_training_keeps_codes_not_a_dequantized_weight():
    """A packed, accelerated QuantLinear (no cached Q(W)) training its adapters: autograd saves no
    (out, in) tensor (PackedMatmul dequantizes again in the backward), and dL/dx, dL/dA, dL/dB are
    bit for bit those of the plain layer with Q(W) cached."""
    torch.manual_seed(0)
    packed = accelerate(init_linear(nn.Linear(128, 96), "loftq", 2, 32, 8, loftq_iters=1)).module
    cached = init_linear(nn.Linear(128, 96), "loftq", 2, 32, 8, loftq_iters=1)
    cached.load_state_dict(packed.state_dict())
    cached.cache_qweight()
    x = torch.randn(4, 128, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.shape) or t, lambda t: t):
        y = packed(x)
    assert torch.Size([96, 128]) not in sizes and torch.Size([128, 96]) not in sizes, sizes
    grads = [y, *torch.autograd.grad(y.square().sum(), (x, packed.A, packed.B))]
    y = cached(x)
    for got, want in zip(grads, [y, *torch.autograd.grad(y.square().sum(), (x, cached.A, cached.B))]):
        assert torch.equal(got, want)


def test_a_step_weight_is_used_only_by_the_penalty_of_its_own_step():
    """The forward of a calibration step hands its W_eff to the penalty of the same step only: after
    an optimizer step (the parameters changed), or taken once already, there is none."""
    fast = accelerate(calibrating(out=32), SaliencyPenalty(None, 1.0, 1.0, "after")).module
    fast(torch.randn(2, 24, 128))
    w, merged = fast.take_step()
    assert merged and w.shape == (32, 128) and fast.take_step() is None      # once
    fast(torch.randn(2, 24, 128))
    with torch.no_grad():
        fast.A.add_(1e-3)                                                    # as AdamW's step does, in place
    assert fast.take_step() is None
