"""tasks.py and evaluate.zero_shot: the five Table-1 tasks from the real files, lm-eval's scoring on a
bigram stub whose log-likelihoods are known in closed form, and on the real SmolLM2-135M."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from evaluate import loglikelihoods, zero_shot
from tasks import TASKS, Item, load_task

FIRST = {  # count, first context (or contexts), first continuations, gold
    "arc_easy": (2376, "Question: Which statement best explains why photosynthesis is the foundation of most "
                 "food webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.", 4, 0),
    "arc_challenge": (1172, "Question: An astronomer observes that a planet rotates faster after a meteorite "
                      "impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
                      " Planetary density will decrease.", 4, 2),
    "piqa": (1838, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
             "you will also need to supply it with a water bottle and a food dish.", 2, 0),
    "hellaswag": (10042, "Roof shingle removal: A man is sitting on a roof. he",
                  " is using wrap to wrap a pair of skis.", 4, 3),
    "winogrande": (1267, ["Sarah was a much better surgeon than Maria so Sarah",
                          "Sarah was a much better surgeon than Maria so Maria"], " always got the easier cases.", 1, 1),
}


@pytest.mark.parametrize("task", TASKS)
def test_loaders_read_the_real_files(task, data_dir):
    items = load_task(task, data_dir)
    count, context, first, n_cont, gold = FIRST[task]
    assert len(items) == count
    assert items[0].context == context and items[0].gold == gold
    assert items[0].continuations[0] == first and len(items[0].continuations) == n_cont
    assert all(c.startswith(" ") for it in items for c in it.continuations)  # the harness's target_delimiter
    n_options = [len(it.context) if task == "winogrande" else len(it.continuations) for it in items]
    assert all(0 <= it.gold < n for it, n in zip(items, n_options))


def test_arc_numeric_answer_keys_map_through_the_labels(data_dir):
    item = load_task("arc_easy", data_dir)[14]  # labels 1..4, answerKey "2"
    assert item.gold == 1 and len(item.continuations) == 4


# ----------------------------------------------------------------------------- bigram stub

V = 128  # a character-level "tokenizer" over ASCII; the model's next-token law depends only on the last character


class CharTok:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [ord(ch) for ch in text]


class Bigram(torch.nn.Module):
    """log p(next | ... prev) = log_softmax(table[prev]): hidden is the one-hot of the token, output
    the table, so every log-likelihood is a sum of table entries."""

    def __init__(self, table, max_seq_len=64):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.args = SimpleNamespace(max_seq_len=max_seq_len)

    def hidden(self, tokens):
        return F.one_hot(tokens, V).float()           # (B, T, V)

    def output(self, h):
        return h @ self.table                          # (..., V)


def bigram_table():
    t = torch.zeros(V, V)
    t[ord(" "), ord("b")] = 3.0   # p(b | space) ~ 0.14
    t[ord("a"), ord("a")] = 5.0   # p(a | a) ~ 0.54
    t[:, ord("z")] = -10.0        # z is (almost) never next
    t[ord("z"), ord(" ")] = -10.0  # nor a space after z
    return t


def direct(table, context, continuation, bos=True):
    logp = torch.log_softmax(table, -1)
    ids = CharTok().encode(context, bos=bos) + CharTok().encode(continuation)
    n = len(continuation)
    return sum(logp[ids[i - 1], ids[i]].item() for i in range(len(ids) - n, len(ids)))


def test_loglikelihoods_are_the_closed_form_sums_in_any_batch():
    table = bigram_table()
    model, tok = Bigram(table), CharTok()
    reqs = [("abc", " b"), ("a much longer context here", " aaaa"), ("q", " zz b"), ("xyz", " a"), ("b b", " bab")]
    want = [direct(table, c, k) for c, k in reqs]
    for bs in (1, 2, 5):
        got = loglikelihoods(model, tok, reqs, batch_size=bs)
        assert got == pytest.approx(want, abs=1e-5)
    # the context's trailing space moves to the continuation (lm-eval _encode_pair), same tokens scored
    assert loglikelihoods(model, tok, [("abc ", "b")]) == pytest.approx([direct(table, "abc", " b")], abs=1e-5)


def test_long_context_is_cut_on_the_left():
    table = bigram_table()
    model = Bigram(table, max_seq_len=8)
    # 30 + 3 tokens cut to the last 9: the bigram law only sees the last context character
    got = loglikelihoods(model, CharTok(), [("x" * 29 + "a", " aa")])
    assert got == pytest.approx([direct(table, "a", " aa")], abs=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        loglikelihoods(model, CharTok(), [("a", " " + "a" * 8)])


@pytest.mark.parametrize("task", TASKS)
def test_each_task_scores_the_likely_option(task):
    """" aaaa" is likely after a space, any option with z is not; two items, the second's gold wrong."""
    model, tok = Bigram(bigram_table()), CharTok()
    if task == "winogrande":  # options differ in context: a z before the common continuation sinks it
        items = [Item(["the cat", "the caz"], [" sat down"], 0), Item(["the caz", "the cat"], [" sat down"], 0)]
    else:
        n = 2 if task == "piqa" else 4
        options = [" azaz"] * n
        options[1] = " aaaa"
        items = [Item("Question: which?\nAnswer:", options, 1), Item("Question: which?\nAnswer:", options, 0)]
    r = zero_shot(model, tok, task, items)
    assert r["acc"] == 0.5 and r["n"] == 2
    assert r["acc_norm"] == (None if task == "winogrande" else 0.5)


