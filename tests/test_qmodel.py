"""qmodel.py: whole-model data-free inits and the saved format on the real SmolLM2-135M."""
import copy

import pytest
import torch

from lora import quant_linears
from qmodel import load, quantize_model, save_quantized


@pytest.fixture(scope="module")
def saved(smollm2, tmp_path_factory):
    """A 2-bit g64 QLoRA SmolLM2 with a random (non-zero) B, as after calibration, saved."""
    model, tok = smollm2
    q = quantize_model(copy.deepcopy(model), "qlora", bits=2, group_size=64, rank=8)
    torch.manual_seed(0)
    for _, m in quant_linears(q):
        m.B.data.normal_(0, 0.01)
    out = tmp_path_factory.mktemp("q") / "smollm2-loftq-w2"
    save_quantized(q, tok, out, {"method": "loftq"})
    return q, out


def test_saved_model_gives_identical_logits(saved):
    q, out = saved
    loaded, tok = load(str(out))
    x = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert len(list(quant_linears(loaded))) == 7 * 30
    # a loaded model knows Q(W) (codes, scale, zero), not W
    assert all(m.weight is None and m.quantized for _, m in quant_linears(loaded))
    packed, _ = load(str(out), cache=False)            # dequantizing in every forward: the same logits
    assert all(m.q_cache is None and m.codes.dtype == torch.uint8 for _, m in quant_linears(packed))
    with torch.no_grad():
        assert torch.equal(packed(x), q(x))
    # in bf16 (a GPU's finetuning dtype) the cache holds 2 bytes a weight, and the same values
    cached16, _ = load(str(out), dtype=torch.bfloat16)
    packed16, _ = load(str(out), dtype=torch.bfloat16, cache=False)
    assert all(m.q_cache.dtype == torch.bfloat16 for _, m in quant_linears(cached16))
    with torch.no_grad():
        assert torch.equal(cached16(x[:, :16]), packed16(x[:, :16]))


def test_rtn_model_equals_an_independent_rtn(smollm2):
    """Q(W) of every linear equals RTN computed here by hand: per 64-column group,
    s = (max - min) / 3, z = round(-min / s), W_hat = (clamp(round(W / s) + z, 0, 3) - z) * s."""
    model, _ = smollm2
    q = quantize_model(copy.deepcopy(model), "rtn", bits=2, group_size=64)
    for i in (0, 29):
        w = model.layers[i].feed_forward.w2.weight
        g = w.reshape(w.shape[0], -1, 64)
        s = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 3).clamp(1e-5, 1e4)
        z = torch.round(-g.amin(-1, keepdim=True) / s)
        w_hat = ((torch.clamp(torch.round(g / s) + z, 0, 3) - z) * s).reshape(w.shape)
        assert torch.allclose(q.layers[i].feed_forward.w2.qweight(), w_hat, atol=1e-6)


def test_two_bit_directory_size(smollm2, tmp_path):
    """RTN w2 g64 (no adapter): packed codes + fp32 scales + int8 zeros + fp16 embeddings/norms
    must be <= 35% of the model's fp16 size."""
    model, tok = smollm2
    q = quantize_model(copy.deepcopy(model), "rtn", bits=2, group_size=64)
    save_quantized(q, tok, tmp_path / "rtn", {"method": "rtn"})
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # tied embedding counted once
    size = (tmp_path / "rtn" / "model.safetensors").stat().st_size
    assert size <= 0.35 * fp16_bytes, (size, fp16_bytes)
