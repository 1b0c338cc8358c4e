"""Faults of the machine: a full disk and a scheduler's SIGTERM. The disk is a real small filesystem
(a tmpfs the test mounts itself; root needed, which CI has: under CI=true a tmpfs that cannot be made
is a failure). Each run that hits the full disk must end with one line naming the file, leave nothing
half-written that looks complete, and, once there is room, the same command must finish with exactly
the bytes of an uninterrupted run. SIGTERM ends calibrate.py and finetune.py like Ctrl-C, with exit
code 143 and one line on how to continue."""
import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli import DiskFull, atomic_write, write_json
from conftest import ROOT, missing, quantize_tiny

PY = sys.executable
TINY = ["--group-size", "32", "--rank", "8", "--threads", "1"]
CAL = ["--nsamples", "4", "--seqlen", "64", "--epochs", "2", *TINY]
FT = ["--seqlen", "64", "--batch-size", "2", "--grad-accum", "1", "--eval-limit", "1", "--eval-seqlen", "64",
      "--max-steps", "3", "--save-every", "1", "--threads", "1"]
ROOMY = 256 << 20
PAGE = 4096


@contextmanager
def small_disk(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at path; yields grow(new_size), which gives it more room."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        missing(f"cannot mount a {size}-byte tmpfs at {path} ({r.stderr.strip()}): the full-disk tests need root")
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE) * PAGE


