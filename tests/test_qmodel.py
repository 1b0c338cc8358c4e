"""qmodel.py: whole-model data-free inits and the saved format on the real SmolLM2-135M."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora import quant_linears
from qmodel import load, quantize_model, save_quantized

ROOT = Path(__file__).resolve().parents[1]


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


def run_cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


def test_bad_quantized_inputs_fail_with_one_line(saved, tmp_path):
    _, out = saved
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in out.iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    data = (out / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    other = tmp_path / "other"  # the tensors of this model under the config of a wider one
    other.mkdir()
    for f in out.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "apiq.json").read_text())
    cfg["model_args"]["hidden_dim"] = 1024
    (other / "apiq.json").write_text(json.dumps(cfg))
    cases = [(["evaluate.py", "--ckpt", str(trunc), "--ppl", ""], "truncated or corrupt"),
             (["evaluate.py", "--ckpt", str(other), "--ppl", ""], "made for another model"),
             (["calibrate.py", "--method", "rtn", "--bits", "9", "--out", str(tmp_path / "o")], "bits must be an integer in 1..8"),
             (["calibrate.py", "--method", "rtn", "--bits", "0", "--out", str(tmp_path / "o")], "bits must be an integer in 1..8"),
             (["calibrate.py", "--method", "rtn", "--group-size", "100", "--out", str(tmp_path / "o")], "does not divide"),
             (["calibrate.py", "--ckpt", str(out), "--method", "rtn", "--out", str(tmp_path / "o")], "already quantized"),
             (["evaluate.py", "--ckpt", str(tmp_path), "--ppl", ""], "not a checkpoint")]
    unfinished = tmp_path / "unfinished"     # a calibration that was stopped: progress.json, no apiq.json
    unfinished.mkdir()
    (unfinished / "progress.json").write_text("{}")
    cases.append((["evaluate.py", "--ckpt", str(unfinished), "--ppl", ""], "unfinished calibration"))
    for args, words in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
