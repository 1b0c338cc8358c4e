"""LoRA on a quantized weight (ApiQ sections 2-3): QuantLinear, and the QLoRA / LoftQ inits."""
import math

import pytest
import torch
import torch.nn as nn

import fastpath
from fastpath import step_weights, use_qweights
from lora import QuantLinear, init_linear, loftq_init, lora_init, qlora_init, quant_linears, swap_linears
from quant import dequantize, fake_quant, rtn, unpack


def outlier_weight(out=256, n_in=512, seed=0):
    """Gaussian weights plus a few input channels 10x larger, like those of an LLM."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.02
    w[:, torch.randperm(n_in, generator=g)[:6]] *= 10
    return w


def test_lora_init_shapes_and_bound():
    A, B = lora_init(32, 256, 8)
    assert A.shape == (8, 256) and B.shape == (32, 8)
    assert torch.equal(B, torch.zeros(32, 8))
    assert A.abs().max() <= 1 / math.sqrt(256) and A.abs().max() > 0.9 / math.sqrt(256)


def test_forward_is_quantized_weight_plus_scaled_lora():
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=False)
    m = QuantLinear.from_linear(lin, bits=2, group_size=64, rank=8, lora_alpha=16)
    x = torch.randn(2, 5, 128)
    q = fake_quant(lin.weight.detach(), 2, 64, m.gamma, m.beta)
    torch.testing.assert_close(m(x), x @ q.T)  # B = 0 at init: the adapter adds nothing
    with torch.no_grad():
        m.B.normal_()
    torch.testing.assert_close(m(x), x @ (q + 2.0 * m.B @ m.A).T)  # alpha / r = 16 / 8
    torch.testing.assert_close(m.effective_weight(), q + 2.0 * m.B @ m.A)


def test_parameter_groups_are_disjoint_and_complete():
    m = QuantLinear.from_linear(nn.Linear(128, 48), bits=3, group_size=64, rank=4, lora_alpha=16)
    clip, lora = m.clip_parameters(), m.lora_parameters()
    assert [p.shape for p in clip] == [(48, 2), (48, 2)]
    assert all((p == 4.0).all() for p in clip)
    ids = lambda ps: {id(p) for p in ps}
    assert not ids(clip) & ids(lora)
    assert ids(clip) | ids(lora) == ids(p for p in m.parameters() if p.requires_grad)
    rtn_only = init_linear(nn.Linear(128, 48), "rtn", bits=3, group_size=64)
    assert rtn_only.clip_parameters() == [] and rtn_only.gamma is None and rtn_only.rank == 0


def test_gradients_reach_clipping_and_lora():
    torch.manual_seed(0)
    m = QuantLinear.from_linear(nn.Linear(128, 32, bias=False), bits=2, group_size=64, rank=8)
    with torch.no_grad():
        m.B.normal_()
    m(torch.randn(4, 128)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in m.clip_parameters() + m.lora_parameters())


def test_freeze_stores_codes_and_keeps_the_output():
    torch.manual_seed(0)
    m = QuantLinear.from_linear(nn.Linear(128, 32, bias=False), bits=2, group_size=64, rank=8)
    x = torch.randn(3, 128)
    before = m(x)
    m.freeze()
    assert m.quantized and m.gamma is None and m.clip_parameters() == [] and m.A.requires_grad
    assert m.q_cache is not None and torch.equal(m(x), before)
    m.drop_cache()                              # from the packed codes in every forward: the same
    assert m.q_cache is None and torch.equal(m(x), before)
    assert m.weight is not None                 # .weight is still W, the full-precision weight


def test_use_qweights_hands_the_step_q_to_the_forward():
    torch.manual_seed(0)
    m = QuantLinear.from_linear(nn.Linear(128, 32, bias=False), bits=2, group_size=64, rank=8)
    x = torch.randn(3, 128)
    q = torch.randn(32, 128, requires_grad=True)
    with use_qweights([m], [q]):
        y = m(x)
    torch.testing.assert_close(y, x @ q.T)
    y.sum().backward()
    assert q.grad is not None and m.q_cache is None    # the graph reaches q; nothing is left behind


def test_merged_step_where_it_saves_flops_equals_the_lora_path():
    """With no penalty a step merges W_eff = Q(W) + s B A of a linear exactly when T (in + out) >
    in out: same output and gradients (clipping, offsets, A, B) as the separate LoRA path."""
    torch.manual_seed(0)
    ms = [QuantLinear.from_linear(nn.Linear(n_in, out, bias=False), bits=2, group_size=64, rank=8,
                                  learn_rounding=True) for n_in, out in ((128, 32), (128, 512))]
    for m in ms:
        with torch.no_grad():
            m.B.normal_(0, 0.1)                        # B != 0: the LoRA path matters
            m.offset.uniform_(-0.3, 0.3)
    params = [p for m in ms for p in m.clip_parameters() + m.round_parameters() + m.lora_parameters()]
    x = torch.randn(2, 24, 128)                        # T = 48 tokens: 48 * 160 > 128 * 32, 48 * 640 < 128 * 512
    u = [torch.randn(2, 24, m.out_features) for m in ms]

    def step():
        qs, merged = step_weights(ms, None, x.shape[:-1].numel())
        with use_qweights(ms, qs, merged):
            loss = sum((m(x) * v).sum() for m, v in zip(ms, u))
        return merged, loss, torch.autograd.grad(loss, params)
    merged, loss, grads = step()
    assert merged == [True, False]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastpath, "merges", lambda *a: False)
        none, loss0, grads0 = step()
    assert none == [False, False]
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not fastpath.merges(None, ms[0], ms[0].qweight().bfloat16(), 10**6)   # never in bf16


def test_export_restores_the_quantized_weight_bit_for_bit():
    torch.manual_seed(0)
    m = QuantLinear.from_linear(nn.Linear(192, 40, bias=False), bits=3, group_size=64, rank=8)
    with torch.no_grad():
        m.gamma.uniform_(1, 5)
        m.beta.uniform_(1, 5)
    trained_q = m.qweight().detach()
    m.freeze()
    t = m.export()
    assert t["qweight"].dtype == torch.uint8 and t["qweight"].numel() == 40 * 192 * 3 // 8
    restored = dequantize(unpack(t["qweight"], 3, (40, 192)), t["scale"], t["zero"], 64)
    assert torch.equal(restored, trained_q)
    assert torch.equal(t["A"], m.A) and torch.equal(t["B"], m.B)


def test_qlora_init():
    w = outlier_weight()
    init = qlora_init(w, 2, 64, 16)
    q = dequantize(init.codes, init.scale, init.zero, 64)
    assert torch.equal(q, rtn(w, 2, 64)) and torch.equal(init.B, torch.zeros(256, 16))
    assert init.errors[0] == pytest.approx((w - q).norm().item(), rel=1e-5)


def test_loftq_weight_error_decreases_and_beats_qlora():
    w = outlier_weight()
    for bits in (2, 3):
        qlora_error = qlora_init(w, bits, 64, 64).errors[0]
        errors = loftq_init(w, bits, 64, 64, 16, iters=5).errors
        assert errors[0] < 0.75 * qlora_error  # one SVD step already removes much of W - Q
        assert errors[-1] < errors[0]
        if bits == 3:  # at 2 bits the min/max grid moves and the error can rise after ~T=3
            assert all(b <= a for a, b in zip(errors, errors[1:]))


def test_loftq_compensates_the_lora_scaling():
    w = outlier_weight(128, 256)
    rank, alpha = 16, 4  # scaling 0.25, not 1
    init = loftq_init(w, 2, 64, rank, alpha, iters=2)
    q = dequantize(init.codes, init.scale, init.zero, 64)
    u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
    svd_term = u[:, :rank] @ torch.diag(sv[:rank]) @ vh[:rank]
    torch.testing.assert_close(alpha / rank * init.B @ init.A, svd_term, atol=1e-5, rtol=1e-4)
    lowrank = loftq_init(w, 2, 64, rank, alpha, iters=2, lowrank=True)
    assert lowrank.errors[-1] == pytest.approx(init.errors[-1], rel=0.05)


def test_baseline_modules_start_where_their_inits_do():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    m = init_linear(lin, "loftq", bits=2, group_size=64, rank=8, lora_alpha=16, loftq_iters=3)
    init = loftq_init(lin.weight, 2, 64, 8, 16, iters=3)
    q = dequantize(init.codes, init.scale, init.zero, 64)
    torch.testing.assert_close(m.effective_weight(), q + 2.0 * init.B @ init.A)
    assert m.weight.data_ptr() == lin.weight.data_ptr()     # .weight is W, not the residual LoftQ quantized
    ql = init_linear(lin, "qlora", bits=2, group_size=64, rank=8)
    assert torch.equal(ql.effective_weight(), rtn(lin.weight.detach(), 2, 64))


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)


class Block(nn.Module):
    def __init__(self, dim=64, hidden=128):
        super().__init__()
        self.attention, self.feed_forward = Attention(dim), FeedForward(dim, hidden)
        self.attention_norm = nn.LayerNorm(dim)


def test_swap_linears_replaces_the_seven():
    block = Block()
    w2 = block.feed_forward.w2.weight
    swapped = swap_linears(block, lambda lin: QuantLinear.from_linear(lin, 2, 64, rank=4))
    names = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    assert sorted(swapped) == sorted(names)
    assert [n for n, _ in quant_linears(block)] == names
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert block.feed_forward.w2.weight.data_ptr() == w2.data_ptr()  # no copy of W
    assert isinstance(block.attention_norm, nn.LayerNorm)


def test_loftq_on_a_real_smollm2_layer(smollm2):
    model, _ = smollm2
    w = model.layers[0].attention.wq.weight.detach()
    qlora_error = qlora_init(w, 2, 64, 64).errors[0]
    errors = loftq_init(w, 2, 64, 64, 16, iters=5).errors
    assert errors[-1] < errors[0] < qlora_error


def test_packed_training_keeps_codes_not_a_dequantized_weight():
    """A packed QuantLinear (no cached Q(W)) training its adapters: autograd saves no (out, in)
    tensor (PackedMatmul dequantizes again in the backward), and dL/dx, dL/dA, dL/dB are those of
    the same layer with Q(W) cached."""
    torch.manual_seed(0)
    packed = init_linear(nn.Linear(128, 96, bias=False), "loftq", 2, 32, 8, loftq_iters=1)
    cached = init_linear(nn.Linear(128, 96, bias=False), "loftq", 2, 32, 8, loftq_iters=1)
    cached.load_state_dict(packed.state_dict())
    cached.cache_qweight()
    x = torch.randn(4, 128, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.shape) or t, lambda t: t):
        y = packed(x)
    assert torch.Size([96, 128]) not in sizes and torch.Size([128, 96]) not in sizes, sizes
    y.square().sum().backward()
    grads = (x.grad.clone(), packed.A.grad, packed.B.grad)
    x.grad = None
    cached(x).square().sum().backward()
    for got, want in zip(grads, (x.grad, cached.A.grad, cached.B.grad)):
        assert torch.equal(got, want)
