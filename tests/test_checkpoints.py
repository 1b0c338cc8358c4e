"""checkpoints.py: the three readers agree, Hugging Face's q/k rows are permuted back into Meta's
RoPE layout (and match transformers), names find the hub cache, bad files fail with one line."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import checkpoints
from conftest import need
from llama import ModelArgs, Transformer, apply_rotary_emb, build, precompute_freqs_cis

ROOT = Path(checkpoints.__file__).parent

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=96,
            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=128)


def hf_permute(w, n_heads):
    """transformers' convert_llama_weights_to_hf permutation (Meta rows -> HF's sliced-rotary rows)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY))
    for p in model.parameters():  # norms away from 1 so a swapped norm would show
        torch.nn.init.normal_(p, std=0.2 if p.ndim == 2 else 1.0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))


def save_meta(sd, d, shards=1):
    d.mkdir()
        # Meta states no FFN width: 2/3 * 4 * 64 = 170, * 0.5 = 85, rounded up to 32 -> 96
    (d / "params.json").write_text(json.dumps({k: TINY[k] for k in TINY if k != "hidden_dim"} |
                                              {"multiple_of": 32, "ffn_dim_multiplier": 0.5}))
    cat1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
    for s in range(shards):  # model-parallel split as Meta's 13B/70B files are
        part = {}
        for k, v in sd.items():
            if k.endswith("norm.weight"):
                part[k] = v
            else:
                part[k] = v.chunk(shards, dim=1 if k.endswith(cat1) else 0)[s].clone()
        torch.save(part, d / f"consolidated.{s:02d}.pth")