def test_acc_norm_divides_by_the_choice_length_in_characters():
    """ b is the likeliest option in total, aaaaaaaa per character: acc and acc_norm disagree."""
    table = bigram_table()
    model, tok = Bigram(table), CharTok()
    item = Item("context x", [" b", " aaaaaaaa"], 1)
    ll = [direct(table, "context x", c) for c in item.continuations]
    assert ll[0] > ll[1] and ll[0] / 1 < ll[1] / 8  # len(choice) without the " " delimiter
    r = zero_shot(model, tok, "hellaswag", [item])
    assert r == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


# ----------------------------------------------------------------------------- real model


def test_smollm2_gets_trivial_items_right(smollm2):
    model, tok = smollm2
    items = [Item("The capital of France is", [" banana", " Paris"], 1),
             Item("Question: What color is the sky on a clear day?\nAnswer:", [" blue", " spaghetti"], 0),
             Item("One, two, three, four,", [" dog", " five"], 1)]
    assert zero_shot(model, tok, "arc_easy", items, batch_size=2) == {"acc": 1.0, "acc_norm": 1.0, "n": 3}
    wino = [Item(["I poured the milk into the glass until the glass", "I poured the milk into the glass until the milk"],
                 [" was full."], 0)]
    assert zero_shot(model, tok, "winogrande", wino)["acc"] == 1.0


def test_batched_loglikelihoods_equal_a_direct_forward(smollm2):
    """Right padding and batching must not change a request's log-likelihood. The reference sums a
    float64 log-softmax of the same fp32 logits; the scorer's fp32 log-softmax over 49152 logits
    differs by ~1e-5 a token (seen: 1.7e-4 on a 10-token sum of -32.5, on a busy 2-core CI run),
    so the bound is relative 2e-5; a padding or offset error moves a sum by whole nats."""
    model, tok = smollm2
    reqs = [("The capital of France is", " Paris"),
            ("Question: How do I boil an egg?\nAnswer:", " Put it in boiling water for about eight minutes."),
            ("Hi", " there"),
            ("A much longer context about the history of the Roman Empire, its roads, its armies and its "
             "emperors, which goes on for a while", " and then it fell.")]
    want = []
    with torch.no_grad():
        for c, k in reqs:
            ctx, cont = tok.encode(c, bos=True), tok.encode(k)  # SmolLM2: the same as the whole-then-split encoding
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).double(), -1)[0]  # (T, vocab)
            want.append(sum(logp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont)))
    for bs in (1, 4):
        got = loglikelihoods(model, tok, reqs, batch_size=bs)
        assert all(math.isclose(g, w, rel_tol=2e-5, abs_tol=1e-4) for g, w in zip(got, want)), (bs, got, want)


def test_task_split_is_fixed_disjoint_and_covers_every_item(data_dir):
    """tasks.split: a pure function of the file and the seed; held-out, dev and train disjoint and
    together every item once; another seed another held-out part; example() gives the gold option."""
    import tasks
    items = tasks.load_task("arc_easy")
    a, b = tasks.split(items, seed=0), tasks.split(items, seed=0)
    assert a == b and (len(a.held_out), len(a.dev)) == (tasks.HELD_OUT, tasks.DEV)
    assert len(a.train) == len(items) - tasks.HELD_OUT - tasks.DEV
    ids = {id(x) for part in a for x in part}
    assert len(ids) == len(items) and ids == {id(x) for x in items}                  # disjoint, complete
    assert tasks.split(items, seed=1).held_out != a.held_out
    item = items[0]
    prompt, answer = tasks.example(item)
    assert prompt == item.context and answer == item.continuations[item.gold]
    w = tasks.load_task("winogrande")[0]
    assert tasks.example(w) == (w.context[w.gold], w.continuations[0])
    with pytest.raises(ValueError, match="cannot give"):
        tasks.split(items[:400])
