"""calibrate.py: ApiQ-bw beats the QLoRA and LoftQ inits on a block's output, a killed run resumes
to the identical result, and a real SmolLM2 block calibrates."""
import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import calibrate
from lora import init_linear, swap_linears
from llama import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]


def args(**kw):
    return calibrate.make_config(**(dict(bits=2, group_size=32, rank=8, epochs=10) | kw))


def block_error(block, X, Y, freqs):
    return calibrate.block_mse(block, X, Y, freqs, "cpu")


@pytest.mark.parametrize("method", ["bw", "lw"])
def test_apiq_block_error_far_below_qlora_and_loftq(method):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128))
    model.requires_grad_(False)
    fp = model.layers[0]
    X = torch.randn(8, 32, 64)                                            # (n, T, dim)
    freqs = model.freqs_cis(32, "cpu")
    Y = calibrate.run_block(fp, X, freqs, "cpu")
    qlora = copy.deepcopy(fp)
    swap_linears(qlora, lambda lin: init_linear(lin, "qlora", 2, 32, 8))
    loftq = copy.deepcopy(fp)
    swap_linears(loftq, lambda lin: init_linear(lin, "loftq", 2, 32, 8, loftq_iters=5))
    a = args(method=method, epochs=20 if method == "bw" else 10, lr_clip=1e-2, lr_lora=2e-3)
    apiq, _ = calibrate.calibrate_block(0, fp, calibrate.Acts(X, X, Y, None), freqs, a)
    errs = {name: block_error(b, X, Y, freqs) for name, b in [("qlora", qlora), ("loftq", loftq), ("apiq", apiq)]}
    assert errs["loftq"] < errs["qlora"], errs
    # bw trains the whole block against its output; lw only each linear against its own output
    assert errs["apiq"] < (0.5 if method == "bw" else 1.0) * errs["loftq"], errs


def test_nan_loss_retries_then_stops_with_a_clear_message():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=256, hidden_dim=128))
    model.requires_grad_(False)
    X = torch.randn(2, 8, 64)
    Y = torch.full_like(X, float("nan"))
    freqs = model.freqs_cis(8, "cpu")
    with pytest.raises(FloatingPointError, match="block 3: the loss became NaN/inf twice"):
        calibrate.calibrate_block(3, model.layers[0], calibrate.Acts(X, X, Y, None), freqs, args(epochs=1))


def test_real_smollm2_first_blocks_calibrate(smollm2, data_dir):
    """Two real blocks, 4 windows of 64 tokens of WikiText-2 train: the error falls well below
    the initial (RTN-like) error, and block 1 sees block 0's quantized output."""
    from data import calib_windows
    model, tok = smollm2
    tokens = calib_windows(tok, 4, 64, seed=0, data_dir=data_dir)
    freqs = model.freqs_cis(64, "cpu")
    with torch.no_grad():
        X = model.tok_embeddings(tokens)
    Xq = X
    a = args(group_size=64, rank=16, epochs=8)
    for l in range(2):
        fp = model.layers[l]
        Y = calibrate.run_block(fp, X, freqs, "cpu")
        before = block_error(calibrate.quant_block(fp, a, l), Xq, Y, freqs)
        qb, retries = calibrate.calibrate_block(l, fp, calibrate.Acts(X, Xq, Y, Y), freqs, a)
        after = block_error(qb, Xq, Y, freqs)
        assert retries == 0 and after < 0.8 * before, (l, before, after)
        X, Xq = Y, calibrate.run_block(qb, Xq, freqs, "cpu")


def calib_cmd(ckpt, out, *extra):
    return [sys.executable, "calibrate.py", "--ckpt", str(ckpt), "--out", str(out), "--nsamples", "4",
            "--seqlen", "64", "--epochs", "6", "--group-size", "32", "--rank", "8", "--threads", "1", *extra]


