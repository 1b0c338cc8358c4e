"""Export a quantized model directory (calibrate.py, finetune.py) to Hugging Face transformers +
PEFT: the base with Q(W) dequantized, and the LoRA factors as a PEFT adapter, which is what the
official ApiQ hands to its finetuning stage. Nothing of apiq is needed to load the result.

    python export.py out/smollm2-135m-apiq-bw-w2g64-quick out/hf/apiq-w2          # -> base/ and adapter/
    python export.py out/... out/hf/apiq-w2 --merge                              # one directory, Q(W) + s B A

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained("out/hf/apiq-w2/base")
    model = PeftModel.from_pretrained(base, "out/hf/apiq-w2/adapter")
    tok = AutoTokenizer.from_pretrained("out/hf/apiq-w2/base")
    lm_eval --model hf --model_args pretrained=out/hf/apiq-w2/base,peft=out/hf/apiq-w2/adapter --tasks piqa

OUT/base: config.json (LlamaForCausalLM), model.safetensors (--dtype; Q(W) of every block linear,
q/k rows in transformers' RoPE layout, llama.hf_permute), generation_config.json,
apiq_source.json (the source's apiq.json), tokenizer.json + tokenizer_config.json (a GGUF
byte-level BPE, e.g. SmolLM2, rewritten in the `tokenizers` format) or tokenizer.model
(SentencePiece, Llama-2). OUT/adapter: adapter_config.json and
adapter_model.safetensors (lora_A = our A (r, in), lora_B = our B (out, r), scaling lora_alpha / r
as ours). With --merge, OUT alone holds the base with W_eff = Q(W) + s B A: no PEFT needed, but the
weights are no longer on the N-bit grid. The base is the fake-quantized model in 16 or 32 bits:
transformers has no kernel for this repo's packed codes, so the export is for compatibility
(evaluation harnesses, serving stacks, further finetuning), not for memory.
"""
import os
import shutil
from pathlib import Path

import torch

from cli import DTYPES, ArgumentParser, atomic_write, check_writable, run, write_json
from llama import HF_NAMES, hf_permute, rename
from lora import adapters, quant_linears
from qmodel import is_kept

HF_LINEAR = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    _, l, rest = name.split(".", 2)
    return f"model.layers.{l}.{HF_LINEAR[rest]}"


def base_tensors(model, dtype, merge: bool) -> dict:
    """transformers' state dict: Q(W) (or Q(W) + s B A with merge) per block linear, the rest as is."""
    to_hf = {ours: theirs for theirs, ours in HF_NAMES.items()}
    out = {}
    for name, p in model.state_dict().items():
        if is_kept(name):                                      # embeddings, norms, head; the linears below
            out[rename(name, to_hf)] = p
    for name, m in quant_linears(model):
        w = m.effective_weight() if merge else m.qweight()     # (out, in)
        out[f"{hf_linear_name(name)}.weight"] = to_hf_rows(name, w.float(), model.args)
        if m.bias is not None:
            out[f"{hf_linear_name(name)}.bias"] = m.bias
    if model.output.weight is model.tok_embeddings.weight:
        out.pop("lm_head.weight", None)
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def adapter_files(model, base_dir) -> tuple[dict, dict]:
    """(adapter_config.json, adapter_model.safetensors tensors) in PEFT's LoRA format."""
    found = adapters(model)
    ranks = {(m.rank, m.lora_alpha) for m in found.values()}
    if len(ranks) != 1:
        raise ValueError(f"the linears have different (rank, lora_alpha) {sorted(ranks)}: PEFT export wants one")
    rank, alpha = ranks.pop()
    tensors = {}
    for name, m in found.items():
        prefix = f"base_model.model.{hf_linear_name(name)}"
        tensors[f"{prefix}.lora_A.weight"] = m.A.detach().float().contiguous()                       # (r, in)
        tensors[f"{prefix}.lora_B.weight"] = to_hf_rows(name, m.B.detach().float(), model.args).contiguous()  # (out, r)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": sorted({HF_LINEAR[n.split(".", 2)[2]].split(".")[1] for n in found}),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": str(Path(base_dir).resolve())}
    return config, tensors


def hf_tokenizer_json(spec: dict) -> dict:
    """A GGUF byte-level BPE vocabulary (tokenizer.GGUFTokenizer.spec) in the `tokenizers`
    library's format: the same pre-tokenizer regex, vocabulary, merge order and special tokens."""
    from tokenizer import BYTE, GGUF_PRE_PATTERNS, NORMAL
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
    from tokenizer import GGUFTokenizer, SentencePieceTokenizer
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


def export(src, out, dtype="fp32", merge=False, force=False):
    """Write the transformers base (and, unless merge, the PEFT adapter) of quantized directory
    `src` under `out`. Returns (base dir, adapter dir or None). Everything is written into a hidden
    sibling `.<out>.partial` that is renamed to `out` when complete: a crash, kill or Ctrl-C leaves
    no directory that looks like an export, and the same command starts it again."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: the export is a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty: choose another directory or pass --force to overwrite")
    from qmodel import load_quantized
    model, tok = load_quantized(src, cache=False)             # ValueError: not a (finished) quantized model
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)                # what a killed export left
    check_writable(partial)
    try:
        has_adapter = write_export(src, partial, model, tok, dtype, merge, final=out)
        if out.exists():
            shutil.rmtree(out)                                # empty, or --force
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return (out if merge else out / "base"), (out / "adapter" if has_adapter else None)


def write_export(src, out, model, tok, dtype, merge, final) -> bool:
    """The export's files under `out` (its final place: `final`); returns whether it has an adapter."""
    from safetensors.torch import save_file
    base = out if merge else out / "base"
    base.mkdir(parents=True, exist_ok=True)
    tensors = base_tensors(model, DTYPES[dtype], merge)
    atomic_write(base / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tied = model.output.weight is model.tok_embeddings.weight
    write_tokenizer(tok, base, model.args.max_seq_len)
    write_json(base / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
    has_adapter = not merge and bool(adapters(model))
    if has_adapter:
        config, lora = adapter_files(model, final / "base")
        atomic_write(out / "adapter" / "adapter_model.safetensors",
                     lambda tmp: save_file(lora, tmp, metadata={"format": "pt"}))
        write_json(out / "adapter" / "adapter_config.json", config)
    # how the model was made, for the record (not named apiq.json: the export is a Hugging Face
    # directory, and `--ckpt base/` must load it as one: llama.load reads its config.json)
    shutil.copyfile(Path(src) / "apiq.json", base / "apiq_source.json")
    write_json(base / "config.json", hf_config(model.args, tied, tok, dtype))
    return has_adapter


def main(a):
    base, adapter = export(a.src, a.out, a.dtype, a.merge, a.force)
    print(f"wrote {base}" + (f" and {adapter}" if adapter else ""))


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="quantized model directory (calibrate.py or finetune.py wrote it)")
    p.add_argument("out", help="export directory (base/ and adapter/ inside; with --merge the model itself)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the exported weights (default fp32)")
    p.add_argument("--merge", action="store_true", help="fold s B A into the weights: one directory, no PEFT")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty export directory")
    run(main, p.parse_args())
