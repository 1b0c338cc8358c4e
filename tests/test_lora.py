"""LoRA on a quantized weight (ApiQ sections 2-3): QuantLinear, and the QLoRA / LoftQ inits."""
import math

import pytest
import torch
import torch.nn as nn

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
