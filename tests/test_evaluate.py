"""evaluate.py and data.py: the GPTQ perplexity protocol on real WikiText-2 and SmolLM2-135M."""
import json
import math
import random
import subprocess
import sys

import torch
import torch.nn.functional as F

from checkpoints import load
from conftest import ROOT
from data import calib_windows, ppl_windows, token_stream, train_windows, wikitext2_rows
from evaluate import perplexity, window_nll


def test_wikitext_rows_are_huggingface_rows(data_dir):
    rows = wikitext2_rows("test", data_dir)
    assert len(rows) == 4358  # the number of rows of wikitext-2-raw-v1's test split
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert all(r == "" or r.endswith("\n") for r in rows)


def test_windows_follow_the_gptq_protocol(smollm2, data_dir):
    _, tok = smollm2
    stream = token_stream(tok, "test", data_dir)
    w = ppl_windows("wikitext2", tok, 2048, data_dir)
    assert w.shape == (stream.numel() // 2048, 2048)              # non-overlapping, tail dropped
    assert torch.equal(w.flatten(), stream[: w.numel()])
    c = calib_windows(tok, 5, 256, seed=3, data_dir=data_dir)
    train = token_stream(tok, "train", data_dir)
    rng = random.Random(3)                                         # docs/method.md §4: randint(0, N - seqlen - 1)
    for row in c:
        i = rng.randint(0, train.numel() - 256 - 1)
        assert torch.equal(row, train[i:i + 256])


def test_c4_calibration_touches_no_c4_test_document(smollm2, data_dir):
    """Calibration on C4 draws its windows from the documents that no C4 test window comes from
    (the test windows: 256 x 2048, seed 0): no calibration window is found in a test document, as
    one was before (the same sampler and seed gave the test windows themselves)."""
    from data import c4_docs, c4_eval_docs
    _, tok = smollm2
    docs = c4_docs(data_dir)
    held = c4_eval_docs(tok, docs)
    assert 0 < len(held) <= 256            # 62 with SmolLM2: few documents are longer than 2048 tokens
    calib = calib_windows(tok, 8, 512, seed=0, dataset="c4", data_dir=data_dir)          # (8, 512)
    test = ppl_windows("c4", tok, 2048, data_dir)
    assert not torch.equal(calib_windows(tok, 1, 2048, seed=0, dataset="c4", data_dir=data_dir)[0], test[0])
    for i in held:
        ids = torch.tensor(tok.encode(docs[i], bos=True))
        if ids.numel() >= 512:
            spans = ids.unfold(0, 512, 1)                          # every 512-token span of the document
            assert not (spans[:, None, :] == calib[None]).all(-1).any(), i


def test_c4_tuning_windows_share_no_text_with_c4_test_windows(smollm2, data_dir):
    """The tuning set's C4 part (data.TUNING_C4) comes from the documents no C4 test window touches:
    no 64-token span of it occurs in any of the 256 test windows."""
    from data import TUNING_C4
    _, tok = smollm2
    tuning = ppl_windows(TUNING_C4, tok, 2048, data_dir)                       # (n, 2048)
    test = ppl_windows("c4", tok, 2048, data_dir)                               # (256, 2048)
    assert tuning.shape == (64, 2048)
    seen = {tuple(s.tolist()) for w in test for s in w.unfold(0, 64, 64)}      # every aligned 64-token span
    for w in tuning:                                                            # each 64-token span at any offset
        assert not any(tuple(s.tolist()) in seen for s in w.unfold(0, 64, 1))


def test_mixed_calibration_text_shares_no_text_with_tuning_or_test_windows(smollm2, data_dir):
    """--dataset wikitext2+c4: the first half WikiText-2 train's windows (the same as --dataset
    wikitext2 draws), the second C4's, and no 64-token span of those occurs in a C4 test window or in
    the tuning set's C4 part: calibration reads neither."""
    from data import TUNING_C4, calib_windows
    _, tok = smollm2
    mixed = calib_windows(tok, 8, 512, 0, "wikitext2+c4", data_dir)           # (8, 512)
    assert mixed.shape == (8, 512)
    assert torch.equal(mixed[:4], calib_windows(tok, 4, 512, 0, "wikitext2", data_dir))
    seen = {tuple(s.tolist()) for name in ("c4", TUNING_C4)
            for w in ppl_windows(name, tok, 2048, data_dir) for s in w.unfold(0, 64, 64)}
    assert len(seen) > 256 * 32                                                  # both sets' spans
    for w in mixed[4:]:                                                         # any offset
        assert not any(tuple(s.tolist()) in seen for s in w.unfold(0, 64, 1))
    c4 = calib_windows(tok, 8, 512, 0, "c4", data_dir)     # --dataset c4 (the paper's) may draw tuning documents
    assert not torch.equal(c4[:4], mixed[4:])
    quarter = calib_windows(tok, 8, 512, 0, "wikitext2+c4", data_dir, c4_share=0.25)   # --c4-share 0.25
    assert torch.equal(quarter[:6], calib_windows(tok, 6, 512, 0, "wikitext2", data_dir))
    for w in quarter[6:]:
        assert not any(tuple(s.tolist()) in seen for s in w.unfold(0, 64, 1))


def test_finetune_text_with_validation_is_train_then_validation_never_test(smollm2, data_dir):
    _, tok = smollm2
    train, valid, test = (token_stream(tok, s, data_dir) for s in ("train", "validation", "test"))
    w = train_windows(tok, 512, "wikitext2+valid", data_dir)
    both = torch.cat([train, valid])
    assert w.shape == (both.numel() // 512, 512) and torch.equal(w.flatten(), both[: w.numel()])
    assert len(w) > 4 * len(train_windows(tok, 512, "wikitext2", data_dir))      # 68k train tokens, ~4x more
    assert not torch.equal(valid[:512], test[:512])                                # the held-out split is not in it


def test_chunked_nll_equals_full_cross_entropy(smollm2):
    model, _ = smollm2
    x = torch.randint(0, 49152, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    full = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").mean(1)
    assert torch.allclose(window_nll(model, x, chunk=128), full, atol=1e-5)


# The same window scored by an independent implementation: transformers dequantizes the same GGUF
# itself and runs its own Llama (transformers 5.25.0, torch 2.13.0, CPU, fp32 logits, NLL in float64):
#   ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
#   math.exp(F.cross_entropy(ref(w).logits[0, :-1].double(), w[0, 1:]))   # w: window 0 below
HF_PPL_WINDOW_0 = 15.146778


def test_smollm2_wikitext_perplexity_equals_transformers(smollm2, data_dir):
    """Window 0 (2048 tokens) of WikiText-2 test by the GPTQ protocol. Our logits are within 1e-3 of
    transformers' (tests/test_llama.py), and a token's NLL -log softmax(z)_t moves by at most
    2 max|dz|, so log ppl is within 2e-3 of the reference's."""
    model, tok = smollm2
    ppl = perplexity(model, ppl_windows("wikitext2", tok, 2048, data_dir)[:1])
    assert abs(math.log(ppl) - math.log(HF_PPL_WINDOW_0)) <= 2e-3, ppl


def test_the_tuning_set_reads_no_test_file(tiny_ckpt, data_dir, tmp_path):
    """--ppl wikitext2-valid (the tuning set) runs with wiki.test.raw absent, on WikiText-2
    validation text windowed as the test split; the test set itself then says what is missing."""
    d = tmp_path / "data" / "wikitext2_raw"
    d.mkdir(parents=True)
    for f in (data_dir / "wikitext2_raw").iterdir():
        if f.name != "wiki.test.raw":
            (d / f.name).symlink_to(f)
    cmd = [sys.executable, "evaluate.py", "--ckpt", str(tiny_ckpt), "--seqlen", "64", "--limit", "2", "--threads", "1",
           "--data-dir", str(tmp_path / "data"), "--json", str(tmp_path / "r.json"), "--ppl"]
    r = subprocess.run(cmd + ["wikitext2-valid"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    _, tok = load(str(tiny_ckpt))
    want = token_stream(tok, "validation", data_dir)[: 2 * 64].view(2, 64)      # the first two windows
    got = ppl_windows("wikitext2-valid", tok, 64, tmp_path / "data")[:2]
    assert torch.equal(got, want)
    assert json.loads((tmp_path / "r.json").read_text())["ppl"]["wikitext2-valid"] > 1
    r = subprocess.run(cmd + ["wikitext2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no WikiText-2 test file" in r.stderr, r.stderr[-2000:]
