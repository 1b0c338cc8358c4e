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

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2`: two workers share the two cores, so each runs torch on one thread, and so do
    # the scripts the tests start (they inherit OMP_NUM_THREADS; most also get --threads 1)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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
    """Skip for a missing package or data, except under CI=true: there it is a failure."""
    if IN_CI:
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


def need(*modules):
    """Import each module (a test-only reference: transformers, peft, tokenizers...) and return the
    last, or missing(): a skip outside CI, a failure under CI=true. Use it instead of
    pytest.importorskip."""
    import importlib
    got = None
    for name in modules:
        try:
            got = importlib.import_module(name)
        except ImportError as e:
            missing(f"{name} is not installed ({e}): setup.sh installs it")
    return got


SKIPS_FOR_MISSING = ("could not import", "not installed")     # pytest.importorskip's words, and the tests' own


def _missing_piece_skipped(report):
    return IN_CI and report.skipped and any(w in str(report.longrepr) for w in SKIPS_FOR_MISSING)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip for a missing package is a failure, also where a test still calls
    pytest.importorskip or pytest.skip itself instead of need() / missing()."""
    report = yield
    if _missing_piece_skipped(report):
        report.outcome = "failed"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (a module-level pytest.importorskip)."""
    report = yield
    if _missing_piece_skipped(report):
        report.outcome = "failed"
    return report


@pytest.fixture(scope="session")
def data_dir():
    d = Path(os.environ.get("APIQ_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (d / "wikitext2_raw" / "wiki.test.raw").exists():
        missing(f"the shared data is not at {d}")
    return d


@pytest.fixture(scope="session")
def smollm2_gguf():
    from checkpoints import embedded_gguf
    try:
        return embedded_gguf()
    except FileNotFoundError as e:
        missing(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tok) of the real SmolLM2-135M in fp32, loaded once per test session."""
    from checkpoints import load
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
