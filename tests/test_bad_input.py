"""Bad input and faults across every command line, each run as a user runs it (a subprocess):
exit code != 0, exactly one `error: ...` line on stderr that names the problem, no traceback, and
no earlier result touched. Then faults: kill -9 and Ctrl-C in the middle of finetune.py (the same
command resumes to the bit-identical adapter) and of export.py (no directory that looks complete;
the same command then finishes it).

The cases run concurrently (3 at a time) in one fixture; each case is then its own test."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, quantize_tiny

PY = sys.executable
TINY = ["--group-size", "32", "--rank", "8", "--threads", "1"]
CAL = ["--nsamples", "2", "--seqlen", "32", "--epochs", "1", *TINY]
FT = ["--seqlen", "64", "--batch-size", "2", "--grad-accum", "1", "--eval-limit", "1", "--eval-seqlen", "64",
      "--threads", "1"]

# (id, command line, words the error line must contain, the path that must not change)
# {x} are the paths the `world` fixture makes
CASES = [
    # calibrate.py
    ("cal-missing-ckpt", ["calibrate.py", "--ckpt", "{w}/nope", "--method", "rtn", "--out", "{w}/o1"], "not found", None),
    ("cal-corrupt-gguf", ["calibrate.py", "--ckpt", "{garbage_gguf}", "--method", "rtn", "--out", "{w}/o2"],
     "not a readable GGUF file", "{garbage_gguf}"),
    ("cal-truncated-pth", ["calibrate.py", "--ckpt", "{truncated_pth}", "--method", "rtn", "--out", "{w}/o3"],
     "consolidated.00.pth", "{truncated_pth}"),
    ("cal-garbage-pth", ["calibrate.py", "--ckpt", "{garbage_pth}", "--method", "rtn", "--out", "{w}/o3b"],
     "consolidated.00.pth: not a PyTorch checkpoint (it starts with", "{garbage_pth}"),
    ("cal-unfinished-calib-as-ckpt", ["calibrate.py", "--ckpt", "{unfinished_cal}", "--method", "rtn", "--out", "{w}/o4"],
     "unfinished calibration", "{unfinished_cal}"),
    ("cal-unfinished-ft-as-ckpt", ["calibrate.py", "--ckpt", "{unfinished_ft}", "--method", "rtn", "--out", "{w}/o5"],
     "unfinished finetuning", "{unfinished_ft}"),
    ("cal-quantized-as-ckpt", ["calibrate.py", "--ckpt", "{qlora}", "--method", "rtn", "--out", "{w}/o6"],
     "already quantized", "{qlora}"),
    ("cal-saliency-of-another-model", ["calibrate.py", "--ckpt", "{tiny}", "--saliency", "{other_saliency}", *CAL,
                                       "--out", "{w}/o7"], "computed for another model", "{other_saliency}"),
    ("cal-saliency-block-missing", ["calibrate.py", "--ckpt", "{tiny}", "--saliency", "{holey_saliency}", *CAL,
                                    "--out", "{w}/o8"], "block_002.safetensors is missing", "{holey_saliency}"),
    ("cal-saliency-block-truncated", ["calibrate.py", "--ckpt", "{tiny}", "--saliency", "{truncated_saliency}", *CAL,
                                      "--out", "{w}/o9"], "truncated or corrupt", "{truncated_saliency}"),
    ("cal-saliency-unfinished", ["calibrate.py", "--ckpt", "{tiny}", "--saliency", "{w}", *CAL, "--out", "{w}/o10"],
     "no saliency.json", None),
    ("cal-resume-other-bits", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--bits", "3", "--out", "{unfinished_cal}"],
     "other settings (bits: 2 there, 3 now", "{unfinished_cal}"),
    ("cal-resume-other-group", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--group-size", "16", "--out",
                                "{unfinished_cal}"], "group_size: 32 there, 16 now", "{unfinished_cal}"),
    ("cal-resume-corrupt-progress", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--out", "{corrupt_progress}"],
     "progress.json is corrupt", "{corrupt_progress}"),
    ("cal-zero-windows", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--nsamples", "0", "--out", "{w}/o11"],
     "must be positive", None),
    ("cal-negative-epochs", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--epochs", "-3", "--out", "{w}/o12"],
     "must be positive", None),
    ("cal-seqlen-beyond-model", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--seqlen", "100000", "--out", "{w}/o13"],
     "beyond the model's context of 256", None),
    ("cal-rank-above-dim", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--rank", "1000", "--out", "{w}/o14"],
     "--rank 1000 is above the dimensions", None),
    ("cal-loftq-rank-above-dim", ["calibrate.py", "--ckpt", "{tiny}", "--method", "loftq", "--group-size", "32",
                                  "--rank", "65", "--out", "{w}/o15"], "--rank 65 is above", None),
    ("cal-cuda-without-cuda", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--device", "cuda", "--out", "{w}/o16"],
     "sees no CUDA GPU", None),
    ("cal-empty-data-dir", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--data-dir", "{empty}", "--out", "{w}/o17"],
     "no WikiText-2 train file", None),
    ("cal-missing-data-dir", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--data-dir", "{w}/nodata", "--out", "{w}/o18"],
     "does not exist", None),
    ("cal-out-under-a-file", ["calibrate.py", "--ckpt", "{tiny}", "--method", "rtn", "--out", "{garbage_gguf}/x"],
     "cannot write", "{garbage_gguf}"),
    ("cal-out-finished", ["calibrate.py", "--ckpt", "{tiny}", "--method", "rtn", *TINY, "--out", "{qlora}"],
     "already holds a finished model", "{qlora}"),
    ("cal-bits-9", ["calibrate.py", "--ckpt", "{tiny}", "--method", "rtn", "--bits", "9", "--out", "{w}/o19"],
     "bits must be an integer in 1..8", None),
    ("cal-bits-0", ["calibrate.py", "--ckpt", "{tiny}", "--method", "rtn", "--bits", "0", "--out", "{w}/o22"],
     "bits must be an integer in 1..8", None),
    ("cal-more-windows-than-text", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--nsamples", "100000", "--seqlen", "64",
                                    "--out", "{w}/o23"], "lower --nsamples or --seqlen", None),
    ("cal-out-unwritable", ["calibrate.py", "--ckpt", "{tiny}", "--method", "rtn", "--out", "/proc/apiq-cannot-write"],
     "cannot write", None),
    ("cal-group-not-dividing", ["calibrate.py", "--ckpt", "{tiny}", "--method", "rtn", "--group-size", "48", "--out",
                                "{w}/o20"], "does not divide", None),
    ("cal-c4-share-unmixed", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--c4-share", "0.25", "--out", "{w}/o24"],
     "--c4-share mixes the two texts", None),
    ("cal-c4-share-no-window", ["calibrate.py", "--ckpt", "{tiny}", *CAL, "--dataset", "wikitext2+c4", "--c4-share",
                                "0.2", "--out", "{w}/o25"], "choose it in (0, 1)", None),
    ("cal-lw-rank-0", ["calibrate.py", "--ckpt", "{tiny}", "--method", "lw", "--rank", "0", "--out", "{w}/o21"],
     "needs a LoRA rank > 0", None),
    ("cal-bits-not-a-number", ["calibrate.py", "--bits", "two"], "argument --bits: invalid int value", None),
    ("cal-unknown-method", ["calibrate.py", "--method", "gptq"], "argument --method: invalid choice", None),
    # saliency.py, one process and torchrun
    ("sal-zero-windows", ["saliency.py", "--ckpt", "{tiny}", "--nsamples", "0", "--out", "{w}/s1"], "must be positive", None),
    ("sal-seqlen-1", ["saliency.py", "--ckpt", "{tiny}", "--seqlen", "1", "--out", "{w}/s2"], "at least 2", None),
    ("sal-seqlen-beyond-model", ["saliency.py", "--ckpt", "{tiny}", "--seqlen", "4096", "--out", "{w}/s3"],
     "beyond the model's context", None),
    ("sal-quantized-ckpt", ["saliency.py", "--ckpt", "{qlora}", "--nsamples", "2", "--seqlen", "32", "--out", "{w}/s4"],
     "already quantized", "{qlora}"),
    ("sal-out-finished", ["saliency.py", "--ckpt", "{tiny}", "--nsamples", "2", "--seqlen", "32", "--out",
                          "{saliency}"], "already holds a finished saliency", "{saliency}"),
    ("sal-fp16", ["saliency.py", "--ckpt", "{tiny}", "--dtype", "fp16"], "argument --dtype: invalid choice", None),
    ("sal-cuda-without-cuda", ["saliency.py", "--ckpt", "{tiny}", "--device", "cuda", "--out", "{w}/s5"],
     "sees no CUDA GPU", None),
    ("sal-torchrun-fewer-windows-than-ranks", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                               "saliency.py", "--ckpt", "{tiny}", "--nsamples", "1", "--seqlen", "32",
                                               "--threads", "1", "--out", "{w}/s6"],
     "fewer than the 2 torchrun processes", None),
    # finetune.py
    ("ft-fp-without-fp-lora", ["finetune.py", "--ckpt", "{tiny}", *FT, "--out", "{w}/f1"],
     "is full precision: calibrate it first", None),
    ("ft-empty-dir-as-ckpt", ["finetune.py", "--ckpt", "{empty}", *FT, "--out", "{w}/f9"], "not a checkpoint", None),
    ("ft-unfinished-calibration", ["finetune.py", "--ckpt", "{unfinished_cal}", *FT, "--out", "{w}/f2"],
     "unfinished calibration", "{unfinished_cal}"),
    ("ft-rtn-no-adapter", ["finetune.py", "--ckpt", "{rtn}", *FT, "--out", "{w}/f3"], "has no LoRA adapter", "{rtn}"),
    ("ft-resume-other-settings", ["finetune.py", "--ckpt", "{qlora}", *FT, "--lr", "0.5", "--out", "{unfinished_ft}"],
     "other settings (lr: 0.001 there, 0.5 now", "{unfinished_ft}"),
    ("ft-resume-corrupt-checkpoint", ["finetune.py", "--ckpt", "{qlora}", *FT, "--out", "{corrupt_ft}"],
     "checkpoint.pt is truncated or corrupt", "{corrupt_ft}"),
    ("ft-out-finished", ["finetune.py", "--ckpt", "{qlora}", *FT, "--out", "{finished_ft}"],
     "already holds a finished finetuning", "{finished_ft}"),
    ("ft-out-is-the-model", ["finetune.py", "--ckpt", "{qlora}", *FT, "--out", "{qlora}"],
     "is the model being finetuned", "{qlora}"),
    ("ft-zero-seqlen", ["finetune.py", "--ckpt", "{qlora}", *FT, "--seqlen", "0", "--out", "{w}/f4"],
     "--seqlen must be positive", None),
    ("ft-seqlen-one", ["finetune.py", "--ckpt", "{qlora}", *FT, "--seqlen", "1", "--out", "{w}/f11"],
     "--seqlen 1 / --eval-seqlen 64: a window needs at least 2 tokens", None),
    ("ft-seqlen-beyond-model", ["finetune.py", "--ckpt", "{qlora}", *FT, "--seqlen", "100000", "--out", "{w}/f5"],
     "beyond the model's context", None),
    ("ft-missing-text", ["finetune.py", "--ckpt", "{qlora}", *FT, "--data", "{w}/none.txt", "--out", "{w}/f6"],
     "not wikitext2, wikitext2+valid, c4 or a .txt / .jsonl file", None),
    ("ft-fp-lora-rank-above-dim", ["finetune.py", "--ckpt", "{tiny}", "--fp-lora", *FT, "--rank", "100",
                                   "--out", "{w}/f7"], "--rank 100 is above", None),
    ("ft-negative-lr", ["finetune.py", "--ckpt", "{qlora}", *FT, "--lr", "-1", "--out", "{w}/f8"],
     "--lr must be positive", None),
    ("ft-zero-lr", ["finetune.py", "--ckpt", "{qlora}", *FT, "--lr", "0", "--out", "{w}/f10"], "--lr must be positive",
     None),
    ("ft-text-shorter-than-a-window", ["finetune.py", "--ckpt", "{qlora}", *FT, "--data", "{short_txt}", "--out",
                                      "{w}/f11"], "fewer than one window", "{short_txt}"),
    ("ft-out-unwritable", ["finetune.py", "--ckpt", "{qlora}", *FT, "--out", "/proc/apiq-cannot-write"], "cannot write",
     None),
    # export.py
    ("export-fp-checkpoint", ["export.py", "{tiny}", "{w}/e1"], "not a quantized model", "{tiny}"),
    ("export-unfinished-calibration", ["export.py", "{unfinished_cal}", "{w}/e2"], "unfinished calibration",
     "{unfinished_cal}"),
    ("export-unfinished-finetuning", ["export.py", "{unfinished_ft}", "{w}/e3"], "unfinished finetuning",
     "{unfinished_ft}"),
    ("export-truncated-model", ["export.py", "{truncated_model}", "{w}/e4"], "truncated or corrupt",
     "{truncated_model}"),
    ("export-existing-target", ["export.py", "{qlora}", "{finished_ft}"], "exists and is not empty", "{finished_ft}"),
    ("export-target-under-a-file", ["export.py", "{qlora}", "{garbage_gguf}/x"], "cannot write", "{garbage_gguf}"),
    ("export-target-is-a-file", ["export.py", "{qlora}", "{garbage_gguf}"], "is a file", "{garbage_gguf}"),
    # evaluate.py
    ("eval-missing-ckpt", ["evaluate.py", "--ckpt", "{w}/nope"], "not found", None),
    ("eval-zero-limit", ["evaluate.py", "--ckpt", "{tiny}", "--limit", "0"], "must be positive", None),
    ("eval-unknown-task", ["evaluate.py", "--ckpt", "{tiny}", "--ppl", "", "--tasks", "arc_easy,boolq"],
     "unknown task 'boolq'", None),
    ("eval-unknown-dataset", ["evaluate.py", "--ckpt", "{tiny}", "--ppl", "wikitext3"], "unknown dataset 'wikitext3'",
     None),
    ("eval-missing-data-dir", ["evaluate.py", "--ckpt", "{tiny}", "--seqlen", "64", "--data-dir", "{w}/nodata"],
     "does not exist", None),
    ("eval-dir-not-a-checkpoint", ["evaluate.py", "--ckpt", "{empty}", "--ppl", ""], "not a checkpoint", None),
    ("eval-unfinished-calibration", ["evaluate.py", "--ckpt", "{unfinished_cal}", "--ppl", ""],
     "unfinished calibration", "{unfinished_cal}"),
    ("eval-truncated-model", ["evaluate.py", "--ckpt", "{truncated_model}", "--ppl", ""], "truncated or corrupt",
     "{truncated_model}"),
    ("eval-model-of-another-shape", ["evaluate.py", "--ckpt", "{other_shape}", "--ppl", ""], "made for another model",
     "{other_shape}"),
    ("eval-seqlen-one", ["evaluate.py", "--ckpt", "{tiny}", "--ppl", "wikitext2", "--seqlen", "1", "--limit", "1"],
     "--seqlen 1: a perplexity window needs at least 2 tokens", None),
    ("eval-seqlen-beyond-model", ["evaluate.py", "--ckpt", "{tiny}", "--seqlen", "100000"], "beyond the model", None),
    ("eval-cuda-without-cuda", ["evaluate.py", "--ckpt", "{tiny}", "--device", "cuda"], "sees no CUDA GPU", None),
    ("eval-unfinished-finetuning", ["evaluate.py", "--ckpt", "{unfinished_ft}", "--ppl", ""], "unfinished finetuning",
     "{unfinished_ft}"),
    # the plots
    ("plot-adapters-empty", ["plots/adapters.py", "{empty}", "--out", "{w}/p1.png"], "no saved", None),
    ("plot-act-error-missing", ["plots/act_error.py", "{w}/nothing", "--out", "{w}/p2.png"], "nothing", None),
    ("plot-ppl-bits-empty", ["plots/ppl_bits.py", "{empty}", "--out", "{w}/p3.png"], "{empty}", None),
    ("plot-finetune-empty", ["plots/finetune.py", "{empty}", "--out", "{w}/p4.png"], "{empty}", None),
    ("plot-saliency-study-empty", ["plots/saliency_study.py", "{empty}", "--out", "{w}/p5.png"], "{empty}", None),
]


def digest(path: Path) -> str:
    """Names, sizes and bytes of everything under path (a file or a directory)."""
    h = hashlib.sha256()
    for f in sorted([path] if path.is_file() else path.rglob("*")):
        h.update(str(f.relative_to(path.parent)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def truncate(f: Path, keep=0.5):
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    """The inputs the cases need: models, finished and unfinished runs, broken files."""
    w = tmp_path_factory.mktemp("bad")
    sh = lambda *a: subprocess.run([PY, *map(str, a)], cwd=ROOT, capture_output=True, text=True, check=True)  # noqa: E731
    p = {"w": w, "tiny": tiny_ckpt, "empty": w / "empty"}
    p["empty"].mkdir()
    p["garbage_gguf"] = w / "garbage.gguf"
    p["garbage_gguf"].write_bytes(b"GGUF" + os.urandom(5000))
    p["truncated_pth"] = w / "truncated-tiny"
    shutil.copytree(tiny_ckpt, p["truncated_pth"], symlinks=True)
    truncate(p["truncated_pth"] / "consolidated.00.pth")
    p["garbage_pth"] = w / "garbage-tiny"                   # a file that is simply not a checkpoint
    shutil.copytree(tiny_ckpt, p["garbage_pth"], symlinks=True)
    (p["garbage_pth"] / "consolidated.00.pth").write_bytes(b"\x00\x01garbage" + os.urandom(5000))
    p["qlora"], p["rtn"] = w / "qlora", w / "rtn"
    p["unfinished_cal"], p["saliency"] = w / "unfinished-cal", w / "saliency"
    with ThreadPoolExecutor(3) as pool:                     # the runs that need nothing but the checkpoint
        list(pool.map(lambda f: f(), [
            lambda: quantize_tiny(tiny_ckpt, p["qlora"], "qlora", 2),
            lambda: quantize_tiny(tiny_ckpt, p["rtn"], "rtn", 2),
            lambda: sh("calibrate.py", "--ckpt", tiny_ckpt, *CAL, "--stop-after", "1", "--out", p["unfinished_cal"]),
            lambda: sh("saliency.py", "--ckpt", tiny_ckpt, "--nsamples", "2", "--seqlen", "32", "--threads", "1",
                       "--out", p["saliency"])]))
    p["truncated_model"] = w / "truncated-qlora"
    shutil.copytree(p["qlora"], p["truncated_model"])
    truncate(p["truncated_model"] / "model.safetensors")
    p["other_shape"] = w / "other-shape"                    # the tensors of this model under a wider one's config
    shutil.copytree(p["qlora"], p["other_shape"])
    cfg = json.loads((p["other_shape"] / "apiq.json").read_text())
    cfg["model_args"]["hidden_dim"] = 1024
    (p["other_shape"] / "apiq.json").write_text(json.dumps(cfg))
    p["short_txt"] = w / "short.txt"
    p["short_txt"].write_text("too short")
    p["corrupt_progress"] = w / "corrupt-progress"
    shutil.copytree(p["unfinished_cal"], p["corrupt_progress"])
    (p["corrupt_progress"] / "progress.json").write_text('{"settings": {"bits"')
    p["finished_ft"] = w / "finished-ft"
    sh("finetune.py", "--ckpt", p["qlora"], *FT, "--lr", "1e-3", "--max-steps", "1", "--out", p["finished_ft"])
    p["unfinished_ft"] = w / "unfinished-ft"
    shutil.copytree(p["finished_ft"], p["unfinished_ft"])
    for f in ("finetune_log.json", "apiq.json", "model.safetensors"):     # as a kill between checkpoints leaves it
        (p["unfinished_ft"] / f).unlink()
    import finetune
    cfg = finetune.make_config(ckpt=str(p["qlora"]), **{k.lstrip("-").replace("-", "_"): v for k, v in
                                                       zip(FT[::2], map(int, FT[1::2])) if k != "--threads"}, lr=1e-3,
                               max_steps=1)
    from cli import result_settings
    finetune.save_checkpoint(p["unfinished_ft"], 1, result_settings(cfg), {}, torch.optim.SGD([torch.zeros(1)], lr=1),
                             [], 0.0)
    p["corrupt_ft"] = w / "corrupt-ft"
    shutil.copytree(p["unfinished_ft"], p["corrupt_ft"])
    truncate(p["corrupt_ft"] / "checkpoint.pt")
    p["other_saliency"] = w / "other-saliency"
    shutil.copytree(p["saliency"], p["other_saliency"])
    meta = json.loads((p["other_saliency"] / "saliency.json").read_text())
    meta["model"]["dim"] = 128
    (p["other_saliency"] / "saliency.json").write_text(json.dumps(meta))
    p["holey_saliency"] = w / "holey-saliency"
    shutil.copytree(p["saliency"], p["holey_saliency"])
    (p["holey_saliency"] / "block_002.safetensors").unlink()
    p["truncated_saliency"] = w / "truncated-saliency"
    shutil.copytree(p["saliency"], p["truncated_saliency"])
    truncate(p["truncated_saliency"] / "block_001.safetensors")
    return p


@pytest.fixture(scope="module")
def results(world):
    """Every case run once, three at a time: {id: (CompletedProcess, digest before, digest after)}."""
    def one(case):
        name, argv, _, keep = case
        argv = [a.format(**world) for a in argv]
        kept = Path(keep.format(**world)) if keep else None
        before = digest(kept) if kept else None
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        r = subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        return name, (r, before, digest(kept) if kept else None)
    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("name,argv,words,keep", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(results, world, name, argv, words, keep):
    r, before, after = results[name]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0, (argv, r.stdout[-2000:], r.stderr[-2000:])
    if "torch.distributed.run" in argv:
        # one line from each rank, no traceback of ours; the launcher then prints its own report of the
        # ranks' exit codes (ChildFailedError, with torch's own stack), which no script can silence
        ours = [line for line in r.stderr.splitlines() if line.strip().startswith('File "')
                and Path(line.split('"')[1]).parent == ROOT]
        assert len(errors) == 2 and len(set(errors)) == 1 and not ours, r.stderr[-3000:]
    else:
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])     # cli.run's and argparse's code for bad input
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert len(errors) == 1, r.stderr[-3000:]
    assert words.format(**world) in errors[0], errors
    assert before == after, f"{keep} changed"


def test_no_data_offline_is_one_line(tmp_path, tiny_ckpt):
    """A clone with no ../shared/data beside it, no --data-dir, the dataset hub unreachable (there is
    no network here; HF_DATASETS_OFFLINE makes it so anywhere): one line naming --data-dir and
    APIQ_DATA_DIR, at once rather than after the hub's retries."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, clone)
    env = {k: v for k, v in os.environ.items() if k != "APIQ_DATA_DIR"} | {"HF_DATASETS_OFFLINE": "1",
                                                                           "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    r = subprocess.run([PY, "calibrate.py", "--ckpt", str(tiny_ckpt), *CAL, "--out", str(tmp_path / "o")], cwd=clone,
                       capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and "--data-dir" in errors[0] and "APIQ_DATA_DIR" in errors[0], errors
    assert time.time() - t0 < 60


# ---- faults: kill -9 and Ctrl-C

def sigint_default():
    """For Popen(preexec_fn=...): Ctrl-C reaches the child even when the suite runs as a background job
    (a shell without job control starts those with SIGINT ignored, and Python then keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(cond, proc, timeout=120, poll=0.005):
    """True once cond() holds, False if proc ended first; poll=0 busy-waits (a moment that lasts
    only milliseconds on a fast machine)."""
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            raise TimeoutError("the run never reached the moment to interrupt it")
        if poll:
            time.sleep(poll)
    return True


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_finetune_resumes_to_the_same_adapter(world, tmp_path, sig):
    cmd = ["finetune.py", "--ckpt", str(world["qlora"]), *FT, "--max-steps", "6", "--save-every", "1"]
    whole = tmp_path / "whole"
    subprocess.run([PY, *cmd, "--out", str(whole)], cwd=ROOT, check=True, capture_output=True)
    for delay in (0.3, 0.05, 0.0):                                         # inside a later step; sooner if it finished first
        cut = tmp_path / f"cut-{delay}"
        proc = subprocess.Popen([PY, *cmd, "--out", str(cut)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
        reached = wait_for(lambda: (cut / "checkpoint.pt").exists(), proc, poll=0)
        assert reached, "the run finished before a checkpoint appeared"
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
    assert proc.returncode in (-9, 130), err[-2000:]
    if sig == signal.SIGINT:
        assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not (cut / "finetune_log.json").exists() and not (cut / "apiq.json").exists()
    r = subprocess.run([PY, *cmd, "--out", str(cut)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-2000:]
    a, b = tensors(whole), tensors(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_export_leaves_nothing_that_looks_complete(world, tmp_path, sig):
    out = tmp_path / "hf"
    cmd = [PY, "export.py", str(world["qlora"]), str(out)]
    partial = tmp_path / ".hf.partial"
    interrupted = False
    for delay in (0.0, 0.02, 0.1):                 # at different moments of the writing
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=sigint_default)
        if wait_for(partial.exists, proc, poll=0):
            time.sleep(delay)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:                   # it finished first: a complete export, removed for the next try
            assert (out / "base" / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
            shutil.rmtree(out)
            continue
        interrupted = True
        # 130: Ctrl-C inside the script; -2: it came as the interpreter exited, after a finished export
        assert proc.returncode in (-9, 130) or (proc.returncode == -2 and (out / "base" / "config.json").exists()), \
            (proc.returncode, err[-2000:])
        if out.exists():                           # the rename had happened: then it is whole
            assert (out / "base" / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
            shutil.rmtree(out)
        if sig == signal.SIGINT:
            assert not partial.exists() and "Traceback" not in err, err[-2000:]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)        # the same command finishes it
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / "base" / "config.json").exists() and not partial.exists()
        shutil.rmtree(out)
    assert interrupted, "every export finished before the signal: nothing was tested"