def save_hf(sd, d):
    from safetensors.torch import save_file
    d.mkdir()
    inv = {}
    for hf_key, meta_key in checkpoints.HF_NAMES.items():
        for i in range(TINY["n_layers"]):
            inv[meta_key.format(i)] = hf_key.format(i)
    out = {}
    for k, v in sd.items():
        if k.endswith("attention.wq.weight"):
            v = hf_permute(v, TINY["n_heads"])
        elif k.endswith("attention.wk.weight"):
            v = hf_permute(v, TINY["n_kv_heads"])
        out[inv[k]] = v.contiguous()
    save_file(out, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": TINY["dim"],
        "num_hidden_layers": TINY["n_layers"], "num_attention_heads": TINY["n_heads"],
        "num_key_value_heads": TINY["n_kv_heads"], "vocab_size": TINY["vocab_size"],
        "intermediate_size": TINY["hidden_dim"], "rms_norm_eps": TINY["norm_eps"],
        "rope_theta": TINY["rope_theta"], "max_position_embeddings": TINY["max_seq_len"],
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32"}))


def save_gguf(sd, f):
    import gguf
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_block_count(TINY["n_layers"])
    w.add_context_length(TINY["max_seq_len"])
    w.add_embedding_length(TINY["dim"])
    w.add_feed_forward_length(TINY["hidden_dim"])
    w.add_head_count(TINY["n_heads"])
    w.add_head_count_kv(TINY["n_kv_heads"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["norm_eps"])
    w.add_vocab_size(TINY["vocab_size"])
    inv = {}
    for g, m in checkpoints.GGUF_NAMES.items():
        for i in range(TINY["n_layers"]):
            inv[m.format(i)] = g.format(i)
    for k, v in sd.items():  # GGUF keeps Meta's q/k row order: no permutation
        w.add_tensor(inv[k], v.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_three_loaders_give_identical_logits(tiny, tmp_path):
    model, sd = tiny
    x = tokens()
    with torch.no_grad():
        ref = model(x)
    save_meta(sd, tmp_path / "meta")
    save_meta(sd, tmp_path / "meta2", shards=2)
    save_hf(sd, tmp_path / "hf")
    save_gguf(sd, tmp_path / "tiny.gguf")
    built = {
        "meta": checkpoints.meta_state_dict(tmp_path / "meta"),
        "meta, 2 shards": checkpoints.meta_state_dict(tmp_path / "meta2"),
        "hf": checkpoints.hf_state_dict(tmp_path / "hf"),
        "gguf": checkpoints.gguf_state_dict(GGUFReader(str(tmp_path / "tiny.gguf")), "tiny.gguf"),
    }
    for name, (args, state) in built.items():
        assert (args.dim, args.n_kv_heads, args.hidden_dim) == (64, 2, 96), name
        with torch.no_grad():
            out = build(args, state)(x)
        assert torch.equal(out, ref), name


def test_hf_loader_matches_transformers(tiny, tmp_path):
    """An independent implementation (transformers) on the same HF files gives the same logits."""
    transformers = need("transformers")
    _, sd = tiny
    save_hf(sd, tmp_path / "hf")
    ref_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = build(*checkpoints.hf_state_dict(tmp_path / "hf")).eval()
    x = tokens()
    with torch.no_grad():
        diff = (ours(x) - ref_model(x).logits).abs().max().item()
    assert diff < 1e-4


def test_hf_unpermute_inverts_permute_and_rope_layouts_agree():
    """Meta's adjacent-pair RoPE on Meta rows == HF's rotate-half RoPE on HF-permuted rows."""
    torch.manual_seed(0)
    n_heads, hd, T = 3, 8, 5
    w = torch.randn(n_heads * hd, 12)
    assert torch.equal(checkpoints.hf_unpermute(hf_permute(w, n_heads), n_heads), w)
    x = torch.randn(1, T, 12)
    q_meta = (x @ w.T).view(1, T, n_heads, hd)
    q_hf = (x @ hf_permute(w, n_heads).T).view(1, T, n_heads, hd)
    freqs = precompute_freqs_cis(hd, T, 10000.0)
    rot_meta, _ = apply_rotary_emb(q_meta, q_meta, freqs)
    # transformers' formula, written out: x * cos + rotate_half(x) * sin, angles repeated in halves
    ang = torch.cat([freqs.angle(), freqs.angle()], -1)[None, :, None, :]  # (1, T, 1, hd)
    half = torch.cat([-q_hf[..., hd // 2:], q_hf[..., : hd // 2]], -1)
    rot_hf = q_hf * ang.cos() + half * ang.sin()
    # the HF result is the Meta result with each head's rows in HF order
    assert torch.allclose(hf_permute(rot_meta.reshape(T, -1).T, n_heads).T.reshape(rot_hf.shape), rot_hf, atol=1e-5)


def test_bad_checkpoints_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    nollama = tmp_path / "other.gguf"
    import gguf
    w = gguf.GGUFWriter(str(nollama), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    for ckpt, words in [(str(bad), "not a readable GGUF"), (str(nollama), "architecture is 'gpt2'"),
                        ("llama2-7b-missing", "not found"), (str(tmp_path), "not a checkpoint")]:
        r = subprocess.run([sys.executable, "evaluate.py", "--ckpt", ckpt, "--ppl", ""], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_names_find_a_hugging_face_hub_cache_snapshot(tiny, tmp_path, monkeypatch):
    """`--ckpt llama2-7b` with no local directory: the hub cache's snapshot (refs/main), as
    huggingface_hub lays it out; a cache without a snapshot or missing a shard is one clear error."""
    model, sd = tiny
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)                                    # no ./checkpoints/llama2-7b here
    repo = tmp_path / "hf-home" / "hub" / "models--meta-llama--Llama-2-7b-hf"
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoints.resolve_ckpt("llama2-7b")
    (repo / "snapshots").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        checkpoints.resolve_ckpt("llama2-7b")
    save_hf(sd, repo / "snapshots" / "old")
    save_hf(sd, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert checkpoints.resolve_ckpt("llama2-7b") == repo / "snapshots" / "abc123"
    args, state = checkpoints.hf_state_dict(checkpoints.resolve_ckpt("llama2-7b"))
    with torch.no_grad():
        assert torch.equal(build(args, state)(tokens()), model(tokens()))
    (repo / "snapshots" / "abc123" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        checkpoints.resolve_ckpt("llama2-7b")


def test_corrupt_or_legacy_meta_pth_names_the_file(tiny, tmp_path):
    _, sd = tiny
    save_meta(sd, tmp_path / "legacy")
    torch.save(sd, tmp_path / "legacy" / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    save_meta(sd, tmp_path / "cut")
    f = tmp_path / "cut" / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:1000])
    for d, words in [("legacy", "legacy-format"), ("cut", "truncated or corrupt")]:
        r = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tmp_path / d), "--ppl", ""],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and words in r.stderr and "consolidated.00.pth" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
