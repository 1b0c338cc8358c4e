"""A whole quantized model: the baselines of METHOD.md §3 applied to every block, and the saved
format that calibrate.py and evaluate.py write and llama.load() reads back.

    python evaluate.py --method loftq --bits 2 --save out/smollm2-loftq-w2   # writes this format
    python evaluate.py --ckpt out/smollm2-loftq-w2                            # and reads it

A saved model is a directory:
    apiq.json          config: source checkpoint, ModelArgs, bits, group size, rank, alpha,
                       method, and how it was made
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

import torch
from torch import nn
from tqdm import tqdm

from lora import QuantLinear, loftq_linear, qlora_linear, quant_linears, swap_linears
from quant import dequantize, unpack, validate

METHODS = ("rtn", "qlora", "loftq")
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


def check_linears(model, group_size):
    for name, m in model.layers.named_modules():
        if isinstance(m, nn.Linear):
            try:
                validate(2, group_size, m.in_features)
            except ValueError:
                raise ValueError(f"--group-size {group_size} does not divide the {m.in_features} inputs "
                                 f"of layers.{name}") from None


@torch.no_grad()
def quantize_model(model, method, bits=2, group_size=64, rank=64, alpha=16.0, loftq_iters=5):
    """Swap every block's seven linears for QuantLinear initialised by `method`, in place:
    rtn = RTN with no adapter; qlora = RTN, B = 0; loftq = T alternating RTN / SVD steps."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    validate(bits, group_size, group_size)
    check_linears(model, group_size)
    round_kept_params(model)
    make = {"rtn": lambda lin: qlora_linear(lin, bits, group_size, 0, alpha),
            "qlora": lambda lin: qlora_linear(lin, bits, group_size, rank, alpha),
            "loftq": lambda lin: loftq_linear(lin, bits, group_size, rank, alpha, loftq_iters)}[method]
    for block in tqdm(model.layers, desc=f"{method} w{bits}g{group_size}", unit="block", leave=False):
        for m in swap_linears(block, make).values():
            m.freeze()  # quantize once; evaluation reuses Q(W)
    return model


def int_dtype(t: torch.Tensor) -> torch.dtype:
    for dt in (torch.int8, torch.int16):
        if torch.iinfo(dt).min <= t.min() and t.max() <= torch.iinfo(dt).max:
            return dt
    return torch.int32


def save_tokenizer(tok, out: Path):
    from tokenizer import GGUFTokenizer, Llama3Tokenizer, SentencePieceTokenizer
    if isinstance(tok, GGUFTokenizer):
        (out / "tokenizer.json").write_text(json.dumps(tok.spec))
    elif isinstance(tok, SentencePieceTokenizer):
        (out / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    elif isinstance(tok, Llama3Tokenizer):
        shutil.copyfile(tok.path, out / "tokenizer.model")
    else:
        raise ValueError(f"cannot save a tokenizer of type {type(tok).__name__}")


def save_quantized(model, tok, out, config: dict):
    """Write the directory described in the module docstring. apiq.json is written last: a
    directory without it is not a finished model (and load() refuses it)."""
    from safetensors.torch import save_file

    from cli import write_json
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "apiq.json").unlink(missing_ok=True)
    tensors, dt = {}, keep_dtype(model)
    for name, p in model.named_parameters(remove_duplicate=True):
        if is_kept(name):
            tensors[name] = p.detach().to(dt).contiguous()
    linears = {}
    for name, m in quant_linears(model):
        ex = m.export()
        ex["zero"] = ex["zero"].to(int_dtype(ex["zero"]))
        for k, v in ex.items():
            tensors[f"{name}.{k}"] = v.contiguous()
        linears[name] = dict(bits=m.bits, group_size=m.group_size, rank=m.rank, alpha=m.alpha,
                             shape=[m.out_features, m.in_features])
    tied = model.output.weight is model.tok_embeddings.weight
    if tied:
        tensors.pop("output.weight", None)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / "model.safetensors")
    save_tokenizer(tok, out)
    args = {k: v for k, v in vars(model.args).items() if k != "head_dim"}
    write_json(out / "apiq.json", {"format": FORMAT, "model_args": args, "tied_embeddings": tied,
                                   "linears": linears, **config})


def load_quantized(path, device="cpu", dtype=torch.float32):
    """(model, tok) from a saved directory; QuantLinear modules hold the dequantized Q(W)
    (frozen, no clipping logits) and the LoRA factors, unmerged."""
    from safetensors import SafetensorError, safe_open

    from llama import ModelArgs, Transformer, find_tokenizer
    from tokenizer import GGUFTokenizer
    path = Path(path)
    cfg = json.loads((path / "apiq.json").read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: apiq.json format {cfg.get('format')!r}, expected {FORMAT!r}")
    args = ModelArgs(**cfg["model_args"])
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}/model.safetensors is truncated or corrupt ({e})") from None
    with torch.device("meta"):
        model = Transformer(args)
    for name, spec in cfg["linears"].items():
        out_f, in_f = spec["shape"]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or (mod.out_features, mod.in_features) != (out_f, in_f) or f"{name}.qweight" not in t:
            raise ValueError(f"{path}: {name} does not fit this model; the directory was made for another model")
        codes = unpack(t[f"{name}.qweight"], spec["bits"], (out_f, in_f))
        # made on the device at once: Q(W) is both `weight` and the cached `w_hat`, one tensor, which
        # a later model.to(device) would copy twice
        w_hat = dequantize(codes, t[f"{name}.scale"], t[f"{name}.zero"].float(), spec["group_size"]).to(device)
        bias = t.get(f"{name}.bias")
        q = QuantLinear(w_hat, None if bias is None else bias.to(device), spec["bits"], spec["group_size"],
                        spec["rank"], spec["alpha"], clip=False, A=t[f"{name}.A"].to(device), B=t[f"{name}.B"].to(device))
        q.w_hat, q._stamp = w_hat, q._versions()  # Q(W) is what was stored: never re-quantize it
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    rest = {k: v if dtype is None else v.to(dtype) for k, v in t.items() if is_kept(k)}
    if cfg["tied_embeddings"]:
        rest["output.weight"] = rest["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if is_kept(k)]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg["tied_embeddings"]:
        model.output.weight = model.tok_embeddings.weight
    tok = GGUFTokenizer(**json.loads((path / "tokenizer.json").read_text())) \
        if (path / "tokenizer.json").exists() else find_tokenizer(path)
    return model.to(device), tok