def test_killed_run_resumes_to_the_identical_result(tiny_ckpt, tmp_path):
    whole = subprocess.run(calib_cmd(tiny_ckpt, tmp_path / "whole"), cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen(calib_cmd(tiny_ckpt, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # kill -9 once two blocks are done
        if (out / "progress.json").exists() and len(json.loads((out / "progress.json").read_text())["blocks"]) >= 2:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL and not (out / "apiq.json").exists()
    resumed = subprocess.run(calib_cmd(tiny_ckpt, out), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (out / "blocks").exists() and (out / "model.safetensors").stat().st_mode & 0o044  # 644, not 600
    # a finished directory is never overwritten, and other settings cannot resume a run
    again = subprocess.run(calib_cmd(tiny_ckpt, out), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a finished model" in again.stderr
    (out / "apiq.json").rename(out / "apiq.json.bak")
    (out / "progress.json").write_text(json.dumps({"settings": {"bits": 3}, "blocks": []}))
    other = subprocess.run(calib_cmd(tiny_ckpt, out), cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 2 and "other settings" in other.stderr and "Traceback" not in other.stderr


def test_svd_start_and_learned_rounding():
    """--lora-init svd starts each linear at Q + s B A closer to W than Q; --learn-rounding keeps
    its offsets in [-0.5, 0.5] and the frozen codes give exactly the output that training saw."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128))
    model.requires_grad_(False)
    fp = model.layers[0]
    a = args(lora_init="svd", learn_rounding=True, lr_round=0.05, epochs=10)
    for name, m in calibrate.quant_linears(calibrate.quant_block(fp, a, seed=0)):
        w = fp.get_submodule(name).weight
        assert (w - m.effective_weight()).norm() < 0.9 * (w - m.qweight()).norm(), name
    X = torch.randn(4, 16, 64)
    freqs = model.freqs_cis(16, "cpu")
    Y = calibrate.run_block(fp, X, freqs, "cpu")
    seen = {}
    orig = calibrate.train

    def spy(linears, objective, *rest):
        linears = list(linears)
        ok = orig(linears, objective, *rest)
        seen["offsets"] = [p.detach().clone() for m in linears for p in m.round_parameters()]
        seen["q"] = [m.qweight().detach().clone() for m in linears]     # Q(W) with the trained offsets
        return ok
    calibrate.train = spy
    try:
        qb, _ = calibrate.calibrate_block(0, fp, calibrate.Acts(X, X, Y, None), freqs, a)
    finally:
        calibrate.train = orig
    offsets = torch.cat([v.flatten() for v in seen["offsets"]])
    assert offsets.abs().max() <= 0.5 and (offsets != 0).float().mean() > 0.5   # they moved, within range
    for (_, m), q in zip(calibrate.quant_linears(qb), seen["q"]):
        assert torch.equal(m.qweight(), q)              # the stored 2-bit codes are what training used
    assert block_error(qb, X, Y, freqs) < block_error(calibrate.quant_block(fp, a, seed=0), X, Y, freqs)


def random_block(n):
    """A random block (dim 64), n windows X (n, 16, 64) of noise, its RoPE and outputs Y = F(W, X)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128))
    model.requires_grad_(False)
    fp = model.layers[0]
    X = torch.randn(n, 16, 64)
    freqs = model.freqs_cis(16, "cpu")
    return fp, X, freqs, calibrate.run_block(fp, X, freqs, "cpu")


def test_sign_steps_move_each_quantizer_parameter_by_the_step_size():
    """--sign-steps: one step moves every clipping logit and rounding offset by exactly lr (the
    schedule's lr at step 0) against its gradient's sign, where the gradient is non-zero (and the
    offset's clamp to [-0.5, 0.5] allows); A and B take AdamW's step as without the flag."""
    fp, X, freqs, Y = random_block(2)
    ends = {}
    for signed in (False, True):
        a = args(learn_rounding=True, lr_clip=0.03, lr_round=0.02, epochs=1, batch_size=2, sign_steps=signed)
        qb = calibrate.quant_block(fp, a, seed=0)
        lins = [m for _, m in calibrate.quant_linears(qb)]
        loss, _ = calibrate.bw_objective(qb, X, Y, freqs)
        quantizer = [p for m in lins for p in m.clip_parameters() + m.round_parameters()]
        grads = torch.autograd.grad(loss, quantizer)
        before = [p.detach().clone() for p in quantizer]
        assert calibrate.train(lins, lambda i: calibrate.bw_objective(qb, X[i], Y[i], freqs), 2, a, "t")
        after = [p.detach() for p in quantizer]
        ends[signed] = [p.detach().clone() for m in lins for p in m.lora_parameters()]
        if signed:
            kinds = [k for m in lins for k in ["clip"] * len(m.clip_parameters()) + ["offset"]]
            for b, g, p, kind in zip(before, grads, after, kinds):
                is_offset = kind == "offset"
                want = b - (0.02 if is_offset else 0.03) * g.sign()
                if is_offset:
                    want = want.clamp(-0.5, 0.5)
                torch.testing.assert_close(p, want, rtol=0, atol=1e-6)
                assert (g != 0).float().mean() > 0.5          # most of them did move
    for p, q in zip(ends[False], ends[True]):                # the adapter's AdamW step is unchanged
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_best_step_keeps_the_parameters_of_the_lowest_loss_step():
    """--best-step: after training, the objective on the best step's windows gives that step's
    loss again (the block holds the parameters it was computed with), and it is the lowest seen."""
    fp, X, freqs, Y = random_block(4)
    # a learning rate high enough that the last step is not the best one
    a = args(learn_rounding=True, lr_lora=3e-2, lr_clip=0.3, epochs=6, batch_size=1, best_step=True)
    qb = calibrate.quant_block(fp, a, seed=0)
    lins = [m for _, m in calibrate.quant_linears(qb)]
    seen = []

    def objective(i):
        loss, parts = calibrate.bw_objective(qb, X[i], Y[i], freqs)
        seen.append((loss.item(), i))
        return loss, parts
    assert calibrate.train(lins, objective, 4, a, "t")
    losses = [x for x, _ in seen]
    k = min(range(len(seen)), key=losses.__getitem__)
    assert k < len(seen) - 1, "the test needs a best step before the last"
    with torch.no_grad():
        again, _ = calibrate.bw_objective(qb, X[seen[k][1]], Y[seen[k][1]], freqs)
    assert again.item() == pytest.approx(min(losses), rel=1e-5)


def test_bf16_calibration_on_cpu_runs_in_bf16_and_lands_near_fp32(tiny_ckpt, tmp_path, monkeypatch):
    """--dtype bf16 on the CPU: the GPU's numerics (bf16 weights and activations under autocast,
    fp32 clipping logits, adapters and AdamW state), checked in every QuantLinear's forward, and
    block errors close to an fp32 run on the same data."""
    from data import calib_windows
    from checkpoints import load
    from lora import QuantLinear
    _, tok = load(str(tiny_ckpt))
    tokens = calib_windows(tok, 4, 64, seed=0)                              # (4, 64)

    def run(dtype):
        cfg = calibrate.make_config(ckpt=str(tiny_ckpt), bits=3, group_size=32, rank=8, nsamples=4, seqlen=64,
                                    epochs=4, dtype=dtype, lr_clip=1e-2, lr_lora=2e-3, out=str(tmp_path / dtype))
        model, _ = load(str(tiny_ckpt), dtype=None)
        norms = [b.ffn_norm.weight for b in model.layers]
        logs = calibrate.calibrate_blocks(model, tokens, cfg, tmp_path / dtype, [], None)
        assert all(b.ffn_norm.weight is n for b, n in zip(model.layers, norms))    # the stored norms, not bf16 copies
        return logs

    fp32 = run("fp32")
    seen, forward = set(), QuantLinear.forward

    def checked(self, x):
        seen.add((x.dtype, self.weight.dtype if self.weight is not None else None,
                  *(p.dtype for p in (self.gamma, self.beta, self.A, self.B) if p is not None)))
        return forward(self, x)
    monkeypatch.setattr(QuantLinear, "forward", checked)
    bf16 = run("bf16")
    # input, W, then gamma, beta, A, B (calibrating) or A, B (frozen)
    assert seen == {(torch.bfloat16, torch.bfloat16, *[torch.float32] * 4),
                    (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)}, seen
    for a, b in zip(fp32, bf16):
        assert b["rel_after"] == pytest.approx(a["rel_after"], rel=0.15), (a, b)   # measured: within 8%
        assert b["rel_after"] < 0.7 * b["rel_before"]                        # and it did train
