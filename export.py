"""Export a quantized model directory (calibrate.py, finetune.py) to Hugging Face transformers +
PEFT: the base, and the LoRA factors as a PEFT adapter, which is what the official ApiQ hands to
its finetuning stage. Nothing of apiq is needed to load the result. Three formats:

  --format gptq  packed: the N-bit codes as GPTQ checkpoints store them (gptq_v2: asymmetric,
                 zero points as they are), which transformers loads through optimum + gptqmodel
                 (its TorchLinear kernel runs on the CPU too) and vLLM serves; 2, 3, 4, 8 bits.
                 The 2-bit model stays 2-bit. Settings and loading: docs/export.md.
  --format hf    (default) Q(W) dequantized into a plain Llama, fp32/bf16/fp16: any tool that
                 reads a transformers Llama reads it, but it is no smaller than the original.
  --format gguf  4 bits to llama.cpp: OUT/model.gguf with the codes as Q4_1 blocks and OUT/lora.gguf,
                 the adapter as llama.cpp's GGUF LoRA (`q4_1_blocks`, `write_gguf`; docs/export.md).

    python export.py out/smollm2-135m-apiq-bw-w2g64-quick out/hf/apiq-w2          # -> base/ and adapter/
    python export.py out/... out/gptq/apiq-w2 --format gptq                      # packed base/ and adapter/
    python export.py out/... out/hf/apiq-w2 --merge                              # one directory, Q(W) + s B A
    python export.py out/...-w4g64... out/gguf/apiq-w4 --format gguf             # model.gguf and lora.gguf

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained("out/hf/apiq-w2/base")
    model = PeftModel.from_pretrained(base, "out/hf/apiq-w2/adapter")
    tok = AutoTokenizer.from_pretrained("out/hf/apiq-w2/base")
    lm_eval --model hf --model_args pretrained=out/hf/apiq-w2/base,peft=out/hf/apiq-w2/adapter --tasks piqa

OUT/base: config.json (LlamaForCausalLM), model.safetensors (--dtype; Q(W) of every block linear,
q/k rows in transformers' RoPE layout, checkpoints.hf_permute), generation_config.json,
apiq_source.json (the source's apiq.json), tokenizer.json + tokenizer_config.json (a GGUF
byte-level BPE, e.g. SmolLM2, rewritten in the `tokenizers` format) or tokenizer.model
(SentencePiece, Llama-2). OUT/adapter: adapter_config.json and
adapter_model.safetensors (lora_A = our A (r, in), lora_B = our B (out, r), scaling lora_alpha / r
as ours). With --merge, OUT alone holds the base with W_eff = Q(W) + s B A: no PEFT needed, but the
weights are no longer on the N-bit grid. With --format hf the base is the fake-quantized
model in 16 or 32 bits, for compatibility; --format gptq is the one for memory.

GPTQ layout, per block linear (out, in), G = in / group_size groups (`gptq_tensors`):
    qweight (in * N / 32, out) int32   the codes of each output column, packed along the input
                                       dim: one little-endian bit stream, code j at bits
                                       [j N, (j + 1) N) (so 32 / N codes a word for N = 2, 4, 8,
                                       and 32 codes in 3 words, two straddling, for N = 3)
    qzeros  (G, out * N / 32)   int32  the zero points, packed the same way along the output dim
    scales  (G, out)            fp16   the step of eq. (3)
    g_idx   (in,)               int32  the group of each input: i // group_size (no act-order)
and config.json's quantization_config {quant_method gptq, bits, group_size, sym false, desc_act
false, checkpoint_format gptq_v2}. Both are apiq's own codes and zeros (quant.quantize),
repacked, never rounded again: the only change is the scale's fp16 rounding.
"""
import os
import shutil
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file

from checkpoints import GGUF_NAMES, HF_NAMES, hf_permute, rename
from cli import DTYPES, ArgumentParser, atomic_write, check_writable, run, write_json
from lora import adapters, quant_linears
from qmodel import is_kept, load_quantized
from quant import pack, unpack
from tokenizer import BYTE, GGUF_PRE_PATTERNS, NORMAL, GGUFTokenizer, SentencePieceTokenizer

# the readers' tables backwards, ours -> theirs: rename(name, TO_HF), rename(name, TO_GGUF)
TO_HF = {ours: theirs for theirs, ours in HF_NAMES.items()}
TO_GGUF = {ours: theirs for theirs, ours in GGUF_NAMES.items()}
HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FORMATS = ("hf", "gptq", "gguf")
GPTQ_BITS = (2, 3, 4, 8)           # the widths GPTQ's packed layout has (5-7 only in gptqmodel's planar gptq_p)