def run(cmd):
    return subprocess.run([PY, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)


def assert_disk_full_line(r, path_part):
    """Exit 1, no traceback, and one error line (on a line of its own, after the progress bars) that
    names the file, says the disk is full and how to continue."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    line = errors[0]
    assert "the disk is full: could not write" in line and path_part in line, line
    assert "free some space, then the same command" in line, line
    return line


def assert_nothing_half_written(d: Path):
    left = [p for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]
    assert not left, left


def tensors(f: Path) -> dict:
    return load_file(str(f))


def assert_same_tensors(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- the writes themselves

def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    """Each of the three errors a full disk arrives as (OSError from a plain write, safetensors'
    SafetensorError, torch.save's RuntimeError) becomes DiskFull naming the file; the temp file is
    gone and the file written before is untouched."""
    with small_disk(tmp_path / "disk", 64 << 10):
        d = tmp_path / "disk"
        write_json(d / "r.json", {"ok": 1})
        big = {"t": torch.zeros(1 << 16)}                                  # 256 KiB: more than the disk
        for f, write in [(d / "r.json", "x" * (1 << 17)),
                         (d / "r.json", lambda tmp: save_file(big, tmp)),
                         (d / "r.json", lambda tmp: torch.save(big, tmp))]:
            with pytest.raises(DiskFull, match=r"the disk is full: could not write .*r\.json"):
                atomic_write(f, write)
            assert json.loads((d / "r.json").read_text()) == {"ok": 1}
            assert_nothing_half_written(d)


# ---- calibrate.py

@pytest.fixture(scope="module")
def calibrated(tiny_ckpt, tmp_path_factory):
    """An uninterrupted calibration, and the size of one block file, of the finished model file."""
    d = tmp_path_factory.mktemp("cal")
    r = run(["calibrate.py", "--ckpt", tiny_ckpt, *CAL, "--out", d / "whole"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(["calibrate.py", "--ckpt", tiny_ckpt, *CAL, "--stop-after", "1", "--out", d / "one"])
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "whole", pages((d / "one" / "blocks" / "block_000.safetensors").stat().st_size), \
        pages((d / "whole" / "model.safetensors").stat().st_size)


@pytest.mark.parametrize("moment", ["a block", "the model", "the tokenizer"])
def test_full_disk_during_calibration(tiny_ckpt, calibrated, tmp_path, moment):
    """The disk fills while a block is written, while model.safetensors is, or while the tokenizer
    is copied beside it; with room again the same command finishes to the uninterrupted bytes."""
    whole, block, model = calibrated
    room = {"a block": block + block // 2,                                    # the second block does not fit
            "the model": 4 * block + 4 * PAGE + model // 2,
            "the tokenizer": 4 * block + 4 * PAGE + model + 8 * PAGE}[moment]
    with small_disk(tmp_path / "disk", room) as grow:
        out = tmp_path / "disk" / "run"
        cmd = ["calibrate.py", "--ckpt", tiny_ckpt, *CAL, "--out", out]
        line = assert_disk_full_line(run(cmd), str(out))
        assert "continues from the last finished block" in line
        assert not (out / "apiq.json").exists()
        assert_nothing_half_written(out)
        grow(ROOMY)
        r = run(cmd)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
        assert (out / "apiq.json").exists() and not (out / "blocks").exists()


# ---- finetune.py

@pytest.fixture(scope="module")
def finetuned(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    qlora = quantize_tiny(tiny_ckpt, d / "qlora", "qlora", 2)
    r = run(["finetune.py", "--ckpt", qlora, *FT, "--out", d / "whole"])
    assert r.returncode == 0, r.stderr[-2000:]
    return qlora, d / "whole"


@pytest.mark.parametrize("moment", ["the first checkpoint", "the model"])
def test_full_disk_during_finetuning(finetuned, tmp_path, moment):
    """The disk fills while torch.save writes a checkpoint (its RuntimeError) or while the finished
    model is written (SafetensorError); with room again the same command continues to the
    uninterrupted bytes."""
    qlora, whole = finetuned
    room = {"the first checkpoint": 16 * PAGE, "the model": 4 << 20}[moment]
    with small_disk(tmp_path / "disk", room) as grow:
        out = tmp_path / "disk" / "ft"
        cmd = ["finetune.py", "--ckpt", qlora, *FT, "--out", out]
        line = assert_disk_full_line(run(cmd), str(out))
        assert "continues from the last checkpoint" in line
        assert not (out / "finetune_log.json").exists() and not (out / "apiq.json").exists()
        assert_nothing_half_written(out)
        grow(ROOMY)
        r = run(cmd)
        assert r.returncode == 0, r.stderr[-2000:]
        assert_same_tensors(out / "model.safetensors", whole / "model.safetensors")


# ---- export.py

@pytest.mark.parametrize("fmt", ["hf", "gptq"])
def test_full_disk_during_export(finetuned, tmp_path, fmt):
    """No export directory and no partial one after the disk filled; with room again the same
    command writes what an export with room writes."""
    qlora, _ = finetuned
    whole = tmp_path / "whole"
    assert run(["export.py", qlora, whole, "--format", fmt]).returncode == 0
    with small_disk(tmp_path / "disk", 1 << 20) as grow:
        out = tmp_path / "disk" / "exp"
        cmd = ["export.py", qlora, out, "--format", fmt]
        assert_disk_full_line(run(cmd), str(tmp_path / "disk"))
        assert not out.exists() and not any((tmp_path / "disk").iterdir())
        grow(ROOMY)
        r = run(cmd)
        assert r.returncode == 0, r.stderr[-2000:]
        files = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert files == sorted(p.relative_to(whole) for p in whole.rglob("*"))
        for f in files:
            if f.name == "adapter_config.json":                          # it names its base by its path
                a, b = (json.loads((d / f).read_text()) for d in (out, whole))
                assert a.pop("base_model_name_or_path") == str(out / "base") and \
                    b.pop("base_model_name_or_path") == str(whole / "base") and a == b
            elif (out / f).is_file():
                assert (out / f).read_bytes() == (whole / f).read_bytes(), f


# ---- SIGTERM

def terminate_when(proc, cond, timeout=120):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            return False
        assert time.time() - t0 < timeout, "the run never reached the moment to terminate it"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    return True


def test_sigterm_ends_calibration_like_ctrl_c(tiny_ckpt, calibrated, tmp_path):
    """SIGTERM after two finished blocks: exit 143, one line on how to continue, the blocks kept; the
    same command then finishes to the uninterrupted bytes."""
    whole, _, _ = calibrated
    out = tmp_path / "run"
    cmd = [PY, "calibrate.py", "--ckpt", str(tiny_ckpt), *CAL, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def two_blocks():
        try:
            return len(json.loads((out / "progress.json").read_text())["blocks"]) >= 2
        except (OSError, ValueError):
            return False
    assert terminate_when(proc, two_blocks), "the calibration finished before two blocks were done"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert "terminated (SIGTERM): the same command continues from the last finished block" in err
    assert "Traceback" not in err and not (out / "apiq.json").exists()
    assert_nothing_half_written(out)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_sigterm_ends_finetuning_like_ctrl_c(finetuned, tmp_path):
    qlora, whole = finetuned
    out = tmp_path / "ft"
    cmd = [PY, "finetune.py", "--ckpt", str(qlora), *FT, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert terminate_when(proc, (out / "checkpoint.pt").exists), "the finetuning finished before a checkpoint"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert "terminated (SIGTERM): the same command continues from the last checkpoint" in err
    assert "Traceback" not in err and not (out / "finetune_log.json").exists()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-2000:]
    assert_same_tensors(out / "model.safetensors", whole / "model.safetensors")


# ---- saliency.py, evaluate.py --json (the figures write through the same atomic_write, tested above)

def fill(d: Path):
    """Take all the room left on d's filesystem (a file that grows until the disk says no)."""
    with open(d / "filler", "wb", buffering=0) as f:              # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * PAGE)
        except OSError:
            pass


def test_full_disk_saliency_and_evaluate(tiny_ckpt, tmp_path):
    """The other writers: saliency.py's block files, evaluate.py --json. Each ends with the one line;
    with the room back the same command writes what a run with room writes."""
    sal = ["saliency.py", "--ckpt", tiny_ckpt, "--nsamples", "2", "--seqlen", "32", "--threads", "1"]
    assert run([*sal, "--out", tmp_path / "sal"]).returncode == 0
    with small_disk(tmp_path / "disk", 1 << 20):
        d = tmp_path / "disk"
        fill(d)
        cmds = {"saliency": [*sal, "--out", d / "sal"],
                "evaluate": ["evaluate.py", "--ckpt", tiny_ckpt, "--ppl", "wikitext2", "--seqlen", "32", "--limit", "1",
                             "--threads", "1", "--json", d / "fp.json"]}
        for cmd in cmds.values():
            assert_disk_full_line(run(cmd), str(d))
            assert_nothing_half_written(d)
        (d / "filler").unlink()
        assert run(cmds["saliency"]).returncode == 0 and run(cmds["evaluate"]).returncode == 0
        for l in range(4):
            assert_same_tensors(d / "sal" / f"block_{l:03d}.safetensors", tmp_path / "sal" / f"block_{l:03d}.safetensors")
        assert json.loads((d / "fp.json").read_text())["ppl"]["wikitext2"] > 0
