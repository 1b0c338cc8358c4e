"""Shared fixtures: the real data in ../shared/data and the real SmolLM2-135M GGUF.

Outside CI a missing piece skips the tests that need it; with CI=true it is a failure
(DEVELOPERS.md: CI must run on the real parts)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IN_CI = os.environ.get("CI", "").lower() == "true"


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