def hf_config(args, tied: bool, tok, dtype: str) -> dict:
    """transformers' LlamaConfig of our ModelArgs."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
           "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
           "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
           "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": tied, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "torch_dtype": HF_DTYPE[dtype],
           "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if args.use_scaled_rope:        # Llama 3.1's frequency scaling (llama.llama31_scale's constants)
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    return cfg


def to_hf_rows(name: str, w: torch.Tensor, args) -> torch.Tensor:
    """Rows of a q/k weight (or of B, its output-side factor) in transformers' RoPE layout."""
    if name.endswith("attention.wq"):
        return hf_permute(w, args.n_heads)
    if name.endswith("attention.wk"):
        return hf_permute(w, args.n_kv_heads)
    return w


def hf_linear_name(name: str) -> str:
    """`layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj`."""
    return rename(f"{name}.weight", TO_HF).removesuffix(".weight")


def base_tensors(model, dtype, merge: bool, fmt="hf") -> dict:
    """transformers' state dict: per block linear Q(W) (or Q(W) + s B A with merge) or, with
    fmt="gptq", its packed GPTQ tensors; the rest as is."""
    out = {}
    for name, p in model.state_dict().items():
        if is_kept(name):                                      # embeddings, norms, head; the linears below
            out[rename(name, TO_HF)] = p.detach().to(dtype)
    for name, m in quant_linears(model):
        if fmt == "gptq":
            out |= gptq_tensors(name, m, model.args)
        else:
            w = m.effective_weight() if merge else m.qweight()     # (out, in)
            out[f"{hf_linear_name(name)}.weight"] = to_hf_rows(name, w.float(), model.args).detach().to(dtype)
        if m.bias is not None:
            out[f"{hf_linear_name(name)}.bias"] = m.bias.detach().to(torch.float16 if fmt == "gptq" else dtype)
    if model.output.weight is model.tok_embeddings.weight:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def gptq_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (rows, n), values < 2^bits, n * bits a multiple of 32 -> int32 (rows, n * bits / 32):
    each row one little-endian bit stream (quant.pack's: code j at bits [j bits, (j + 1) bits)) cut
    into 32-bit words. For 2, 4, 8 bits that is 32 / bits codes a word, code 0 in the low bits; for
    3 bits, 32 codes in three words with codes 10 and 21 across a word boundary: GPTQ's layouts."""
    rows, n = codes.shape
    b = pack(codes, bits).to(torch.int64).reshape(rows * n * bits // 32, 4)   # (words, 4 bytes), low byte first
    w = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24                # (words,) in 0 .. 2^32 - 1
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).reshape(rows, n * bits // 32)  # two's complement


def check_gptq(name: str, m):
    """The linear fits GPTQ's layout, or a ValueError that names it."""
    if m.bits not in GPTQ_BITS:
        raise ValueError(f"{name} has {m.bits}-bit codes: GPTQ's format holds {', '.join(map(str, GPTQ_BITS))} bits "
                         f"(use --format hf)")
    for dim, what in ((m.in_features, "inputs"), (m.out_features, "outputs")):
        if dim * m.bits % 32:
            raise ValueError(f"{name}: {dim} {what} x {m.bits} bits do not fill whole 32-bit words, "
                             f"which GPTQ's packing needs (use --format hf)")
    if m.zero.min() < 0 or m.zero.max() > 2**m.bits - 1:
        raise ValueError(f"{name}: a zero point lies outside 0..{2**m.bits - 1}, which GPTQ cannot store; the model "
                         f"was made before quant.py clamped it: quantize it again")


def gptq_tensors(name: str, m, args) -> dict:
    """One QuantLinear's qweight, qzeros, scales, g_idx in GPTQ's layout (module docstring), q/k
    rows in transformers' RoPE order. The codes and zeros are apiq's, repacked."""
    check_gptq(name, m)
    codes = unpack(m.codes, m.bits, (m.out_features, m.in_features))          # (out, in) uint8
    codes, scale, zero = (to_hf_rows(name, t, args) for t in (codes, m.scale, m.zero.to(torch.int32)))
    prefix = hf_linear_name(name)
    return {f"{prefix}.qweight": gptq_words(codes, m.bits).T,                 # (in * N / 32, out), along the inputs
            f"{prefix}.qzeros": gptq_words(zero.T, m.bits),                   # (G, out * N / 32), along the outputs
            f"{prefix}.scales": scale.T.to(torch.float16),                    # (G, out)
            f"{prefix}.g_idx": torch.arange(m.in_features, dtype=torch.int32) // m.group_size}  # (in,)


def gptq_config(model) -> dict:
    """config.json's quantization_config: one bit width and group size for every linear."""
    kinds = {(m.bits, m.group_size) for _, m in quant_linears(model)}
    if len(kinds) != 1:
        raise ValueError(f"the linears have different (bits, group size) {sorted(kinds)}: GPTQ's config holds one")
    bits, group_size = kinds.pop()
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": False, "desc_act": False,
            "checkpoint_format": "gptq_v2", "pack_dtype": "int32", "true_sequential": True,
            "meta": {"quantizer": ["apiq"]}}


def rank_and_alpha(found: dict, what: str) -> tuple:
    """The one (rank, lora_alpha) of the adapters `found` ({name: QuantLinear}): PEFT's config and a
    GGUF LoRA each hold one."""
    ranks = {(m.rank, m.lora_alpha) for m in found.values()}
    if len(ranks) != 1:
        raise ValueError(f"the linears have different (rank, lora_alpha) {sorted(ranks)}: {what} wants one")
    return ranks.pop()


def adapter_files(model, base_dir, dtype=torch.float16) -> tuple[dict, dict]:
    """(adapter_config.json, adapter_model.safetensors tensors) in PEFT's LoRA format, A and B in
    `dtype` (fp16 by default: the adapter's bits that a bits-per-weight count charges)."""
    found = adapters(model)
    rank, alpha = rank_and_alpha(found, "PEFT export")
    tensors = {}
    for name, m in found.items():
        prefix = f"base_model.model.{hf_linear_name(name)}"
        tensors[f"{prefix}.lora_A.weight"] = m.A.detach().to(dtype).contiguous()                        # (r, in)
        tensors[f"{prefix}.lora_B.weight"] = to_hf_rows(name, m.B.detach(), model.args).to(dtype).contiguous()  # (out, r)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": sorted({hf_linear_name(n).rsplit(".", 1)[1] for n in found}),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": str(Path(base_dir).resolve())}
    return config, tensors


def hf_tokenizer_json(spec: dict) -> dict:
    """A GGUF byte-level BPE vocabulary (tokenizer.GGUFTokenizer.spec) in the `tokenizers`
    library's format: the same pre-tokenizer regex, vocabulary, merge order and special tokens."""
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, (t, ty) in enumerate(zip(spec["tokens"], spec["token_types"]))
               if ty not in (NORMAL, BYTE)]
    bos = spec["tokens"][spec["bos_id"]] if spec.get("bos_id") is not None else None
    post = None
    if spec.get("add_bos") and bos is not None:
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [spec["bos_id"]], "tokens": [bos]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GGUF_PRE_PATTERNS[spec["pre"]]}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(spec["tokens"])}, "merges": spec["merges"]}}


