"""A whole quantized model: the data-free inits of ApiQ section 3 applied to every block, the
saved format that calibrate.py writes, and load(), the one entry point that reads either a
full-precision checkpoint or a quantized model directory.

    python calibrate.py --method loftq --bits 2 --out out/smollm2-loftq-w2   # writes this format
    python evaluate.py --ckpt out/smollm2-loftq-w2                            # load() reads it

A saved model is a directory:
    apiq.json          format, ModelArgs, per-linear bits / group size / rank / lora_alpha, the
                       method and the settings that made it (written last: without it the
                       directory is not a finished model)
    model.safetensors  per linear `<name>.qweight` (codes packed by quant.pack), `.scale` (fp32),
                       `.zero` (smallest int type that holds it), `.A`, `.B` (fp32); the parts
                       that stay full precision (embeddings, norms, head) in fp16 (bf16 if the
                       model is bf16)
    tokenizer.model | tokenizer.json   the tokenizer, so the directory stands alone
safetensors holds only tensors: loading it never runs code (no pickle).
"""
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import checkpoints
import llama
from cli import atomic_write, write_json
from lora import QuantLinear, init_linear, is_quantized, quant_linears, swap_linears
from quant import validate
from tokenizer import GGUFTokenizer, Llama3Tokenizer, SentencePieceTokenizer



class Method(NamedTuple):
    name: str            # in apiq.json, the default output directories and the result files
    label: str           # in the figures
    data_free: bool      # a pure function of W (lora.py's inits, quantize_model) or calibrated on data
    unused: tuple        # the calibrate.py settings it does not use, left out of apiq.json


# every way calibrate.py makes a model (--method), in the paper's order: the one list that
# calibrate.py, runs.py and plots/ read
METHODS = {
    "rtn": Method("rtn", "RTN", True, ("rank", "lora_alpha", "loftq_iters")),
    "qlora": Method("qlora", "QLoRA", True, ("loftq_iters",)),
    "loftq": Method("loftq", "LoftQ", True, ()),
    "lw": Method("apiq-lw", "ApiQ-lw", False, ("loftq_iters",)),
    "bw": Method("apiq-bw", "ApiQ-bw", False, ("loftq_iters",)),
}
INITS = tuple(k for k, m in METHODS.items() if m.data_free)
FORMAT = "apiq-quantized-v1"


def keep_dtype(model) -> torch.dtype:
    """Storage dtype of the parts that are not quantized."""
    return torch.bfloat16 if model.tok_embeddings.weight.dtype == torch.bfloat16 else torch.float16


def is_kept(name: str) -> bool:
    """Embeddings, norms and head stay full precision; the seven linears of each block do not."""
    return ".attention.w" not in name and ".feed_forward.w" not in name


def round_kept_params(model):
    """Round embeddings, norms and head to their storage dtype in memory too, so a saved and
    reloaded model gives exactly the logits of the model that was saved."""
    dt = keep_dtype(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_kept(name) and p.dtype != dt:
                p.copy_(p.to(dt))
    return model


def require_fp(model, what):
    if is_quantized(model):
        raise ValueError(f"{what} is already quantized: give the full-precision checkpoint")


def check_linears(model, group_size, rank=0):
    """Every block linear must split into groups of group_size inputs and hold a rank-`rank` adapter."""
    for l, layer in enumerate(model.layers):
        for name in llama.LINEARS:
            lin = layer.get_submodule(name)
            if group_size <= 0 or lin.in_features % group_size:
                raise ValueError(f"--group-size {group_size} does not divide the {lin.in_features} inputs of "
                                 f"layers.{l}.{name}")
            if rank > min(lin.in_features, lin.out_features):
                raise ValueError(f"--rank {rank} is above the dimensions of layers.{l}.{name} "
                                 f"({lin.out_features} x {lin.in_features}): a rank-r adapter needs r <= both")


@torch.no_grad()
def quantize_model(model, method, bits=2, group_size=64, rank=64, lora_alpha=16.0, loftq_iters=5, device=None,
                   cache=True):
    """Swap every block's seven linears for QuantLinear made by a data-free init, in place:
    rtn = RTN with no adapter; qlora = RTN, B = 0; loftq = T alternating RTN / SVD steps.
    device: where each block is quantized (LoftQ's SVDs on the GPU), one block at a time; the
    model stays where it is. cache=False keeps only the codes (enough to save)."""
    if method not in INITS:
        raise ValueError(f"unknown init {method!r}: choose from {', '.join(INITS)}")
    validate(bits, group_size, group_size)
    check_linears(model, group_size)
    round_kept_params(model)
    home = model.tok_embeddings.weight.device
    for block in tqdm(model.layers, desc=f"{method} w{bits}g{group_size}", unit="block", leave=False):
        block.to(device or home)
        for m in swap_linears(block, lambda lin: init_linear(lin, method, bits, group_size, rank, lora_alpha,
                                                             loftq_iters)).values():
            m.weight = None        # W is not needed any more; Q(W) is in the codes
            if cache:
                m.cache_qweight()
        block.to(home)
    return model


def int_dtype(t: torch.Tensor) -> torch.dtype:
    for dt in (torch.int8, torch.int16):
        if torch.iinfo(dt).min <= t.min() and t.max() <= torch.iinfo(dt).max:
            return dt
    return torch.int32


def linear_tensors(name, m) -> dict:
    """The saved tensors of one QuantLinear, keyed `<name>.<part>`."""
    ex = m.export()
    ex["zero"] = ex["zero"].to(int_dtype(ex["zero"]))
    return {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in ex.items()}


def linear_part(tensors, name) -> dict:
    """The inverse of linear_tensors: {part: tensor} of linear `name` among saved tensors."""
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}


