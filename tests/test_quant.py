"""The quantizer of docs/method.md §1 on hand-computed groups, its STE gradients, and storage."""
import pytest
import torch

from quant import dequantize, fake_quant, pack, quant_params, quantize, rtn, unpack

# 2-bit, group_size 4, RTN (levels 0..3), two groups in one row:
#   group 1 [-0.6, 0.1, 0.35, 0.9]: s = (0.9 + 0.6) / 3 = 0.5, z = round(0.6 / 0.5 = 1.2) = 1
#     W/s = [-1.2, 0.2, 0.7, 1.8] -> round [-1, 0, 1, 2] -> +z codes [0, 1, 2, 3]
#     W_hat = (codes - 1) * 0.5 = [-0.5, 0, 0.5, 1.0]
#   group 2 [0.2, 0.5, 0.8, 1.1], all positive (0 is not put into the range):
#     s = (1.1 - 0.2) / 3 = 0.3, z = round(-0.2 / 0.3 = -0.67) = -1, clamped into 0..3: z = 0
#     W/s = [0.67, 1.67, 2.67, 3.67] -> round [1, 2, 3, 4] -> +z, clamp: codes [1, 2, 3, 3]
#     W_hat = codes * 0.3 = [0.3, 0.6, 0.9, 0.9]   (unclamped z = -1 would give 1.2 for the last)
W2 = torch.tensor([[-0.6, 0.1, 0.35, 0.9, 0.2, 0.5, 0.8, 1.1]])

# 3-bit, one group of 8 (levels 0..7):
#   s = (0.8 + 0.6) / 7 = 0.2, z = round(0.6 / 0.2) = 3
#   W/s = [-3, -2.35, -0.65, 0.25, 0.45, 2.1, 4, 3.75] -> round [-3, -2, -1, 0, 0, 2, 4, 4]
#   +z = [0, 1, 2, 3, 3, 5, 7, 7];  W_hat = (codes - 3) * 0.2
W3 = torch.tensor([[-0.6, -0.47, -0.13, 0.05, 0.09, 0.42, 0.8, 0.75]])


def test_rtn_2bit_by_hand():
    codes, scale, zero = quantize(W2, 2, 4)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[0, 1, 2, 3, 1, 2, 3, 3]]
    torch.testing.assert_close(scale, torch.tensor([[0.5, 0.3]]))
    assert zero.tolist() == [[1.0, 0.0]]
    expected = torch.tensor([[-0.5, 0.0, 0.5, 1.0, 0.3, 0.6, 0.9, 0.9]])
    torch.testing.assert_close(fake_quant(W2, 2, 4), expected)
    torch.testing.assert_close(rtn(W2, 2, 4), expected)


def test_rtn_3bit_by_hand():
    codes, scale, zero = quantize(W3, 3, 8)
    assert codes.tolist() == [[0, 1, 2, 3, 3, 5, 7, 7]]
    torch.testing.assert_close(scale, torch.tensor([[0.2]]))
    assert zero.tolist() == [[3.0]]
    expected = torch.tensor([[-0.6, -0.4, -0.2, 0.0, 0.0, 0.4, 0.8, 0.8]])
    torch.testing.assert_close(fake_quant(W3, 3, 8), expected)


def test_clipping_halves_the_range():
    # gamma = beta = 0: sigmoid = 0.5, group 1 of W2 clipped to [-0.3, 0.45]
    #   s = 0.75 / 3 = 0.25, z = round(0.3 / 0.25 = 1.2) = 1
    #   W/s = [-2.4, 0.4, 1.4, 3.6] -> round [-2, 0, 1, 4] -> +z [-1, 1, 2, 5] -> clamp [0, 1, 2, 3]
    #   W_hat = (codes - 1) * 0.25 = [-0.25, 0, 0.25, 0.5]
    w, zero_logit = W2[:, :4], torch.zeros(1, 1)
    scale, zero = quant_params(w, 2, 4, zero_logit, zero_logit)
    torch.testing.assert_close(scale, torch.tensor([[0.25]]))
    assert zero.tolist() == [[1.0]]
    torch.testing.assert_close(fake_quant(w, 2, 4, zero_logit, zero_logit),
                               torch.tensor([[-0.25, 0.0, 0.25, 0.5]]))
    # the init of docs/method.md §1, 4.0, barely clips: sigmoid(4) = 0.982
    four = torch.full((1, 2), 4.0)
    s4, _ = quant_params(W2, 2, 4, four, four)
    torch.testing.assert_close(s4, torch.sigmoid(torch.tensor(4.0)) * torch.tensor([[0.5, 0.3]]))


