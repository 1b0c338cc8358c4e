"""--dtype bf16 on the CPU runs the GPU's code path (bf16 weights and activations; fp32 alpha
accumulators, adapters, AdamW state, norms' statistics and logits) in saliency.py, finetune.py and
evaluate.py, and lands near fp32. (calibrate.py's is in test_calibrate.py.)"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_inputs(model):
    """Hooks recording the dtype of every block linear's input; returns (dtypes seen, remove)."""
    seen, hooks = set(), []
    for block in model.layers:
        for m in block.modules():
            if hasattr(m, "in_features"):
                hooks.append(m.register_forward_hook(lambda mod, args, out: seen.add((args[0].dtype, out.dtype))))
    return seen, lambda: [h.remove() for h in hooks]


def test_saliency_in_bf16_accumulates_fp32_alpha_close_to_fp32(tiny_ckpt):
    from checkpoints import load
    from data import calib_windows
    from llama import LINEARS
    from saliency import Saliency, compute_saliency
    from scaleout import streamed_saliency
    _, tok = load(str(tiny_ckpt))
    windows = calib_windows(tok, 3, 64, seed=0)                                   # (3, 64)
    fp32 = compute_saliency(load(str(tiny_ckpt))[0], windows, "cpu")
    model16, _ = load(str(tiny_ckpt), dtype=torch.bfloat16)                       # what --dtype bf16 loads
    seen, remove = linear_inputs(model16)
    whole16 = compute_saliency(model16, windows, "cpu")
    remove()
    assert seen == {(torch.bfloat16, torch.bfloat16)}                             # nothing ran in fp32
    host, _ = load(str(tiny_ckpt), dtype=None)                                    # --stream: host model as stored
    streamed16 = Saliency(*streamed_saliency(host, windows, "cpu", dtype=torch.bfloat16))
    assert next(host.parameters()).dtype == torch.float32                         # the host copy is untouched
    # bf16 keeps 8 significant bits: each rounding is off by <= u = 2^-8 relative. A weight's gradient
    # passes ~8 bf16 roundings of activations per block forward and again backward; as independent
    # errors they add up to sqrt(n) u, and alpha = sum g^2 doubles a gradient's relative error
    n_roundings = 2 * 8 * host.args.n_layers
    bound = 2 * n_roundings**0.5 * 2**-8                                          # 4 blocks: 0.0625
    for run in (whole16, streamed16):
        assert run.losses == pytest.approx(fp32.losses, rel=2e-2)
        for l, block in enumerate(run.alphas):
            for n in LINEARS:
                a, ref = block[n], fp32.alphas[l][n]
                assert a.dtype == torch.float32
                rel = ((a - ref).norm() / ref.norm()).item()
                assert rel < bound, (l, n, rel, bound)


@pytest.fixture(scope="module")
def tiny_loftq(tiny_ckpt, tmp_path_factory):
    from conftest import quantize_tiny
    return quantize_tiny(tiny_ckpt, tmp_path_factory.mktemp("bf16") / "loftq", "loftq", 3)


def test_finetune_in_bf16_keeps_adapters_and_adamw_in_fp32(tiny_loftq, tmp_path, monkeypatch):
    import finetune
    from lora import QuantLinear
    states, Adam = [], torch.optim.AdamW

    class Recording(Adam):
        def step(self, *a, **kw):
            out = super().step(*a, **kw)
            states.append({t.dtype for s in self.state.values() for t in s.values() if t.dim() > 0})
            return out
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    seen, forward = set(), QuantLinear.forward

    def checked(self, x):
        seen.add((x.dtype, self.q_cache.dtype, self.A.dtype, self.B.dtype))
        return forward(self, x)

    def run(dtype):
        cfg = finetune.make_config(ckpt=str(tiny_loftq), out=str(tmp_path / dtype), seqlen=64, batch_size=2,
                                   grad_accum=1, epochs=1, max_steps=4, lr=3e-3, eval_limit=1, eval_seqlen=128,
                                   save_every=2, threads=1, dtype=dtype)
        finetune.main(cfg)
        return [s["loss"] for s in finetune.json.loads((tmp_path / dtype / "finetune_log.json").read_text())["log"]]

    fp32 = run("fp32")
    monkeypatch.setattr(QuantLinear, "forward", checked)
    bf16 = run("bf16")
    assert seen == {(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)}, seen
    assert states and all(s == {torch.float32} for s in states), states
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16[-1] < bf16[0]
    saved, start = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(tiny_loftq / "model.safetensors")
    assert {v.dtype for k, v in saved.items() if k.endswith((".A", ".B"))} == {torch.float32}
    for k in start:                              # the frozen rest: the start's bytes, not rounded to bf16
        assert k.endswith((".A", ".B")) or (saved[k].dtype == start[k].dtype and torch.equal(saved[k], start[k])), k