def save_tokenizer(tok, out: Path):
    if isinstance(tok, GGUFTokenizer):
        atomic_write(out / "tokenizer.json", json.dumps(tok.spec))
    elif isinstance(tok, SentencePieceTokenizer):
        atomic_write(out / "tokenizer.model", tok.sp.serialized_model_proto())
    elif isinstance(tok, Llama3Tokenizer):
        atomic_write(out / "tokenizer.model", lambda tmp: shutil.copyfile(tok.path, tmp))
    else:
        raise ValueError(f"cannot save a tokenizer of type {type(tok).__name__}")


def save_quantized(model, tok, out, info: dict, kept: dict = None):
    """Write the directory described in the module docstring; `info` goes into apiq.json
    (method, source checkpoint, settings). apiq.json is written last. kept: the embeddings,
    norms and head to write as they are (default: the model's, in their storage dtype)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "apiq.json").unlink(missing_ok=True)
    dt = keep_dtype(model)
    tensors = dict(kept) if kept is not None else \
        {name: p.detach().to(dt).contiguous() for name, p in model.named_parameters() if is_kept(name)}
    linears = {}
    for name, m in quant_linears(model):
        tensors |= linear_tensors(name, m)
        linears[name] = dict(bits=m.bits, group_size=m.group_size, rank=m.rank, lora_alpha=m.lora_alpha,
                             shape=[m.out_features, m.in_features])
    tied = model.output.weight is model.tok_embeddings.weight
    if tied:
        tensors.pop("output.weight", None)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    save_tokenizer(tok, out)
    args = {k: v for k, v in vars(model.args).items() if k != "head_dim"}
    write_json(out / "apiq.json", {"format": FORMAT, "model_args": args, "tied_embeddings": tied,
                                   "linears": linears, **info})


def unfinished_run(path: Path):
    """(what, the script that finishes it) of a directory that a run left unfinished, or None."""
    if (path / "progress.json").exists():
        return "calibration", "calibrate.py"
    if (path / "checkpoint.pt").exists():
        return "finetuning", "finetune.py"
    return None


def read_quantized_config(path) -> dict:
    path = Path(path)
    if not (path / "apiq.json").is_file():
        if run := unfinished_run(path):
            raise ValueError(f"{path}: an unfinished {run[0]}: rerun its {run[1]} command to finish it (no apiq.json)")
        raise ValueError(f"{path}: not a quantized model (no apiq.json)")
    try:
        cfg = json.loads((path / "apiq.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}/apiq.json is truncated or corrupt ({e})") from None
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: apiq.json format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_quantized(path, device="cpu", dtype=torch.float32, cache=True):
    """(model, tok) from a saved directory. Each QuantLinear holds its packed codes, scale, zero
    and the LoRA factors, unmerged; cache=True also keeps Q(W) dequantized in `dtype` (fast; fp32:
    4 bytes a weight, bf16: 2), cache=False dequantizes in every forward (2-bit: ~2.6 bits a weight)."""

    path = Path(path)
    cfg = read_quantized_config(path)
    args = llama.ModelArgs(**cfg["model_args"])
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}/model.safetensors is truncated or corrupt ({e})") from None
    with torch.device("meta"):
        model = llama.Transformer(args)
    for name, spec in cfg["linears"].items():
        out_f, in_f = spec["shape"]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or (mod.out_features, mod.in_features) != (out_f, in_f) or f"{name}.qweight" not in t:
            raise ValueError(f"{path}: {name} does not fit this model; the directory was made for another model")
        q = QuantLinear.from_export(linear_part(t, name), spec["bits"], spec["group_size"],
                                    spec.get("lora_alpha", spec.get("alpha")), device=device)
        if cache:
            q.cache_qweight(dtype)           # in the dtype the model computes in
        model.set_submodule(name, q)
    rest = {k: v if dtype is None else v.to(dtype) for k, v in t.items() if is_kept(k)}
    missing, unexpected = llama.assign_weights(model, rest, cfg["tied_embeddings"])
    missing = [k for k in missing if is_kept(k)]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tok = GGUFTokenizer(**json.loads((path / "tokenizer.json").read_text())) \
        if (path / "tokenizer.json").exists() else checkpoints.find_tokenizer(path)
    model.requires_grad_(False)
    return model.to(device).eval(), tok


def load(ckpt="smollm2-135m", device="cpu", dtype=torch.float32, cache=True):
    """(model, tok) of a full-precision checkpoint (checkpoints.load) or of a quantized model directory
    written by calibrate.py (load_quantized): the entry point of the scripts that take either. The
    one place that tells apiq's own directories from checkpoints, an unfinished run's included."""
    path = checkpoints.resolve_ckpt(str(ckpt))
    if path.is_dir() and (path / "apiq.json").exists():
        return load_quantized(path, device, dtype, cache)
    if path.is_dir() and (run := unfinished_run(path)):
        raise ValueError(f"{path} is an unfinished {run[0]} (no apiq.json yet): rerun its {run[1]} command to "
                         f"finish it")
    return checkpoints.load(path, device, dtype)
