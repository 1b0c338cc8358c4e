"""The bit-identity check: small real runs of calibrate.py, saliency.py, finetune.py and export.py
on SmolLM2-135M, one thread, and a digest of every tensor they write, compared with the digests
in bench/results/bit_identity.json.

Each run has up to two paths:
    fast    the speed devices installed (fastpath.accelerate: calibrate.py --fast / --compile,
            finetune.py --packed)
    plain   the formulas as written in quant.py, lora.py, calibrate.py and saliency.py
The recorded digests were made by the code before the speed devices became one explicit swap
(commit ddfe3d5): "fast" by its default path (fused quantizer, fused AdamW, merged W_eff), "plain"
by the same commands with those three switched off. So a match says: the refactor changed no
number on either path. One exception, recorded again in the JSON ("rerecorded": why, and the
digests before): the plain path of the three runs with a penalty, whose distance is now eq. (2) as
written instead of the written-out gradients (the same values to fp32 rounding).

    python bench/bit_identity.py                 # run all, compare, exit 1 on a difference
    python bench/bit_identity.py --only calib-recipe
    python bench/bit_identity.py --record        # write the digests of this code (a new baseline)

About 6 minutes on one core of this project's CPU machine.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bit_identity.json"

TINY = ["--nsamples", "4", "--seqlen", "64", "--epochs", "1", "--rank", "16", "--threads", "1"]
# the CPU recipe's options (recipes.CPU_OPTIONS) on 2 windows of 128 a step: k_proj / v_proj merge W_eff
RECIPE = ["--nsamples", "4", "--seqlen", "128", "--batch-size", "2", "--epochs", "1", "--rank", "16",
          "--lora-init", "svd", "--learn-rounding", "--lr-schedule", "cosine", "--lr-lora", "2e-3",
          "--lr-clip", "1e-2", "--no-aug-loss", "--threads", "1"]
FT = ["--seqlen", "64", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "3", "--eval-limit", "1",
      "--eval-seqlen", "64", "--threads", "1"]

# name: (script, arguments ({D} is the run directory), the paths that have the fast / plain variant,
#        the outputs to digest). "fast" adds FAST[script] to the arguments.
RUNS = {
    "calib-paper": ("calibrate.py", [*TINY, "--out", "{D}/calib-paper"], ("fast", "plain"), ["calib-paper"]),
    "calib-recipe": ("calibrate.py", [*RECIPE, "--out", "{D}/calib-recipe"], ("fast", "plain"), ["calib-recipe"]),
    "calib-compile": ("calibrate.py", [*RECIPE, "--compile", "--stop-after", "2", "--out", "{D}/calib-compile"],
                      ("fast",), ["calib-compile"]),
    "calib-lw": ("calibrate.py", [*TINY, "--method", "lw", "--stop-after", "2", "--out", "{D}/calib-lw"],
                 ("fast", "plain"), ["calib-lw"]),
    "calib-bf16": ("calibrate.py", [*TINY, "--dtype", "bf16", "--weight-penalty", "1e-3", "--sal-variant", "before",
                                    "--stop-after", "2", "--out", "{D}/calib-bf16"], ("fast", "plain"), ["calib-bf16"]),
    "saliency": ("saliency.py", ["--nsamples", "2", "--seqlen", "64", "--threads", "1", "--out", "{D}/saliency"],
                 ("plain",), ["saliency"]),
    "calib-sal-after": ("calibrate.py", [*TINY, "--saliency", "{D}/saliency", "--sal-lambda", "1e3", "--stop-after",
                                         "3", "--out", "{D}/calib-sal-after"], ("fast", "plain"), ["calib-sal-after"]),
    "calib-sal-ratio": ("calibrate.py", [*TINY, "--saliency", "{D}/saliency", "--sal-ratio", "0.3", "--sal-variant",
                                         "before", "--stop-after", "3", "--out", "{D}/calib-sal-ratio"],
                        ("fast", "plain"), ["calib-sal-ratio"]),
    "loftq-w4": ("calibrate.py", ["--method", "loftq", "--bits", "4", "--rank", "16", "--threads", "1",
                                  "--out", "{D}/loftq-w4"], ("plain",), ["loftq-w4"]),
    "finetune": ("finetune.py", ["--ckpt", "{D}/calib-recipe", *FT, "--out", "{D}/ft"], ("plain",), ["ft"]),
    "finetune-packed": ("finetune.py", ["--ckpt", "{D}/calib-recipe", *FT, "--out", "{D}/ft-packed"], ("fast",),
                        ["ft-packed"]),
    # the adapter in fp32, as the code before wrote it (fp16 is export.py's default since)
    "export-gptq": ("export.py", ["{D}/calib-recipe", "{D}/gptq", "--format", "gptq", "--adapter-dtype", "fp32"],
                    ("plain",), ["gptq"]),
    "export-hf": ("export.py", ["{D}/calib-recipe", "{D}/hf", "--adapter-dtype", "fp32"], ("plain",), ["hf"]),
    "export-gguf": ("export.py", ["{D}/loftq-w4", "{D}/gguf", "--format", "gguf", "--adapter-dtype", "fp32"],
                    ("plain",), ["gguf"]),
}
FAST = {"calibrate.py": ["--fast"], "finetune.py": ["--packed"], "saliency.py": [], "export.py": []}
# what the code before the swap ran for each path (the "fast" one was its default)
LEGACY_FAST = {"calibrate.py": [], "finetune.py": ["--packed"], "saliency.py": [], "export.py": []}


def tensor_digest(path: Path) -> str:
    """sha256 over the tensors of a safetensors file, by name: dtype, shape and bytes (not the header's
    metadata), so that only the numbers count."""
    from safetensors import safe_open
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest_dir(d: Path) -> dict:
    """{relative path: digest} of every tensor file under d (safetensors by tensor, .gguf and .pt by bytes)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.suffix == ".safetensors":
            out[str(p.relative_to(d))] = tensor_digest(p)
        elif p.suffix in (".gguf",):
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(name, path, workdir: Path, legacy=None) -> dict:
    script, args, _, outputs = RUNS[name]
    extra = (LEGACY_FAST if legacy else FAST)[script] if path == "fast" else []
    argv = [a.replace("{D}", str(workdir)) for a in args] + extra
    env = dict(os.environ, OMP_NUM_THREADS="1")
    prefix = [sys.executable] + (["-c", legacy, script] if legacy and path == "plain" and script == "calibrate.py"
                                else [script])
    r = subprocess.run(prefix + argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name}/{path} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    digests = {}
    for o in outputs:
        digests |= {f"{o}/{k}": v for k, v in digest_dir(workdir / o).items()}
    if not digests:
        raise SystemExit(f"{name}/{path}: no tensor files written")
    return digests


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--record", action="store_true", help="write this code's digests to " + str(RESULTS.relative_to(ROOT)))
    p.add_argument("--only", nargs="*", default=None, help="run names (default: all)")
    p.add_argument("--legacy", default=None, help=argparse.SUPPRESS)  # python code that runs a script with the
    #                                            old switches off (how the "plain" baseline was recorded)
    a = p.parse_args()
    names = a.only or list(RUNS)
    want = json.loads(RESULTS.read_text())["digests"] if RESULTS.exists() and not a.record else {}
    got, bad = {}, []
    with tempfile.TemporaryDirectory(prefix="apiq-bitid-") as tmp:
        for path in ("fast", "plain"):
            workdir = Path(tmp) / path
            workdir.mkdir()
            for name in RUNS:                 # in order: later runs read earlier outputs
                if path not in RUNS[name][2]:
                    need = [n for n in names if path in RUNS[n][2] and f"{{D}}/{name}" in " ".join(RUNS[n][1])]
                    if not need or (workdir / RUNS[name][3][0]).exists():
                        continue
                    run(name, RUNS[name][2][0], workdir, a.legacy)      # an input made on its own path
                    continue
                if name not in names and not any(f"{{D}}/{name}" in " ".join(RUNS[n][1]) for n in names):
                    continue
                d = run(name, path, workdir, a.legacy)
                if name not in names:
                    continue
                got[f"{name}/{path}"] = d
                if want:
                    same = want.get(f"{name}/{path}") == d
                    print(f"{name}/{path}: {'identical' if same else 'DIFFERENT'} ({len(d)} files)", flush=True)
                    if not same:
                        bad.append(f"{name}/{path}")
                else:
                    print(f"{name}/{path}: {len(d)} files", flush=True)
    if a.record:
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"note": __doc__.split("\n\n")[1]}
        data["digests"] = data.get("digests", {}) | got
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"recorded {len(got)} runs in {RESULTS}")
    elif bad:
        raise SystemExit(f"{len(bad)} of {len(got)} runs differ from {RESULTS.name}: {', '.join(bad)}")
    else:
        print(f"all {len(got)} runs bit-identical to {RESULTS.name}")


if __name__ == "__main__":
    main()