def test_ste_gradients_by_hand():
    # 2-bit, one group of 8, gamma = beta = 0: range [-0.3, 0.45], s = 0.25, z = 1
    #   W/s   = [-2.4, -2, 0.4, 1.4, 3.6, 3.2, 0, 0.8]
    #   codes = clamp([-1, -1, 1, 2, 5, 4, 1, 2], 0, 3) = [0, 0, 1, 2, 3, 3, 1, 2]
    # L = sum(W_hat). Not clamped (2, 3, 6, 7): dW_hat/dw = 1 (STE). Clamped: 0 -- except the
    # group min (0) and max (4), which also move s: dL/ds * ds/dmin, dL/ds * ds/dmax.
    #   dL/ds = sum_unclamped (code - z - w/s) + sum_clamped (code - z)
    #         = (-0.4 - 0.4 + 0 + 0.2) + (-1 - 1 + 2 + 2) = 1.4      (no gradient through z)
    #   ds/dmax = 0.5/3, ds/dmin = -0.5/3
    #   ds/dgamma = sigmoid'(0) max / 3 = 0.25 * 0.9 / 3 = 0.075 -> dL/dgamma = 0.105
    #   ds/dbeta = -sigmoid'(0) min / 3 = 0.25 * 0.6 / 3 = 0.05  -> dL/dbeta  = 0.07
    w = torch.tensor([[-0.6, -0.5, 0.1, 0.35, 0.9, 0.8, 0.0, 0.2]], requires_grad=True)
    gamma = torch.zeros(1, 1, requires_grad=True)
    beta = torch.zeros(1, 1, requires_grad=True)
    w_hat = fake_quant(w, 2, 8, gamma, beta)
    torch.testing.assert_close(w_hat, torch.tensor([[-0.25, -0.25, 0, 0.25, 0.5, 0.5, 0, 0.25]]))
    w_hat.sum().backward()
    through_s = 1.4 * 0.5 / 3
    torch.testing.assert_close(w.grad, torch.tensor([[-through_s, 0, 1, 1, through_s, 0, 1, 1]]))
    torch.testing.assert_close(gamma.grad, torch.tensor([[0.105]]))
    torch.testing.assert_close(beta.grad, torch.tensor([[0.07]]))


def test_ste_is_identity_inside_the_range():
    # for weights that are neither clamped nor a group max/min, d W_hat / d w is exactly 1
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    inner = w.clone().requires_grad_(True)
    fake_quant(torch.where(w.abs() < 1, inner, w), 4, 64).sum().backward()
    assert torch.equal(inner.grad, (w.abs() < 1).float())


def test_gradients_reach_every_clipping_logit():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    gamma = torch.full((8, 2), 4.0, requires_grad=True)
    beta = torch.full((8, 2), 4.0, requires_grad=True)
    ((fake_quant(w, 2, 64, gamma, beta) - w) ** 2).sum().backward()
    assert (gamma.grad != 0).all() and (beta.grad != 0).all()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (2, 64)])
def test_pack_unpack_roundtrip(bits, shape):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-codes.numel() * bits // 8)  # ceil(numel * bits / 8) bytes
    assert torch.equal(unpack(packed, bits, shape), codes)


def test_pack_layout():
    # 2-bit: code 0 in the low bits: 1 | 2 << 2 | 3 << 4 | 0 << 6 = 57; 10 codes -> 3 bytes
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [57]
    assert pack(torch.zeros(10, dtype=torch.uint8), 2).numel() == 3
    assert pack(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    # 3-bit: a bit stream, 5 | 3 << 3 = 29; 8 codes -> 3 bytes
    assert pack(torch.tensor([5, 3]), 3).tolist() == [29]
    assert pack(torch.full((8,), 7), 3).tolist() == [255, 255, 255]
    assert torch.equal(pack(torch.arange(256), 8), torch.arange(256).to(torch.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_stored_weight_equals_fake_quant_bit_for_bit(bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 192) * 0.05
    gamma, beta = torch.randn(24, 3) + 3, torch.randn(24, 3) + 3
    codes, scale, zero = quantize(w, bits, 64, gamma, beta)
    restored = dequantize(unpack(pack(codes, bits), bits, w.shape), scale, zero, 64)
    assert torch.equal(restored, fake_quant(w, bits, 64, gamma, beta))
    assert torch.equal(dequantize(*quantize(w, bits, 32), 32), rtn(w, bits, 32))


@pytest.mark.parametrize("bits, group_size",
                         [(0, 64), (9, 64), (2, 0), (2, -64), (2, 48), (2.0, 64)])
def test_bad_settings_raise(bits, group_size):
    with pytest.raises(ValueError, match="bits|group_size"):
        fake_quant(torch.randn(4, 128), bits, group_size)


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="0..3"):
        pack(torch.tensor([0, 4]), 2)
