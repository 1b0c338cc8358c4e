"""finetune.py: only A and B move, the loss falls, a crash resumes to the identical result, the
losses agree with evaluate.py's. (Bad input: tests/test_bad_input.py.)"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lora import quant_linears

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_qlora(tiny_ckpt, tmp_path_factory):
    """QLoRA's start (Q = RTN(W), B = 0) of the tiny Llama: a quantized directory to finetune."""
    from conftest import quantize_tiny
    return quantize_tiny(tiny_ckpt, tmp_path_factory.mktemp("ft") / "qlora", "qlora", 2)


def config(ckpt, out, **kw):
    import finetune
    return finetune.make_config(**(dict(ckpt=str(ckpt), out=str(out), seqlen=64, batch_size=2, grad_accum=2, epochs=1,
                                        max_steps=6, lr=3e-3, eval_limit=1, eval_seqlen=256, save_every=2,
                                        threads=1) | kw))


def test_only_the_adapters_train_and_the_loss_falls(tiny_qlora, tmp_path):
    import finetune
    summary = finetune.main(config(tiny_qlora, tmp_path / "ft"))
    before, after = load_file(tiny_qlora / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != (k.endswith(".A") or k.endswith(".B")), k   # codes, scale, zero, embeddings, norms: equal
    log = json.loads((tmp_path / "ft" / "finetune_log.json").read_text())
    losses = [s["loss"] for s in log["log"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert log["log"][0]["lr"] == pytest.approx(3e-3) and log["log"][-1]["lr"] < 3e-3      # cosine from lr
    assert summary["eval"]["windows"] == 1 and not (tmp_path / "ft" / "checkpoint.pt").exists()
    made = json.loads((tmp_path / "ft" / "apiq.json").read_text())
    assert made["method"] == "qlora+ft-ce" and made["finetuned"]["steps"] == 6
    from data import ppl_windows
    from qmodel import load                                             # evaluate.py's loader reads it
    model, tok = load(tmp_path / "ft")
    w = ppl_windows("wikitext2", tok, 256)[:1]                          # the held-out window it was scored on
    with torch.no_grad():
        logits = model(w)                                               # (1, 256, vocab)
        start, _ = load(tiny_qlora)                                     # the start with the trained A, B put in
        for name, m in quant_linears(start):
            m.A.copy_(after[f"{name}.A"]), m.B.copy_(after[f"{name}.B"])
        assert torch.equal(start(w), logits) and not torch.equal(load(tiny_qlora)[0](w), logits)
    # the reported perplexity is exp(mean next-token NLL) of the saved model, the NLL in float64 here:
    # fp32 log-softmax over 32000 logits of size < 10 is within ~(10 + log 32000) eps = 2.4e-6 of it
    nll = F.cross_entropy(logits[0, :-1].double(), w[0, 1:])
    assert summary["eval"]["wikitext2"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_a_crash_resumes_to_the_identical_result(tiny_qlora, tmp_path, monkeypatch):
    import finetune
    finetune.main(config(tiny_qlora, tmp_path / "whole"))
    calls, real = [0], finetune.lm_loss

    def crash_in_step_4(*a):          # 2 forward passes a step: the 7th pass is in step 4, after step 2's checkpoint
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(finetune, "lm_loss", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(config(tiny_qlora, tmp_path / "crashed"))
    assert torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "crashed" / "apiq.json").exists()
    monkeypatch.setattr(finetune, "lm_loss", real)
    finetune.main(config(tiny_qlora, tmp_path / "crashed"))
    assert (tmp_path / "crashed" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
    whole = json.loads((tmp_path / "whole" / "finetune_log.json").read_text())["log"]
    resumed = json.loads((tmp_path / "crashed" / "finetune_log.json").read_text())["log"]
    assert [s["loss"] for s in whole] == [s["loss"] for s in resumed]
    with pytest.raises(ValueError, match="already holds a finished finetuning"):
        finetune.main(config(tiny_qlora, tmp_path / "crashed"))
    (tmp_path / "other").mkdir()
    finetune.save_checkpoint(tmp_path / "other", 1, {"lr": 1.0}, {}, torch.optim.SGD([torch.zeros(1)], lr=1), [], 0)
    with pytest.raises(ValueError, match="other settings"):
        finetune.main(config(tiny_qlora, tmp_path / "other"))


def test_peak_memory_counts_the_processes_that_trained(tiny_qlora, tmp_path, monkeypatch):
    """A run stopped after its last step's checkpoint (in the scoring after it) and resumed reports the
    training processes' peak memory, which the checkpoint carries, not only the resumed scorer's."""
    import finetune
    real = finetune.held_out

    def stop(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "held_out", stop)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(config(tiny_qlora, tmp_path / "ft"))
    ckpt = tmp_path / "ft" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 6 and state["peak_gib"] > 0                # the training process's, recorded
    state["peak_gib"] = 1e6                                             # as if a larger process had trained
    torch.save(state, ckpt)
    monkeypatch.setattr(finetune, "held_out", real)
    finetune.main(config(tiny_qlora, tmp_path / "ft"))
    assert json.loads((tmp_path / "ft" / "finetune_log.json").read_text())["peak_gib"] == 1e6


def test_losses_against_evaluate_and_kd_of_a_model_with_itself(tiny_ckpt, data_dir):
    import finetune
    from checkpoints import load
    from evaluate import window_nll
    cfg = config(tiny_ckpt, "unused", fp_lora=True, rank=8)
    model, tok, source = finetune.load_student(cfg)                     # fp + LoRA, B = 0: the fp model's outputs
    x = finetune.train_windows(tok, 64, "wikitext2")[:2]                # (2, 64)
    ref, _ = load(str(tiny_ckpt))
    with torch.no_grad():
        ce = finetune.lm_loss(model, x)
        kd = finetune.lm_loss(model, x, teacher=ref)
    assert ce.item() == pytest.approx(window_nll(ref, x).mean().item(), rel=1e-5)   # evaluate.py's NLL
    assert abs(kd.item()) < 1e-5 and source["method"] == "fp"                      # KL(p || p) = 0


def test_non_finite_loss_is_reported(tiny_qlora, tmp_path):
    import finetune
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        finetune.main(config(tiny_qlora, tmp_path / "nan", lr=1e30))


def test_loss_curve_plot_and_table(tiny_ckpt, tiny_qlora, tmp_path):
    import finetune
    d = tmp_path / "results"
    finetune.main(config(tiny_qlora, d / "qlora-w2-ft", max_steps=2, eval_before=True))
    finetune.main(config(tiny_ckpt, d / "fp-lora-ft", max_steps=2, fp_lora=True, rank=8))
    assert (d / "fp-lora-ft" / "adapters.safetensors").exists()
    r = subprocess.run([sys.executable, "plots/finetune.py", str(d), "--out", str(tmp_path / "ft.png")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ft.png").stat().st_size > 10_000
    rows = [line for line in r.stdout.splitlines() if line.startswith("| QLoRA") or line.startswith("| full")]
    assert len(rows) == 2 and rows[0].startswith("| full precision + LoRA | fp32 | - |")


def test_packed_model_trains_to_the_same_adapters(tiny_qlora, tmp_path):
    import finetune
    finetune.main(config(tiny_qlora, tmp_path / "cached", max_steps=2))
    finetune.main(config(tiny_qlora, tmp_path / "packed", max_steps=2, packed=True))   # Q(W) from the codes each pass
    assert (tmp_path / "packed" / "model.safetensors").read_bytes() == \
        (tmp_path / "cached" / "model.safetensors").read_bytes()
