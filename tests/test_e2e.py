"""calibrate.py --e2e-epochs (e2e.py): after the same block-wise pass, the end-to-end stage changes
only the step sizes and A, B, never a code or a zero point, and lowers the next-token loss on the
windows it trained on; the model it saves is the model it trained."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import calib_windows  # noqa: E402
from finetune import lm_loss  # noqa: E402
from qmodel import load_quantized  # noqa: E402


def calibrate(ckpt, out, data_dir, *extra):
    cmd = [sys.executable, "calibrate.py", "--ckpt", str(ckpt), "--out", str(out), "--nsamples", "4", "--seqlen",
           "64", "--epochs", "2", "--group-size", "32", "--rank", "8", "--threads", "1", "--data-dir",
           str(data_dir), *extra]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return load_file(out / "model.safetensors")


def test_end_to_end_stage_trains_scales_and_adapters_only(tiny_ckpt, tmp_path, data_dir):
    plain = calibrate(tiny_ckpt, tmp_path / "plain", data_dir)
    e2e = calibrate(tiny_ckpt, tmp_path / "e2e", data_dir, "--e2e-epochs", "3", "--e2e-lr-scale", "1e-3",
                    "--e2e-lr-lora", "1e-3")
    assert plain.keys() == e2e.keys()
    moved = {kind: 0 for kind in ("scale", "A", "B")}
    for k, t in plain.items():
        kind = k.rsplit(".", 1)[-1]
        if kind in moved:
            moved[kind] += not torch.equal(t, e2e[k])
            assert t.dtype == e2e[k].dtype, k                      # stored as before
        else:                                                      # codes, zeros, norms, embeddings
            assert torch.equal(t, e2e[k]), k
    n_linears = sum(k.endswith(".scale") for k in plain)
    assert all(n == n_linears for n in moved.values()), moved
    log = json.loads((tmp_path / "e2e" / "calib_log.json").read_text())["end_to_end"]
    assert len(log) == 3 * 4 and all(step["loss"] > 0 for step in log)
    # the saved model is the trained one: lower loss on the windows it trained on than without the stage
    m_plain, tok = load_quantized(tmp_path / "plain")
    m_e2e, _ = load_quantized(tmp_path / "e2e")
    x = calib_windows(tok, 4, 64, 0, "wikitext2", str(data_dir))   # calibrate.py's windows (seed 0)
    with torch.no_grad():
        assert lm_loss(m_e2e, x).item() < lm_loss(m_plain, x).item() - 0.01
    # --e2e-lr-scale 0: the scales stay as the blocks left them, A and B alone train
    lora_only = calibrate(tiny_ckpt, tmp_path / "lora", data_dir, "--e2e-epochs", "1", "--e2e-lr-scale", "0")
    for k, t in plain.items():
        assert torch.equal(t, lora_only[k]) != k.endswith((".A", ".B")), k


def test_end_to_end_needs_calibration_data(tiny_ckpt, tmp_path):
    run = subprocess.run([sys.executable, "calibrate.py", "--ckpt", str(tiny_ckpt), "--method", "loftq",
                          "--e2e-epochs", "1", "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "--e2e-epochs" in run.stderr and "Traceback" not in run.stderr


def test_end_to_end_with_nothing_to_train_is_refused_before_calibrating(tiny_ckpt, tmp_path):
    run = subprocess.run([sys.executable, "calibrate.py", "--ckpt", str(tiny_ckpt), "--e2e-epochs", "1",
                          "--e2e-lr-scale", "0", "--e2e-lr-lora", "0", "--out", str(tmp_path / "x")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "trains nothing" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x").exists()                       # refused before a block was calibrated


def test_end_to_end_distils_full_precision(tiny_ckpt, tmp_path, data_dir):
    """--e2e-loss kd: the stage trains on the KL to the full-precision model's next-token distribution;
    after it that KL on the trained windows is lower than after the block-wise pass alone, and its
    logged first step is that KL (the same windows, the same model as the plain run saved)."""
    from checkpoints import load
    calibrate(tiny_ckpt, tmp_path / "plain", data_dir)
    calibrate(tiny_ckpt, tmp_path / "kd", data_dir, "--e2e-epochs", "3", "--e2e-lr-scale", "1e-3", "--e2e-lr-lora",
              "1e-3", "--e2e-loss", "kd")
    fp, _ = load(str(tiny_ckpt))
    m_plain, tok = load_quantized(tmp_path / "plain")
    m_kd, _ = load_quantized(tmp_path / "kd")
    x = calib_windows(tok, 4, 64, 0, "wikitext2", str(data_dir))
    with torch.no_grad():
        before, after = lm_loss(m_plain, x[:1], fp.eval()).item(), lm_loss(m_kd, x, fp).item()
        assert after < lm_loss(m_plain, x, fp).item() - 1e-3
    log = json.loads((tmp_path / "kd" / "calib_log.json").read_text())
    assert log["config"]["e2e_loss"] == "kd" and abs(log["end_to_end"][0]["loss"] - before) < 1e-3 * max(1, before)


def test_end_to_end_in_bf16_runs_under_autocast(tiny_ckpt, tmp_path, data_dir):
    """calibrate.py --dtype bf16: the stage's matmuls run in bf16 (as the block-wise pass's do), its
    trained scales stay fp32, and its first loss is the fp32 stage's within bf16's rounding."""
    import copy
    from e2e import end_to_end
    from lora import quant_linears
    calibrate(tiny_ckpt, tmp_path / "plain", data_dir)
    m16, tok = load_quantized(tmp_path / "plain")
    m32 = copy.deepcopy(m16)
    x = calib_windows(tok, 4, 64, 0, "wikitext2", str(data_dir))
    seen = []
    lin = list(quant_linears(m16))[-1][1]
    hook = lin.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    log16 = end_to_end(m16, x, 1, 1e-3, 1e-3, dtype=torch.bfloat16)
    hook.remove()
    log32 = end_to_end(m32, x, 1, 1e-3, 1e-3)
    assert seen and set(seen) == {torch.bfloat16}
    assert abs(log16[0]["loss"] - log32[0]["loss"]) < 0.02 * log32[0]["loss"]
    assert all(m.scale.dtype == torch.float32 for _, m in quant_linears(m16))
    assert not all(torch.equal(a.scale, b.scale) for (_, a), (_, b) in zip(quant_linears(m16), quant_linears(m32)))
