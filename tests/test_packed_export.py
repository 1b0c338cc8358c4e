"""export.py --format gptq (the packed GPTQ gptq_v2 checkpoint) and --format gguf (4-bit Q4_1 + a
GGUF LoRA for llama.cpp).

Independent readings of the packing: a pure-Python unpacker written from GPTQ's layout (bit
stream per column, 32-bit little-endian words); gptqmodel's own TorchLinear as transformers +
optimum load it, with peft's GPTQ LoRA wrapper on top (test-only references; skipped where they are
not installed, a failure in CI where setup.sh installs them); the gguf package's Q4_1 dequantizer
(through checkpoints.load, which reads GGUF files with it)."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import IN_CI, quantize_tiny

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def py_unpack_words(words, bits, n):
    """int32 words (rows, k) -> codes (rows, n) as Python ints, from GPTQ's layout alone: each row's
    words, low word first, form one bit stream (each word's bits low first), code j at bits
    [j * bits, (j + 1) * bits)."""
    rows = []
    for row in words.tolist():
        stream = 0
        for k, w in enumerate(row):
            stream |= (w & 0xFFFFFFFF) << (32 * k)
        rows.append([(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(n)])
    return rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_words_unpack_to_the_codes(bits):
    from export import gptq_words
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 96), generator=g, dtype=torch.int32)
    codes[0] = 0                                           # a row of zeros 0 and one of 2^N - 1,
    codes[1] = 2**bits - 1                                 # as a clamped zero point can be
    codes[2, 10], codes[2, 21] = 2**bits - 1, 2**bits - 1  # the 3-bit codes across word boundaries
    words = gptq_words(codes.to(torch.uint8), bits)
    assert words.dtype == torch.int32 and words.shape == (5, 96 * bits // 32)
    assert py_unpack_words(words, bits, 96) == codes.tolist()


def test_zero_point_is_clamped_into_the_code_range():
    import quant
    w = torch.rand(4, 64) + 0.1                            # every group positive: round(-xmin/step) < 0
    w[2:] = -w[2:]                                         # and negative: > 2^N - 1
    for bits in (2, 3, 4):
        _, zero = quant.quant_params(w, bits, 32)
        assert zero[:2].eq(0).all() and zero[2:].eq(2**bits - 1).all()
        codes, scale, z = quant.quantize(w, bits, 32)
        assert torch.equal(quant.dequantize(codes, scale, z, 32), quant.fake_quant(w, bits, 32))


@pytest.fixture(scope="module")
def hf_stack():
    try:
        import gptqmodel  # noqa: F401
        import optimum.gptq  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"CI=true but the GPTQ loaders are not installed ({e}): setup.sh installs them")
        pytest.skip(f"transformers + optimum + gptqmodel + peft not installed ({e})")


def hf_gptq_logits(base, adapter, x):
    """(logits with the adapter, logits without it, the q_proj module) from transformers + peft."""
    import peft
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        with_lora = model(x).logits.float()
        with model.disable_adapter():
            without = model(x).logits.float()
    return with_lora, without, model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_transformers_peft_load_the_packed_export(hf_stack, tiny_ckpt, tmp_path, bits):
    import export
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from peft.tuners.lora.gptq import GPTQLoraLinear
    from qmodel import load
    src = quantize_tiny(tiny_ckpt, tmp_path / "q", "loftq", bits)       # B != 0: the adapter matters
    ours, tok = load(src)
    x = torch.tensor([tok.encode("The tower is 324 metres tall, about the same height as an 81-storey building",
                                 bos=True)])                                # (1, T)
    with torch.no_grad():
        want = ours(x)                                                        # (1, T, vocab), fp32
    base, adapter = export.export(src, tmp_path / "gptq", fmt="gptq")
    got, without, q_proj = hf_gptq_logits(base, adapter, x)
    assert isinstance(q_proj, GPTQLoraLinear) and isinstance(q_proj.base_layer, BaseQuantLinear)
    qw = q_proj.base_layer.qweight                                             # really packed: N bits a weight
    assert qw.numel() * qw.element_size() * 8 == bits * q_proj.in_features * q_proj.out_features
    # fp16 model and fp16 scales against fp32: seen max 2e-3 (2, 3 bits), 7e-3 (4 bits, another
    # kernel) on logits of ~2.6; a wrong packing or row order is O(1) and moves the argmax
    diff = (got - want).abs()
    assert diff.max().item() <= 2e-2 and diff.mean().item() <= 2e-3, diff.max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for m in ours.modules():                                                  # the base alone agrees too
        if hasattr(m, "B") and isinstance(m.B, torch.nn.Parameter):
            m.B.data.zero_()
    with torch.no_grad():
        want_base = ours(x)
    assert (without - want_base).abs().max().item() <= 2e-2
    assert (without - want).abs().max().item() > 0.1                          # and the adapter matters


def test_smollm2_gqa_packed_layout(hf_stack, smollm2, tmp_path):
    """The real 9/3-head GQA model at 2 bits, group 64: every linear that gptqmodel unpacks from
    the export is apiq's Q(W) (q/k rows with their scales and zeros in transformers' order), up to
    the fp16 rounding of the scale and of (code - zero) * scale. Weights, not logits: SmolLM2's
    huge hidden channel makes any fp16 forward differ from fp32 by O(1) logits (measured on the
    dequantized hf export too), which would hide nothing and prove nothing."""
    import export
    from lora import quant_linears
    from qmodel import quantize_model, save_quantized
    from transformers import AutoModelForCausalLM
    fp, tok = smollm2
    q = quantize_model(copy.deepcopy(fp), "rtn", bits=2)
    save_quantized(q, tok, tmp_path / "q", {"method": "rtn", "source": "smollm2-135m"})
    base, _ = export.export(tmp_path / "q", tmp_path / "gptq", fmt="gptq")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    for name, m in quant_linears(q):
        theirs = hf.get_submodule(export.hf_linear_name(name)).dequantize_weight().T.float()   # (out, in)
        ours = export.to_hf_rows(name, m.qweight().float(), q.args)
        assert ((theirs - ours).abs() <= 2e-3 * ours.abs() + 1e-6).all(), name


@pytest.fixture(scope="module")
def tiny_rtn(tiny_ckpt, tmp_path_factory):
    """RTN of the tiny Llama at a bit width, made once per module: tiny_rtn(bits) -> directory."""
    made = {}

    def get(bits):
        if bits not in made:
            made[bits] = quantize_tiny(tiny_ckpt, tmp_path_factory.mktemp("rtn") / f"w{bits}", "rtn", bits)
        return made[bits]
    return get


def run_export(*args):
    return subprocess.run([sys.executable, "export.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("extra, words", [(["--merge"], "no --merge"), (["--dtype", "fp32"], "fp16 or bf16")])
def test_gptq_bad_options_one_line(tiny_rtn, tmp_path, extra, words):
    src = tiny_rtn(2)
    r = run_export(src, tmp_path / "out", "--format", "gptq", *extra)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_gptq_bits_it_cannot_hold_and_a_zero_out_of_range(tiny_ckpt, tiny_rtn, tmp_path):
    src = tiny_rtn(5)
    r = run_export(src, tmp_path / "out5", "--format", "gptq")
    assert r.returncode == 2 and "5-bit codes" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out5").exists() and not list(tmp_path.glob(".out5*"))
    # a model saved before the clamp: one zero point of -1 in layers.2.feed_forward.w1
    from safetensors.torch import load_file, save_file
    src = quantize_tiny(tiny_ckpt, tmp_path / "q2", "rtn", 2)
    t = load_file(src / "model.safetensors")
    t["layers.2.feed_forward.w1.zero"] = t["layers.2.feed_forward.w1.zero"].clone()
    t["layers.2.feed_forward.w1.zero"][0, 0] = -1
    save_file(t, src / "model.safetensors")
    r = run_export(src, tmp_path / "out2", "--format", "gptq")
    assert r.returncode == 2 and "layers.2.feed_forward.w1" in r.stderr and "0..3" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()


def test_gguf_q4_1_and_lora(smollm2, tmp_path):
    """4-bit SmolLM2 to GGUF: gguf-py's own Q4_1 dequantizer (checkpoints.load reads GGUF with it) gives
    apiq's Q(W) up to the fp16 rounding of d = step and m = -step zero; the LoRA file has what
    llama.cpp checks (general.type adapter, adapter.type lora, alpha, A (r, in) and B (out, r) named
    after the base tensor), and the tokenizer survives."""
    from gguf import GGUFReader

    import export
    from checkpoints import load as load_fp
    from lora import quant_linears
    from qmodel import quantize_model, save_quantized
    fp, tok = smollm2
    q = quantize_model(copy.deepcopy(fp), "qlora", bits=4, rank=8)
    torch.manual_seed(0)
    for _, m in quant_linears(q):
        m.B.data.normal_()                                                   # a non-zero adapter to find again
    save_quantized(q, tok, tmp_path / "q", {"method": "qlora", "source": "smollm2-135m"})
    model_file, lora_file = export.export(tmp_path / "q", tmp_path / "gguf", fmt="gguf")
    theirs, tok2 = load_fp(str(model_file))
    for name, m in quant_linears(q):
        step = m.scale.repeat_interleave(m.group_size, 1)                   # (out, in)
        err = (theirs.get_submodule(name).weight.float() - m.qweight().float()).abs() / step
        assert err.max().item() <= 0.02, name                               # seen 0.012 of a step
    assert theirs.output.weight is theirs.tok_embeddings.weight            # tied, as SmolLM2's
    text = "The tower is 324 metres tall, about the same height as an 81-storey building"
    assert tok2.encode(text, bos=True) == tok.encode(text, bos=True)
    r = GGUFReader(str(lora_file))
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(q.layers[0].attention.wq.lora_alpha)
    t = {x.name: x for x in r.tensors}
    m = q.layers[3].feed_forward.w2
    a, b = t["blk.3.ffn_down.weight.lora_a"], t["blk.3.ffn_down.weight.lora_b"]
    assert list(a.shape) == [m.in_features, m.rank] and list(b.shape) == [m.rank, m.out_features]  # ggml ne order
    got = torch.from_numpy(b.data.copy()).reshape(m.out_features, m.rank)        # fp16 (export's --adapter-dtype)
    assert got.dtype == torch.float16 and torch.equal(got, m.B.detach().half())
    assert len(t) == 2 * 7 * q.args.n_layers


def test_gguf_refuses_what_q4_1_cannot_hold(tiny_rtn, tmp_path):
    src = tiny_rtn(2)
    r = run_export(src, tmp_path / "out", "--format", "gguf")
    assert r.returncode == 2 and "writes Q4_1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    src = tiny_rtn(4)                                                           # 4 bits, but Llama-2's SentencePiece
    r = run_export(src, tmp_path / "out", "--format", "gguf")
    assert r.returncode == 2 and "SentencePieceTokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bits_per_weight_counts_every_stored_tensor(tiny_ckpt, tmp_path):
    """bench/bits_per_weight.py on a tiny 2-bit g32 rank-8 GPTQ export equals the count written out
    from the model's shapes: per linear (out, in) N out in (codes) + (in / g) out N (zero points) +
    (in / g) out 16 (fp16 scales) + 32 in (g_idx) + 16 r (in + out) (the fp16 adapter)."""
    import export
    from lora import quant_linears
    from qmodel import load
    sys.path.insert(0, str(ROOT / "bench"))
    from bits_per_weight import bits_per_weight, formula
    src = quantize_tiny(tiny_ckpt, tmp_path / "q", "loftq", 2)
    export.export(src, tmp_path / "gptq", fmt="gptq")
    got = bits_per_weight(tmp_path / "gptq")
    model, _ = load(src)
    n = base = adapter = 0
    for _, m in quant_linears(model):
        o, i, g = m.out_features, m.in_features, m.group_size
        n += o * i
        base += 2 * o * i + (i // g) * o * 2 + (i // g) * o * 16 + 32 * i
        adapter += 16 * m.rank * (i + o)
    assert got["weights"] == n and got["bits"] == 2 and got["group_size"] == 32
    assert got["base_bits_per_weight"] == base / n and got["adapter_bits_per_weight"] == adapter / n
    assert got["bits_per_weight"] == (base + adapter) / n
    shapes = [(m.out_features, m.in_features) for _, m in quant_linears(model)]
    by_formula = formula(shapes, 2, 32, rank=next(quant_linears(model))[1].rank)   # the peers' count
    assert all(by_formula[k] == got[k] for k in by_formula)
    export.export(src, tmp_path / "gptq32", fmt="gptq", adapter_dtype="fp32")           # twice the adapter's bits
    assert bits_per_weight(tmp_path / "gptq32")["adapter_bits_per_weight"] == 2 * adapter / n
