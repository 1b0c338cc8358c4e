"""Run bookkeeping of calibrate.py, saliency.py and finetune.py: output directory names, resuming
a killed run with the same settings, the per-block files (calibrated blocks, saliency), the
per-block log, finetuning checkpoints. Every file goes through cli.atomic_write, and the file
that marks a run finished (apiq.json, saliency.json, finetune_log.json) is written last.

    OUT/blocks/block_NNN.safetensors + OUT/progress.json     a calibration under way (calibrate.py)
    OUT/block_NNN.safetensors + OUT/saliency.json             a saliency directory (saliency.py)
    OUT/checkpoint.pt                                         a finetuning under way (finetune.py)

    python -c "import runs; print(runs.output_dir(None, 'smollm2-135m', 'out/{name}-apiq-bw'))"
"""
import copy
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from tqdm import tqdm

from cli import atomic_write, write_json
from llama import LINEARS
from lora import QuantLinear, quant_linears, weight_errors
from qmodel import METHODS, linear_part, linear_tensors
from recipes import CALIBRATE_PRESETS

SALIENCY_FORMAT = "apiq-saliency-v1"
CHUNK = 4  # windows at a time in block_errors
SHAPE_KEYS = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")


# ---- names and resuming

def output_dir(out, ckpt, pattern) -> Path:
    """--out when given, else `pattern` filled with {name}: the checkpoint's file or directory
    name (.gguf dropped) or the checkpoint name as given, and {path}: the checkpoint as given."""
    if out:
        return Path(out)
    name = Path(ckpt).name.removesuffix(".gguf") if Path(ckpt).exists() else ckpt
    return Path(pattern.format(name=name, path=str(ckpt).rstrip("/")))


def refuse_finished(out: Path, marker: str, what: str):
    if (out / marker).exists():
        raise ValueError(f"{out} already holds a finished {what}: choose another --out (nothing was overwritten)")


def check_same_settings(out: Path, old: dict, settings: dict):
    """A run continues in OUT only with the settings that started it."""
    diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}): use the same settings "
                         f"to continue it or another --out (nothing was overwritten)")


# ---- calibrate.py: blocks, their log, what apiq.json records

def resume_blocks(out: Path, settings: dict) -> list:
    """The per-block logs of the finished blocks of an earlier run of the same settings in OUT."""
    refuse_finished(out, "apiq.json", "model")
    progress = out / "progress.json"
    if not progress.exists():
        return []
    try:
        old = json.loads(progress.read_text())
        old_settings, blocks = old["settings"], old["blocks"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{progress} is corrupt ({e}): delete {out} to start this calibration over") from None
    check_same_settings(out, old_settings, settings)
    print(f"resuming {out}: {len(blocks)} block(s) already calibrated")
    return blocks


def save_block(out: Path, l: int, qblock):
    tensors = {k: v for name, m in quant_linears(qblock) for k, v in linear_tensors(name, m).items()}
    atomic_write(out / "blocks" / f"block_{l:03d}.safetensors", lambda tmp: save_file(tensors, tmp))


def save_progress(out: Path, settings: dict, logs: list):
    write_json(out / "progress.json", {"settings": settings, "blocks": logs})


def load_block(out: Path, l: int, fp_block, bits, group_size, lora_alpha, device):
    """The quantized block l of an earlier run, as calibrate.calibrate_block returned it."""
    f = out / "blocks" / f"block_{l:03d}.safetensors"
    try:
        t = load_file(str(f), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f} is missing or corrupt ({e}): delete {out} to start this calibration over") from None
    qblock = copy.deepcopy(fp_block, memo={id(p): p for p in fp_block.parameters()})
    for name in LINEARS:
        m = QuantLinear.from_export(linear_part(t, name), bits, group_size, lora_alpha,
                                    weight=fp_block.get_submodule(name).weight, device=device)
        m.cache_qweight()
        qblock.set_submodule(name, m)
    return qblock


def block_errors(qblock, fp_block, Y, Xq_next, mse_before) -> dict:
    """What progress.json and calib_log.json record of a block's errors: its activation error before
    and after (mse_before: at the start), also relative to the target's mean square (SmolLM2 grows
    a huge hidden-state channel at block 11), and its weight error."""
    sq_err = sq_ref = 0.0
    for i in range(0, len(Y), CHUNK):            # in chunks: no fp32 copy of all of (n, T, dim) on the device
        y = Y[i:i + CHUNK].float()
        sq_err += (Xq_next[i:i + CHUNK].float() - y).pow(2).sum().item()
        sq_ref += y.pow(2).sum().item()
    mse_after, target_ms = sq_err / Y.numel(), sq_ref / Y.numel()
    return {"mse_before": mse_before, "mse_after": mse_after, "target_ms": target_ms,
            "rel_before": mse_before / target_ms, "rel_after": mse_after / target_ms,
            "weight_error": math.sqrt(sum(r["error"] ** 2 for r in weight_errors(qblock, fp_block)))}


def print_log(log, n_layers, prev_target_ms):
    line = (f"block {log['block']:2d}/{n_layers}: mse {log['mse_before']:.4g} -> {log['mse_after']:.4g} "
            f"(rel {log['rel_before']:.3%} -> {log['rel_after']:.3%}), {log['seconds']:.1f} s, "
            f"peak {log['peak_gib']:.2f} GiB")
    if log["retries"]:
        line += f", retried {log['retries']}x"
    if "penalty" in log:
        line += f", penalty {log['penalty']:.4g} ({log['penalty_over_mse']:.3g} x mse)"
    if prev_target_ms and log["target_ms"] > 10 * prev_target_ms:
        line += (f"\n  (the hidden states' mean square grew x{log['target_ms'] / prev_target_ms:.0f} here: a few "
                 f"huge channels appear, so the absolute mse jumps; the relative error compares blocks)")
    tqdm.write(line)


# the settings of calibration on data, which the data-free inits do not use
DATA_SETTINGS = ("nsamples", "seqlen", "epochs", "batch_size", "seed", "lr_clip", "lr_lora", "wd", "aug_loss",
                 "dataset", "saliency", "sal_lambda", "sal_multiplier", "sal_variant", "weight_penalty", "sal_ratio",
                 "lr_schedule", "learn_rounding", "lr_round", "sign_steps", "best_step", "e2e_epochs",
                 "e2e_lr_scale", "e2e_lr_lora", "e2e_loss", "lora_init", "stop_after",
                 "data_dir", *CALIBRATE_PRESETS)


def made_by(settings: dict, **extra) -> dict:
    """What apiq.json records of how the model was made: the method, the checkpoint and the
    settings (calibrate.py's, as a dict) that this method uses."""
    method = METHODS[settings["method"]]
    skip = set(method.unused) | (set(DATA_SETTINGS) if method.data_free else set())
    return {"method": method.name, "source": settings["ckpt"],
            "made_by": {k: v for k, v in settings.items() if k not in skip}, **extra}


# ---- saliency.py: a directory of per-block alphas

def model_shape(args) -> dict:
    return {k: getattr(args, k) for k in SHAPE_KEYS}


def save_saliency_block(out, l, block) -> dict:
    """Write block l's alphas ({linear name: alpha}) atomically; returns its stats for saliency.json."""
    data = save({n: a.detach().cpu().contiguous() for n, a in block.items()})  # one block's bytes
    atomic_write(Path(out) / f"block_{l:03d}.safetensors", data)
    total = sum(a.double().sum().item() for a in block.values())
    count = sum(a.numel() for a in block.values())
    return {"block": l, "mean": total / count, "max": max(a.max().item() for a in block.values()),
            "zero_fraction": sum((a == 0).sum().item() for a in block.values()) / count,
            "linear_mean": {n: a.double().mean().item() for n, a in block.items()}}


def load_block_saliency(path, l) -> dict:
    """{linear name: alpha (out, in) fp32} of block l."""
    f = Path(path) / f"block_{l:03d}.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f} does not exist: an unfinished or foreign saliency directory")
    return {n: a.float() for n, a in load_file(str(f)).items()}


