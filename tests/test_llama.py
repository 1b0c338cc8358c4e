"""llama.py: Meta's RoPE on adjacent pairs depends on relative position only, and the real
SmolLM2 matches transformers' own Llama on the same GGUF and answers a question."""
import pytest
import torch

from conftest import need
from llama import apply_rotary_emb, precompute_freqs_cis


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)
    freqs = precompute_freqs_cis(hd, 64, 10000.0)

    def score(m, n):
        rq, _ = apply_rotary_emb(q, q, freqs[m:m + 1])
        rk, _ = apply_rotary_emb(k, k, freqs[n:n + 1])
        return (rq * rk).sum().item()

    assert abs(score(7, 3) - score(40, 36)) < 1e-4
    assert abs(score(7, 3) - score(7, 4)) > 1e-3


def test_smollm2_matches_transformers_gguf_loader(smollm2, smollm2_gguf):
    """transformers dequantizes the same GGUF itself and runs its own Llama: logits within 1e-3."""
    need("accelerate")                          # transformers needs it to read GGUF
    transformers = need("transformers")
    model, _ = smollm2
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                            dtype=torch.float32).eval()
    x = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - ref(x).logits).abs().max().item()
    assert diff < 1e-3
    assert model.output.weight is model.tok_embeddings.weight  # tied, as SmolLM2 ships it


def test_smollm2_answers_a_simple_question(smollm2):
    from evaluate import generate
    model, tok = smollm2
    assert "Paris" in generate(model, tok, "The capital of France is", max_new_tokens=8)