def write_tokenizer(tok, out: Path, max_len: int):
    """tokenizer files transformers' AutoTokenizer reads, encoding as `tok` does."""
    config = {"model_max_length": max_len, "clean_up_tokenization_spaces": False}
    if isinstance(tok, GGUFTokenizer):
        name = {i: None if i is None else tok.spec["tokens"][i] for i in (tok.bos_id, tok.eos_id)}
        config |= {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name[tok.bos_id],
                   "eos_token": name[tok.eos_id], "add_bos_token": tok.add_bos}
        write_json(out / "tokenizer.json", hf_tokenizer_json(tok.spec))
    elif isinstance(tok, SentencePieceTokenizer):
        atomic_write(out / "tokenizer.model", tok.sp.serialized_model_proto())
        config |= {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "add_bos_token": True, "add_eos_token": False, "legacy": True}
    else:
        raise ValueError(f"export of a {type(tok).__name__} is not supported: copy the original checkpoint's "
                         f"tokenizer files into the base directory yourself")
    write_json(out / "tokenizer_config.json", config)


def export(src, out, dtype=None, merge=False, force=False, fmt="hf", adapter_dtype="fp16"):
    """Write the transformers base (and, unless merge, the PEFT adapter) of quantized directory
    `src` under `out`; fmt "hf" (dequantized, dtype default fp32), "gptq" (packed, the rest in
    dtype fp16 or bf16, default fp16) or "gguf" (4-bit Q4_1, fp16); the adapter's A and B in
    adapter_dtype (fp16, or fp32 as they were trained). Returns (base dir, adapter dir
    or None); for gguf (model.gguf, lora.gguf or None). Everything is written into a hidden
    sibling `.<out>.partial` that is renamed to `out` when complete: a crash, kill or Ctrl-C leaves
    no directory that looks like an export, and the same command starts it again."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    dtype = dtype or ("fp32" if fmt == "hf" else "fp16")
    if fmt == "gptq" and (merge or dtype == "fp32"):
        raise ValueError("--format gptq keeps Q(W) packed: no --merge (s B A is not on the grid), and the rest "
                         "in fp16 or bf16 (--dtype), the dtypes GPTQ kernels compute in")
    if fmt == "gguf" and (merge or dtype != "fp16"):
        raise ValueError("--format gguf keeps Q(W) as Q4_1 blocks: no --merge, and the embeddings in fp16 (--dtype)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: the export is a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty: choose another directory or pass --force to overwrite")
    model, tok = load_quantized(src, cache=False)             # ValueError: not a (finished) quantized model
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)                # what a killed export left
    try:
        check_writable(partial)                               # inside: a Ctrl-C right after its mkdir removes it too
        has_adapter = write_export(src, partial, model, tok, dtype, merge, final=out, fmt=fmt,
                                   adapter_dtype=DTYPES[adapter_dtype])
        if out.exists():
            shutil.rmtree(out)                                # empty, or --force
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if fmt == "gguf":
        return out / "model.gguf", (out / "lora.gguf" if has_adapter else None)
    return (out if merge else out / "base"), (out / "adapter" if has_adapter else None)


def write_export(src, out, model, tok, dtype, merge, final, fmt="hf", adapter_dtype=torch.float16) -> bool:
    """The export's files under `out` (its final place: `final`); returns whether it has an adapter."""
    if fmt == "gguf":
        return write_gguf(model, tok, out, adapter_dtype)
    base = out if merge else out / "base"
    base.mkdir(parents=True, exist_ok=True)
    tensors = base_tensors(model, DTYPES[dtype], merge, fmt)
    atomic_write(base / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tied = model.output.weight is model.tok_embeddings.weight
    write_tokenizer(tok, base, model.args.max_seq_len)
    write_json(base / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
    has_adapter = not merge and bool(adapters(model))
    if has_adapter:
        config, lora = adapter_files(model, final / "base", adapter_dtype)
        atomic_write(out / "adapter" / "adapter_model.safetensors",
                     lambda tmp: save_file(lora, tmp, metadata={"format": "pt"}))
        write_json(out / "adapter" / "adapter_config.json", config)
    # how the model was made, for the record (not named apiq.json: the export is a Hugging Face
    # directory, and `--ckpt base/` must load it as one: checkpoints.load reads its config.json)
    atomic_write(base / "apiq_source.json", lambda tmp: shutil.copyfile(Path(src) / "apiq.json", tmp))
    config = hf_config(model.args, tied, tok, dtype)
    if fmt == "gptq":
        config["quantization_config"] = gptq_config(model)
    write_json(base / "config.json", config)
    return has_adapter


# ----------------------------------------------------------------------------- GGUF (llama.cpp), 4 bits

def q4_1_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """4-bit codes (out, in), step and zero (out, G), in / G a multiple of 32 -> llama.cpp's Q4_1
    blocks, uint8 (out, in / 32 * 20). A block is 32 weights of a row: d (fp16), m (fp16), then
    16 bytes, byte j holding code j in its low nibble and code j + 16 in its high one; llama.cpp
    reads W_hat = d code + m. With d = step and m = -step zero that is eq. (6), (code - zero) step;
    a group of 64 is two blocks with the same d and m. The fp16 rounding of d and m is the one
    change (m = -step zero is no longer an integer multiple of the rounded d)."""
    out, n_in = codes.shape
    per_group = n_in // scale.shape[1] // 32                                # blocks a group
    d = scale.float().repeat_interleave(per_group, 1).half()                # (out, in / 32)
    m = (-scale.float() * zero.float()).repeat_interleave(per_group, 1).half()
    c = codes.to(torch.uint8).reshape(out, n_in // 32, 2, 16)               # (out, blocks, halves, 16)
    qs = c[:, :, 0] | c[:, :, 1] << 4                                       # (out, blocks, 16)
    blocks = torch.cat([d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), qs], -1)
    return blocks.reshape(out, n_in // 32 * 20)                            # (out, blocks * 20 bytes)


def write_gguf(model, tok, out: Path, adapter_dtype=torch.float16) -> bool:
    """OUT/model.gguf (the base, block linears in Q4_1) and, if the model has adapters,
    OUT/lora.gguf (llama.cpp's LoRA: lora_a = A (r, in), lora_b = B (out, r), adapter.lora.alpha).
    Rows stay in Meta's q/k order, which is GGUF's. Returns whether it wrote an adapter."""
    a = model.args
    for name, m in quant_linears(model):
        if m.bits != 4 or m.group_size % 32:
            raise ValueError(f"{name}: {m.bits}-bit codes in groups of {m.group_size}: --format gguf writes Q4_1, "
                             f"4 bits in groups of a multiple of 32")
    if not isinstance(tok, GGUFTokenizer):
        raise ValueError(f"--format gguf writes a GGUF byte-level BPE tokenizer (SmolLM2's); this model has a "
                         f"{type(tok).__name__}: export --format hf and convert it with llama.cpp's tools")
    if a.use_scaled_rope:
        raise ValueError("--format gguf: Llama 3.1's scaled RoPE (rope_freqs) is not written; use --format hf")
    out.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out / "model.gguf"), "llama")
    w.add_name("apiq"), w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_context_length(a.max_seq_len), w.add_embedding_length(a.dim), w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.hidden_dim), w.add_head_count(a.n_heads), w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_dimension_count(a.head_dim), w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps), w.add_vocab_size(a.vocab_size)
    spec = tok.spec
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(spec["pre"]), w.add_token_list(spec["tokens"])
    w.add_token_types(spec["token_types"]), w.add_token_merges(spec["merges"]), w.add_add_bos_token(spec["add_bos"])
    for key, i in (("bos", spec["bos_id"]), ("eos", spec["eos_id"])):
        if i is not None:
            getattr(w, f"add_{key}_token_id")(i)
    for name, p in model.state_dict().items():
        if is_kept(name) and not (name == "output.weight" and model.output.weight is model.tok_embeddings.weight):
            t = p.detach().to(torch.float16 if p.dim() == 2 else torch.float32)   # norms stay f32, as llama.cpp keeps them
            w.add_tensor(rename(name, TO_GGUF), t.numpy())
    for name, m in quant_linears(model):
        codes = unpack(m.codes, m.bits, (m.out_features, m.in_features))
        w.add_tensor(rename(f"{name}.weight", TO_GGUF), q4_1_blocks(codes, m.scale, m.zero).numpy(),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    write_gguf_file(w)
    found = adapters(model)
    if not found:
        return False
    _, alpha = rank_and_alpha(found, "a GGUF LoRA")
    w = gguf.GGUFWriter(str(out / "lora.gguf"), "llama")
    w.add_type("adapter"), w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))                       # llama.cpp scales by alpha / r
    for name, m in found.items():
        base = rename(f"{name}.weight", TO_GGUF)
        w.add_tensor(f"{base}.lora_a", m.A.detach().to(adapter_dtype).numpy())   # (r, in): ggml ne = [in, r]
        w.add_tensor(f"{base}.lora_b", m.B.detach().to(adapter_dtype).numpy())   # (out, r): ggml ne = [r, out]
    write_gguf_file(w)
    return True


def write_gguf_file(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(a):
    base, adapter = export(a.src, a.out, a.dtype, a.merge, a.force, a.format, a.adapter_dtype)
    print(f"wrote {base}" + (f" and {adapter}" if adapter else ""))


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="quantized model directory (calibrate.py or finetune.py wrote it)")
    p.add_argument("out", help="export directory (base/ and adapter/ inside; with --merge the model itself; "
                               "gguf: model.gguf and lora.gguf)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: Q(W) dequantized (default); gptq: the codes packed in GPTQ's format; gguf: 4 bits as "
                        "Q4_1 for llama.cpp (docs/export.md)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the exported weights (default fp32; gptq, gguf: fp16, of all but the packed codes)")
    p.add_argument("--adapter-dtype", choices=("fp16", "fp32"), default="fp16",
                   help="dtype of the LoRA adapter's A and B (default fp16; fp32: as trained, twice the bits)")
    p.add_argument("--merge", action="store_true", help="fold s B A into the weights: one directory, no PEFT")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty export directory")
    run(main, p.parse_args())
