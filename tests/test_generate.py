"""Generation with the KV cache (llama.KVCache, evaluate.generate): the same logits as a forward
pass over the whole sequence, the same greedy text as recomputing the prefix, sampling options."""
import pytest
import torch

from evaluate import generate, generate_greedy, next_token
from llama import KVCache


def test_cached_logits_equal_the_whole_forward(smollm2):
    model, tok = smollm2
    x = torch.tensor([tok.encode("The tower is 324 metres tall, about the same height as an 81-storey building",
                                 bos=True)])                                        # (1, T)
    with torch.no_grad():
        whole = model(x)                                                             # (1, T, vocab)
        cache = KVCache(model.args, 1, x.shape[1])
        parts = [model(x[:, :5], cache), model(x[:, 5:6], cache), model(x[:, 6:11], cache), model(x[:, 11:], cache)]
    assert cache.pos == x.shape[1]
    # prefill (causal), one position after a prefix (no mask), several after a prefix (explicit mask)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=2e-4, rtol=1e-4)


def prefix_recompute(model, tok, prompt, n):
    """The loop generate() replaced: the whole prefix again for every token (the reference)."""
    ids = tok.encode(prompt, bos=True)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tok.decode(ids[len(tok.encode(prompt, bos=True)):])


def test_greedy_equals_prefix_recompute_and_streams(smollm2):
    model, tok = smollm2
    pieces = []
    text = generate(model, tok, "The capital of France is", max_new_tokens=16, stream=pieces.append)
    assert text == prefix_recompute(model, tok, "The capital of France is", 16)
    assert "".join(pieces) == text and len(pieces) > 3
    assert "Paris" in text


def test_a_left_padded_batch_is_each_prompt_alone(smollm2):
    """generate_greedy pads prompts of different lengths on the left (llama.KVCache's pad): each row's
    logits at its last prompt position are its own forward's, and its greedy text generate()'s."""
    model, tok = smollm2
    prompts = ["The capital of France is", "Water boils at a temperature of 100 degrees",
               "One, two, three,", "In 1969 the first men to walk on the Moon were Neil Armstrong and"]
    ids = [tok.encode(p, bos=True) for p in prompts]
    longest = max(map(len, ids))
    pad = torch.tensor([longest - len(i) for i in ids])
    assert len(set(pad.tolist())) == 4                                               # four different paddings
    x = torch.tensor([[0] * (longest - len(i)) + i for i in ids])                    # (4, longest)
    with torch.no_grad():
        last = model(x, KVCache(model.args, 4, longest, pad=pad))[:, -1]            # (4, vocab)
        alone = torch.stack([model(torch.tensor([i]))[0, -1] for i in ids])
    torch.testing.assert_close(last, alone, atol=2e-4, rtol=1e-4)
    texts = generate_greedy(model, tok, prompts, max_new_tokens=12)
    assert texts == [generate(model, tok, p, max_new_tokens=12) for p in prompts]
    assert "Paris" in texts[0] and "Buzz" in texts[3]


def test_sampling_options():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    g = torch.Generator().manual_seed(0)
    assert next_token(logits) == 0                                                   # greedy
    assert all(next_token(logits, 1.0, 0.5, g) == 0 for _ in range(50))            # p(0) = 0.61 >= top_p
    draws = [next_token(logits, 1.0, 1.0, g) for _ in range(2000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.04, rtol=0)  # the softmax itself
    assert set(next_token(logits, 1.0, 0.9, g) for _ in range(300)) == {0, 1, 2}    # 0.61 + 0.22 < 0.9
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [next_token(logits, 5.0, 1.0, g) for _ in range(20)]
    assert draw(1) == draw(1) != draw(2)                                             # seeded


def test_context_overflow_is_an_error(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="context"):
        generate(model, tok, "Hello", max_new_tokens=model.args.max_seq_len)
