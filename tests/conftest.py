"""Shared fixtures: the real data in ../shared/data and the real SmolLM2-135M GGUF.

Outside CI a missing piece skips the tests that need it; with CI=true it is a failure
(CI must run on the real parts, not mocks)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on a shared CPU: two intra-op threads fighting other jobs were 10x slower than one.
    A module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quantize_tiny(ckpt, out, method, bits):
    """calibrate.py --method <a data-free init> on a tiny test model (group 32, rank 8): a quantized
    model directory made by the script itself."""
    import subprocess
    r = subprocess.run([sys.executable, "calibrate.py", "--ckpt", str(ckpt), "--method", method, "--bits", str(bits),
                        "--group-size", "32", "--rank", "8", "--threads", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def missing(why):
    if IN_CI:
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def data_dir():
    d = Path(os.environ.get("APIQ_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (d / "wikitext2_raw" / "wiki.test.raw").exists():
        missing(f"the shared data is not at {d}")
    return d


@pytest.fixture(scope="session")
def smollm2_gguf():
    from llama import embedded_gguf
    try:
        return embedded_gguf()
    except FileNotFoundError as e:
        missing(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tok) of the real SmolLM2-135M in fp32, loaded once per test session."""
    from llama import load
    torch.manual_seed(0)
    return load(str(smollm2_gguf))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, data_dir):
    """A 4-block random Llama in Meta's format with the real Llama-2 tokenizer beside it: the
    scripts' whole pipeline (calibrate, save, evaluate, plot) in seconds."""
    from llama import ModelArgs, Transformer
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    d.mkdir()
    torch.manual_seed(0)
    params = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
                  norm_eps=1e-5, max_seq_len=256)
    model = Transformer(ModelArgs(**params))
    torch.save(model.state_dict(), d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(params))
    os.symlink(data_dir / "tokenizers" / "llama2" / "tokenizer.model", d / "tokenizer.model")
    return d
