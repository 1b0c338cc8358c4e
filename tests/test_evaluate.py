"""evaluate.py and data.py: the GPTQ perplexity protocol on real WikiText-2 and SmolLM2-135M."""
import random
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from data import calib_windows, ppl_windows, token_stream, train_windows, wikitext2_rows
from evaluate import perplexity, window_nll

ROOT = Path(__file__).resolve().parents[1]


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


def test_smollm2_wikitext_perplexity_is_sane(smollm2, data_dir):
    """Two 2048-token windows of WikiText-2 test: a 135M model sits around 15-25 here."""
    model, tok = smollm2
    ppl = perplexity(model, ppl_windows("wikitext2", tok, 2048, data_dir)[:2])
    assert 8 < ppl < 40, ppl


def test_bad_evaluation_input_one_line():
    for args, words in [(["--ppl", "wikitext3"], "unknown dataset 'wikitext3'"),
                        (["--ppl", "wikitext2", "--seqlen", "9000"], "beyond the model's context"),
                        (["--ppl", "wikitext2", "--data-dir", "/nonexistent"], "does not exist")]:
        r = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
