"""export.py: transformers + peft (test-only references) load the export with no apiq code and
give our logits, q/k layout and tokenizer included."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import need

ROOT = Path(__file__).resolve().parents[1]
need("transformers")
peft = need("peft")


@pytest.fixture(scope="module")
def tiny_loftq(tiny_ckpt, tmp_path_factory):
    """LoftQ's start of the tiny Llama (B != 0, so the adapter matters), with a bias-free GQA model."""
    out = tmp_path_factory.mktemp("exp") / "loftq"
    r = subprocess.run([sys.executable, "calibrate.py", "--ckpt", str(tiny_ckpt), "--method", "loftq", "--bits", "2",
                        "--group-size", "32", "--rank", "8", "--loftq-iters", "1", "--threads", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(autouse=True)
def no_gptqmodel_dispatch(monkeypatch):
    """peft asks for `optimum` when it finds gptqmodel, which bench/bench_peers.py may have
    installed beside the tests: our export has no GPTQ layers, so that dispatch is off here."""
    import peft.tuners.lora.awq as awq
    import peft.tuners.lora.gptq as gptq
    for module in (awq, gptq):
        monkeypatch.setattr(module, "is_gptqmodel_available", lambda: False)


def hf_logits(base, adapter, x):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(x).logits


def test_transformers_and_peft_give_our_logits(tiny_loftq, tmp_path):
    import export
    from qmodel import load
    ours, tok = load(tiny_loftq)
    x = torch.tensor([tok.encode("The tower is 324 metres tall, about the same height as an 81-storey building",
                                 bos=True)])                                    # (1, T)
    with torch.no_grad():
        want = ours(x)                                                           # (1, T, vocab)
    base, adapter = export.export(tiny_loftq, tmp_path / "hf", adapter_dtype="fp32")   # as trained
    got = hf_logits(base, adapter, x)
    assert (got - want).abs().max().item() <= 1e-4
    without = hf_logits(base, None, x)                                          # the adapter does matter
    assert (without - want).abs().max().item() > 1e-2
    _, adapter16 = export.export(tiny_loftq, tmp_path / "hf16")        # the default: the adapter in fp16
    from safetensors.torch import load_file
    a32, a16 = (load_file(str(d / "adapter_model.safetensors")) for d in (adapter, adapter16))
    assert a32.keys() == a16.keys() and all(a16[k].dtype == torch.float16 and torch.equal(a16[k], a32[k].half())
                                            for k in a32)
    merged, none = export.export(tiny_loftq, tmp_path / "merged", merge=True)
    assert none is None and (hf_logits(merged, None, x) - want).abs().max().item() <= 1e-4
    from checkpoints import load as load_fp                                       # our loader reads it too
    mine, _ = load_fp(str(merged))
    with torch.no_grad():
        assert (mine(x) - want).abs().max().item() <= 1e-4
    from transformers import AutoTokenizer                                       # SentencePiece, Llama-2
    hf_tok = AutoTokenizer.from_pretrained(base)
    text = "Hello world, the year 1997 saw 3.5 inches of rain."
    assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)


def test_smollm2_export_tokenizer_and_gqa_layout(smollm2, data_dir, tmp_path):
    import copy

    import export
    from qmodel import quantize_model, save_quantized
    from transformers import AutoTokenizer
    fp, tok = smollm2
    q = quantize_model(copy.deepcopy(fp), "loftq", bits=2, rank=8, loftq_iters=1)
    save_quantized(q, tok, tmp_path / "q", {"method": "loftq", "source": "smollm2-135m"})
    base, adapter = export.export(tmp_path / "q", tmp_path / "hf", adapter_dtype="fp32")   # fp16 moves logits
    hf_tok = AutoTokenizer.from_pretrained(base)                                # of ~40 by up to 0.4 here
    text = (data_dir / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)              # 9/3-head GQA model, its BPE
    x = torch.tensor([tok.encode(text[:400], bos=True)])
    with torch.no_grad():
        want = q(x)
    # logits reach ~40 here; float rounding in two implementations differs by ~5e-3 even without an
    # adapter (RTN), up to 1.3e-2 with 2 threads (another summation order; mean 3e-4),
    # while a wrong q/k row layout or B permutation would be off by O(1) nearly everywhere
    diff = (hf_logits(base, adapter, x) - want).abs()
    assert diff.max().item() <= 5e-2 and diff.mean().item() <= 1e-3


@pytest.mark.parametrize("which, words", [("nonempty", "not empty"), ("unfinished", "unfinished calibration"),
                                          ("fp", "no apiq.json")])
def test_bad_input_one_line(tiny_ckpt, tmp_path, which, words):
    src = {"nonempty": tiny_ckpt, "unfinished": tmp_path / "u", "fp": tiny_ckpt}[which]
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "progress.json").write_text("{}")
    out = tmp_path / "target"
    out.mkdir()
    if which == "nonempty":
        (out / "x").write_text("keep me")
    r = subprocess.run([sys.executable, "export.py", str(src), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert which != "nonempty" or (out / "x").read_text() == "keep me"