def check_saliency(path, model) -> dict:
    """The saliency.json of `path`, after checking that it was computed for this model's shape."""
    path = Path(path)
    if not (path / "saliency.json").exists():
        raise FileNotFoundError(f"--saliency {path}: no saliency.json there (not a saliency directory, or "
                                f"saliency.py did not finish)")
    try:
        meta = json.loads((path / "saliency.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--saliency {path}: saliency.json is truncated or corrupt ({e})") from None
    have, want = meta.get("model", {}), model_shape(model.args)
    diff = [f"{k} {have.get(k)} there, {v} here" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise ValueError(f"--saliency {path} was computed for another model ({meta.get('ckpt')}: "
                         f"{', '.join(diff)}): run saliency.py on this checkpoint")
    for l, layer in enumerate(model.layers):   # headers only: cheap
        f = path / f"block_{l:03d}.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"--saliency {path}: {f.name} is missing")
        try:
            with safe_open(str(f), framework="pt") as st:
                shapes = {name: tuple(st.get_slice(name).get_shape()) for name in st.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"--saliency {path}: {f.name} is truncated or corrupt ({e})") from None
        for name in LINEARS:
            shape = tuple(layer.get_submodule(name).weight.shape)
            if shapes.get(name) != shape:
                raise ValueError(f"--saliency {path}: {f.name} {name} has shape {shapes.get(name)}, the model's "
                                 f"layers.{l}.{name} has {shape}")
    return meta


# ---- finetune.py: checkpoints

def resume_finetune(out: Path, settings: dict, params: dict, opt) -> tuple[int, list, float, float]:
    """(first step, log so far, seconds spent, peak memory in GiB of the processes so far) of an earlier
    run of the same settings in OUT, its adapters and optimizer state loaded; (0, [], 0, 0) for a fresh
    start."""
    refuse_finished(out, "finetune_log.json", "finetuning")
    ckpt = out / "checkpoint.pt"
    if not ckpt.exists():
        if (out / "apiq.json").exists():
            raise ValueError(f"{out} holds a model that this finetuning did not make: choose another --out")
        return 0, [], 0.0, 0.0
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        old_settings = state["settings"]
    except Exception as e:                     # truncated zip, not a checkpoint, a foreign pickle
        raise ValueError(f"{ckpt} is truncated or corrupt ({str(e).splitlines()[0]}): delete it to start this "
                         f"finetuning over") from None
    check_same_settings(out, old_settings, settings)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["adapters"][name])
    opt.load_state_dict(state["optimizer"])
    print(f"resuming {out}: step {state['step']} done")
    return state["step"], state["log"], state["seconds"], state.get("peak_gib", 0.0)   # older checkpoints: none


def save_checkpoint(out, step, settings, params, opt, log, seconds, peak_gib=0.0):
    state = {"step": step, "settings": settings, "adapters": {k: p.detach().cpu() for k, p in params.items()},
             "optimizer": opt.state_dict(), "log": log, "seconds": seconds, "peak_gib": peak_gib}
    atomic_write(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