def test_evaluate_in_bf16_runs_in_bf16_near_fp32(tiny_ckpt, tiny_loftq):
    from data import ppl_windows
    from evaluate import perplexity
    from qmodel import load
    _, tok = load(str(tiny_ckpt))
    windows = ppl_windows("wikitext2", tok, 128)[:2]                             # (2, 128)
    for ckpt, cache in ((tiny_ckpt, True), (tiny_loftq, True), (tiny_loftq, False)):
        ref = perplexity(load(str(ckpt), cache=cache)[0], windows)
        model, _ = load(str(ckpt), dtype=torch.bfloat16, cache=cache)
        seen, remove = linear_inputs(model)
        got = perplexity(model, windows)
        remove()
        assert seen == {(torch.bfloat16, torch.bfloat16)}, (ckpt, cache, seen)
        assert got == pytest.approx(ref, rel=2e-2), (ckpt, cache)


def test_evaluate_cli_accepts_bf16_on_cpu(tiny_loftq, tmp_path):
    """The command line in bf16, packed: its perplexity is the in-process bf16 one to the last bit (the
    same computation on one thread) and the fp32 one, written out here, to bf16 accuracy."""
    import json
    import math

    import torch.nn.functional as F
    from data import ppl_windows
    from evaluate import perplexity
    from qmodel import load
    r = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tiny_loftq), "--dtype", "bf16", "--packed",
                        "--ppl", "wikitext2", "--limit", "1", "--seqlen", "128", "--threads", "1", "--json",
                        str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "r.json").read_text())["ppl"]
    model16, tok = load(str(tiny_loftq), dtype=torch.bfloat16, cache=False)
    w = ppl_windows("wikitext2", tok, 128)[:1]                                  # (1, 128)
    assert list(got) == ["wikitext2"] and got["wikitext2"] == perplexity(model16, w)
    with torch.no_grad():
        logits = load(str(tiny_loftq))[0](w)                                     # fp32, (1, 128, vocab)
    fp32 = math.exp(F.cross_entropy(logits[0, :-1].double(), w[0, 1:]).item())
    assert got["wikitext2"] == pytest.approx(fp32, rel=2e-2)                     # as in the test above


def test_default_dtype_follows_the_device_and_a_missing_gpu_is_one_line(tiny_ckpt):
    import calibrate
    import finetune
    assert calibrate.make_config(device="cpu").dtype == "fp32" and calibrate.make_config(device="cuda").dtype == "bf16"
    assert finetune.make_config(device="cuda:0").dtype == "bf16" and finetune.make_config(device="cpu", dtype="bf16").dtype == "bf16"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for cmd in (["calibrate.py", "--ckpt", str(tiny_ckpt), "--method", "rtn"], ["saliency.py", "--ckpt", str(tiny_ckpt)],
                ["evaluate.py", "--ckpt", str(tiny_ckpt)], ["finetune.py", "--ckpt", str(tiny_ckpt), "--fp-lora"]):
        r = subprocess.run([sys.executable, *cmd, "--device", "cuda", "--out" if cmd[0] != "evaluate.py" else "--json",
                            "/tmp/apiq-never-written"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip() == "error: --device cuda: torch sees no CUDA GPU here (use --device cpu)", \
            (cmd[0], r.stderr[-500:])
