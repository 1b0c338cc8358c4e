"""Bits per weight of a quantized model, measured from the files `export.py --format gptq` writes:
every stored tensor of the block linears (the packed codes `qweight`, the packed zero points
`qzeros`, the fp16 `scales`, `g_idx`) and of the LoRA adapter (A and B at the dtype they were
exported in, `--adapter-dtype`), over the block linears' weights. The embeddings, norms and head
are counted apart (they stay 16-bit in every method compared).

    python export.py out/smollm2-135m-apiq-bw-w2g64-quick out/gptq/apiq-w2 --format gptq
    python bench/bits_per_weight.py out/gptq/apiq-w2                  # prints the JSON below

For a linear (out, in) at N bits, group g, rank r, fp16 scales and adapter this is
N + (N + 16) / g + 32 / out + 16 r (in + out) / (in out). SmolLM2-135M at 2 bits, g64 (QLoRA's
start exported; bench/results/bits_per_weight_smollm2.json): the base 2.326 (codes 2, zeros and
scales 0.281, g_idx 0.045), the fp16 adapter 2.944 at rank 64 (5.271 in all) and 0.368 at rank 8
(2.694 in all); the embeddings and head, 28.3M parameters, in fp16 beside them.
"""
import json
import sys
from pathlib import Path

from safetensors import safe_open

PACKED = (".qweight", ".qzeros", ".scales", ".g_idx")


def tensor_bits(f: Path) -> dict:
    """{name: (bits stored, shape, elements)} of every tensor in a safetensors file (its header only)."""
    out = {}
    with safe_open(str(f), framework="pt") as st:
        for k in st.keys():
            t = st.get_slice(k)
            shape = t.get_shape()
            n = 1
            for d in shape:
                n *= d
            out[k] = (n * {"I32": 32, "F16": 16, "BF16": 16, "F32": 32, "I8": 8, "U8": 8, "I16": 16}[t.get_dtype()],
                      shape, n)
    return out


def bits_per_weight(export_dir) -> dict:
    """The bits of an export directory (base/ and, if any, adapter/) per block-linear weight."""
    d = Path(export_dir)
    cfg = json.loads((d / "base" / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "gptq":
        raise ValueError(f"{d}: not a --format gptq export (config.json has no GPTQ quantization_config)")
    bits = q["bits"]
    base = tensor_bits(d / "base" / "model.safetensors")
    weights = sum(shape[0] * 32 // bits * shape[1] for k, (_, shape, _) in base.items() if k.endswith(".qweight"))
    linear_bits = sum(b for k, (b, _, _) in base.items() if k.endswith(PACKED))
    kept = {k: v for k, v in base.items() if not k.endswith(PACKED)}
    adapter_file = d / "adapter" / "adapter_model.safetensors"
    adapter_bits = sum(b for b, _, _ in tensor_bits(adapter_file).values()) if adapter_file.exists() else 0
    return {"export": str(d), "bits": bits, "group_size": q["group_size"], "weights": weights,
            "base_bits_per_weight": linear_bits / weights, "adapter_bits_per_weight": adapter_bits / weights,
            "bits_per_weight": (linear_bits + adapter_bits) / weights,
            "kept_params": sum(n for _, _, n in kept.values()), "kept_bits": sum(b for b, _, _ in kept.values())}


def formula(shapes, bits, group, rank=0, adapter_bits=16, zero_bits=None, g_idx=True) -> dict:
    """The same count written out from the linears' shapes [(out, in), ...], for a row that was not
    exported (a peer's own packed form): per linear N-bit codes, per group of `group` inputs an
    fp16 scale and a zero point of `zero_bits` (default N, packed; HQQ keeps a 16-bit float zero at
    2 and 3 bits), an int32 g_idx per input (GPTQ's format), a rank-r adapter at `adapter_bits`."""
    zero_bits = bits if zero_bits is None else zero_bits
    weights = sum(o * i for o, i in shapes)
    base = sum(o * i * bits + o * (i // group) * (16 + zero_bits) + (32 * i if g_idx else 0) for o, i in shapes)
    adapter = sum(rank * (o + i) * adapter_bits for o, i in shapes)
    return {"bits": bits, "group_size": group, "weights": weights, "base_bits_per_weight": base / weights,
            "adapter_bits_per_weight": adapter / weights, "bits_per_weight": (base + adapter) / weights}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python bench/bits_per_weight.py EXPORT_DIR   (a directory export.py --format gptq wrote)")
    try:
        print(json.dumps(bits_per_weight(sys.argv[1]), indent=2))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
