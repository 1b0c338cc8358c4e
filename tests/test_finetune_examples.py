"""finetune.py on examples (examples.py): the answer-only loss against a written-out cross-entropy,
right padding that never reaches a row's real tokens, no held-out item in any training batch, the
100k-token mix, kill -9 and Ctrl-C resuming to the identical adapters, one line for each broken
example, the official template and answer parser, and a local prompt/answer file end to end."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT
from tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = [("Q: What is the capital of France?\nA:", " Paris"), ("Q: 2 + 2 =", " 4"),
         ("Translate to French: cat\n", "chat"), ("The opposite of hot is", " cold"), ("Q: What color is the sky?\nA:", " blue"), ("", "Once upon a time"),
         ("Name a fruit:", " apple, or a pear"), ("Q: Is ice cold?\nA:", " yes")]


@pytest.fixture(scope="module")
def tiny_qlora(tiny_ckpt, tmp_path_factory):
    from conftest import quantize_tiny
    return quantize_tiny(tiny_ckpt, tmp_path_factory.mktemp("ftx") / "qlora", "qlora", 2)


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    from tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer(str(tiny_ckpt / "tokenizer.model"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(ckpt, out, **kw):
    import finetune
    return finetune.make_config(**(dict(ckpt=str(ckpt), out=str(out), data="commonsense", seqlen=256, batch_size=2,
                                        grad_accum=2, max_steps=4, max_train_tokens=3000, eval_tasks="",
                                        save_every=1, lr=3e-3, threads=1) | kw))


def test_answer_loss_is_the_cross_entropy_of_the_answer_tokens(tiny_qlora, tok):
    import finetune
    from examples import Example, encode, pad_batch
    model, _, _ = finetune.load_student(config(tiny_qlora, "unused"))
    with torch.no_grad():
        for m in finetune.adapters(model).values():                    # B != 0: the adapters take part
            m.B.normal_(0, 0.05)
    rows = [encode(tok, Example(p, a, "")) for p, a in PAIRS[:6]]
    x, mask = pad_batch(rows)                                           # (6, T), (6, T - 1)
    with torch.no_grad():
        loss = finetune.answer_loss(model, x, mask)
        nll, n = 0.0, 0                                                 # written out, one example at a time
        for r in rows:
            logp = F.log_softmax(model(torch.tensor([r.ids]))[0].double(), -1)        # (len, vocab)
            for t in range(r.start, len(r.ids)):                        # the answer's tokens and EOS
                nll -= logp[t - 1, r.ids[t]].item()
                n += 1
        assert loss.item() == pytest.approx(nll / n, rel=1e-5)
        assert abs(finetune.answer_loss(model, x, mask, teacher=model).item()) < 1e-6    # KL(p || p) = 0
    for i, ((p, a), r) in enumerate(zip(PAIRS, rows)):
        assert x[i, 1:][mask[i]].tolist() == r.ids[r.start:] and r.ids[-1] == tok.eos_id
        assert tok.decode(r.ids[r.start:-1]) == a.strip() and int(mask[i].sum()) == len(r.ids) - r.start
    assert rows[5].ids[0] == tok.bos_id and rows[5].start == 1         # an empty prompt: BOS, then the answer


def test_right_padding_never_reaches_the_real_tokens(tiny_ckpt, tok):
    from checkpoints import load
    from examples import Example, encode, pad_batch
    model, _ = load(str(tiny_ckpt))
    rows = [encode(tok, Example(p, a, "")) for p, a in PAIRS[:4]]
    x, _ = pad_batch(rows)
    noise = x.clone()
    for i, r in enumerate(rows):                                        # other tokens where the padding is
        noise[i, len(r.ids):] = torch.randint(3, 32000, (x.shape[1] - len(r.ids),))
    with torch.no_grad():
        padded, other = model(x), model(noise)
        for i, r in enumerate(rows):
            real = slice(0, len(r.ids))
            assert torch.equal(padded[i, real], other[i, real])         # causal: bit for bit
            torch.testing.assert_close(model(torch.tensor([r.ids]))[0], padded[i, real], rtol=1e-5, atol=1e-5)


def prompt_ids(tok, parts) -> set:
    """BOS + prompt tokens of the commonsense examples of these parts of every task."""
    from examples import commonsense_example, encode, task_parts
    out = set()
    for name in TASKS:
        split = task_parts(name)
        for part in parts:
            out |= {tuple(r.ids[:r.start]) for r in (encode(tok, commonsense_example(name, it))
                                                     for it in getattr(split, part))}
    return out


def test_no_held_out_item_in_any_training_batch(tiny_qlora, tok, tmp_path, monkeypatch):
    import finetune
    from examples import commonsense_example, commonsense_train, encode, take, task_parts
    held = {commonsense_example(n, it).prompt for n in TASKS for it in task_parts(n).held_out}
    pool = commonsense_train()
    assert len(held) == 5 * 300 and not held & {ex.prompt for ex in pool}          # by content, the whole pool
    rows, real = [], finetune.make_batch

    def recorded(data, mb):
        x, mask = real(data, mb)
        for i in range(len(x)):
            start = int(mask[i].nonzero()[0]) + 1                       # the answer's first token
            rows.append(tuple(x[i, :start].tolist()))                   # BOS + prompt, as the model read them
        return x, mask
    monkeypatch.setattr(finetune, "make_batch", recorded)
    finetune.main(config(tiny_qlora, tmp_path / "ft", max_steps=None, epochs=1))
    log = json.loads((tmp_path / "ft" / "finetune_log.json").read_text())
    assert len(rows) == log["examples"] > 10 and len(set(rows)) == len(rows)          # each example once an epoch
    mix, _ = take((encode(tok, ex) for ex in pool), 256, 3000)          # the first train items of the pool
    assert set(rows) == {tuple(r.ids[:r.start]) for r in mix}           # read back from the batches
    assert not set(rows) & prompt_ids(tok, ["held_out", "dev"])         # and never a held-out or dev one


def test_the_mix_of_train_parts_stops_at_100k_tokens(tok):
    from examples import MAX_TOKENS, commonsense_train, encode, take
    rows, dropped = take((encode(tok, ex) for ex in commonsense_train()), 512, MAX_TOKENS)
    total = sum(len(r.ids) for r in rows)
    assert MAX_TOKENS == 100_000 and MAX_TOKENS - 512 < total <= MAX_TOKENS
    tasks = {r.where.split(" ")[0] for r in rows}
    assert tasks == {"winogrande", "hellaswag", "arc_challenge", "arc_easy", "piqa"}      # a mix of all five
    again, _ = take((encode(tok, ex) for ex in commonsense_train()), 512, MAX_TOKENS)
    assert again == rows                                                # a pure function of the files and the seed


def adapters_of(d):
    t = load_file(str(d / "model.safetensors"))
    return {k: v for k, v in t.items() if k.endswith(".A") or k.endswith(".B")}


def same_adapters(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_and_ctrl_c_resume_to_the_identical_adapters(tiny_qlora, tmp_path, monkeypatch):
    import finetune
    kw = dict(max_steps=6)
    finetune.main(config(tiny_qlora, tmp_path / "whole", **kw))
    whole = adapters_of(tmp_path / "whole")
    cut = tmp_path / "killed"                                           # kill -9 of the command line
    cmd = [sys.executable, "finetune.py", "--ckpt", str(tiny_qlora), "--data", "commonsense", "--seqlen", "256",
           "--batch-size", "2", "--grad-accum", "2", "--max-steps", "6", "--max-train-tokens", "3000", "--eval-tasks",
           "", "--save-every", "1", "--lr", "3e-3", "--threads", "1", "--out", str(cut)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (cut / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() - t0 < 120, "no checkpoint before the run ended"
        time.sleep(0.002)                                               # (a step takes ~0.1 s)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -9 and not (cut / "finetune_log.json").exists()
    step = torch.load(cut / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 6
    finetune.main(config(tiny_qlora, cut, **kw))                        # the same settings continue it
    assert same_adapters(whole, adapters_of(cut))
    calls, real = [0], finetune.answer_loss                             # Ctrl-C in step 3 (2 passes a step)

    def interrupt(*a):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(finetune, "answer_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(config(tiny_qlora, tmp_path / "ctrl-c", **kw))
    monkeypatch.setattr(finetune, "answer_loss", real)
    finetune.main(config(tiny_qlora, tmp_path / "ctrl-c", **kw))
    assert same_adapters(whole, adapters_of(tmp_path / "ctrl-c"))
    losses = [json.loads((d / "finetune_log.json").read_text())["log"] for d in (tmp_path / "whole", cut)]
    assert [s["loss"] for s in losses[0]] == [s["loss"] for s in losses[1]]
    assert losses[0][0]["lr"] == 0 and losses[0][1]["lr"] == pytest.approx(3e-3)          # warmup 0.1 of 6 steps


BROKEN = [  # (name, file name, content, words of the error line)
    ("missing-answer", "a.jsonl", '{"prompt": "Q: 1 + 1 =", "answer": " 2"}\n{"prompt": "Q: 2 + 2 ="}\n',
     'a.jsonl:2: no "answer" field'),
    ("missing-prompt", "b.jsonl", '{"answer": " 2"}\n', 'b.jsonl:1: no "prompt" field'),
    ("empty-answer", "c.jsonl", '{"prompt": "Q: 1 + 1 =", "answer": ""}\n', "c.jsonl:1: empty answer"),
    ("blank-answer", "d.jsonl", '{"prompt": "Q: 1 + 1 =", "answer": "  \\n"}\n', "d.jsonl:1: empty answer"),
    ("not-json", "e.jsonl", '{"prompt": "Q", "answer": " A"}\n\n{"prompt": "Q", "answer": " A"\n',
     "e.jsonl:3: not JSON"),
    ("empty-file", "f.jsonl", "", "f.jsonl: no examples"),
    ("answer-not-text", "g.jsonl", '{"prompt": "Q", "answer": 5}\n', 'g.jsonl:1: "answer" must be a string'),
    ("longer-than-window", "h.jsonl", '{"prompt": "Q", "answer": " A"}\n' + json.dumps({"prompt": "word " * 80,
                                                                                        "answer": " x"}) + "\n",
     "h.jsonl:2: the example is 84 tokens (prompt + answer + BOS/EOS), longer than the window of --seqlen 64"),
    ("json-not-a-list", "i.json", '{"prompt": "Q", "answer": " A"}', "i.json: a .json file of examples holds a list"),
]


@pytest.mark.parametrize("name,file,content,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_example_is_one_line(tiny_qlora, tmp_path, capsys, name, file, content, words):
    """As the command line reports it (cli.run around finetune.main): exit 2, one `error:` line."""
    import finetune
    from cli import run
    (tmp_path / file).write_text(content)
    term = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run(lambda: finetune.main(config(tiny_qlora, tmp_path / "out", data=str(tmp_path / file), seqlen=64)))
    signal.signal(signal.SIGTERM, term)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "finetune_log.json").exists()


def test_a_broken_example_from_the_command_line(tiny_qlora, tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q: 1 + 1 =", "answer": " 2"}, {"prompt": "Q"}])
    r = subprocess.run([sys.executable, "finetune.py", "--ckpt", str(tiny_qlora), "--data", str(f), "--threads", "1",
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f'error: {f}:2: no "answer" field (a record with '
                                                                  f'"prompt" needs "answer")'], r.stderr[-2000:]


def test_the_official_template_and_answer_parser():
    from examples import Example, commonsense_example, is_correct, parse_answer, record_example, task_parts
    from tasks import Item
    wino = Item(["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so "
                 "Maria"], [" always got the easier cases."], 1)
    assert commonsense_example("winogrande", wino) == Example(
        "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much better "
        "surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria Answer format: "
        "option1/option2\n", "the correct answer is option2", "")
    piqa = Item("Question: Make outdoor pillow.\nAnswer:", [" Blow into tin can.", " Blow into trash bag."], 1)
    assert commonsense_example("piqa", piqa).prompt == (
        "Please choose the correct solution to the question: Make outdoor pillow.\n\nSolution1: Blow into tin can."
        "\n\nSolution2: Blow into trash bag.\n\nAnswer format: solution1/solution2\n")
    ex = commonsense_example("arc_easy", task_parts("arc_easy").train[0])
    assert ex.prompt.startswith("Please choose the correct answer to the question: ") and " Answer2: " in ex.prompt
    assert ex.prompt.endswith("\n\nAnswer format: answer1/answer2/answer3/answer4\n")
    hella = commonsense_example("hellaswag", task_parts("hellaswag").held_out[0])
    assert "\n\nEnding1: " in hella.prompt and hella.answer.startswith("the correct answer is ending")
    assert parse_answer("the correct answer is option2") == "option2" and is_correct("the correct answer is  option2 ",
                                                                                      "option2")
    assert parse_answer("I think option2") == "" and not is_correct("I think option2", "option2")
    assert not is_correct("the correct answer is option2 because", "option2")            # exact match, as official
    assert not is_correct("the correct answer is option1", "option2")
    assert parse_answer("So, the correct answer is answer3\nthe correct answer is answer1") == \
        "answer3\nthe correct answer is answer1"                                          # the first one counts
    gsm = record_example({"question": "How many?", "answer": "2 + 2 = 4\n#### 4"}, "x")
    assert gsm.prompt.endswith("How many?\nAnswer the above question. First think step by step and then answer the "
                               "final number.\n") and gsm.answer == "2 + 2 = 4\nThe final answer is:  4"
    c170k = record_example({"instruction": "Pick.\n\nAnswer format: true/false", "input": "",
                            "output": "the correct answer is true", "answer": "true"}, "x")
    assert c170k == Example("Pick.\n\nAnswer format: true/false\n", "the correct answer is true", "x")


def test_a_local_prompt_answer_file_end_to_end(tiny_qlora, tmp_path):
    import finetune
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "answer": a} for p, a in PAIRS])
    cfg = config(tiny_qlora, tmp_path / "ft", data=str(f), seqlen=64, max_steps=None, epochs=4, grad_accum=1,
                 lr=1e-2, eval_tasks="piqa", eval_items=2)
    assert (cfg.max_grad_norm, cfg.warmup, cfg.schedule, cfg.wd) == (1.0, 0.1, "linear", 0.0)      # EXAMPLES
    summary = finetune.main(cfg)
    log = json.loads((tmp_path / "ft" / "finetune_log.json").read_text())
    losses = [s["loss"] for s in log["log"]]
    assert log["examples"] == 8 and len(losses) == 16 and losses[-1] < losses[0]
    assert sum(s["loss_tokens"] for s in log["log"][:4]) == log["answer_tokens"]              # one epoch
    piqa = summary["eval"]["tasks"]["generated"]["piqa"]
    assert piqa["n"] == 2 and "wikitext2" not in summary["eval"] and math.isfinite(summary["eval"]["tasks"]["zeroshot"]
                                                                                    ["piqa"]["acc"])
    before = load_file(str(tiny_qlora / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) != (k.endswith(".A") or k.endswith(".B")) for k in before)
    import evaluate                                                     # evaluate.py scores the same items
    r = evaluate.main(evaluate.Config(ckpt=str(tmp_path / "ft"), ppl="", tasks="piqa", task_limit=2,
                                      task_part="held_out", generate_answers=True, threads=1))
    assert r["zeroshot_generated"]["piqa"]["acc"] == piqa["acc"]
    assert r["zeroshot"]["piqa"]["acc"] == summary["eval"]["tasks"]["zeroshot"]["piqa"]["acc"]
    # the task study's collector and figure (plots/task_study.py) read the run as results.sh names it
    sys.path.insert(0, str(ROOT / "plots"))
    import task_study as study
    (tmp_path / "study").mkdir()
    (tmp_path / "ft").rename(tmp_path / "study" / "qlora-w2-s0")
    study.main(SimpleNamespace(results=str(tmp_path / "study"), json=str(tmp_path / "study.json"),
                               out=str(tmp_path / "tasks.png")))
    kept = json.loads((tmp_path / "study.json").read_text())
    row, = kept["rows"]
    assert kept["chance"] == {"piqa": 0.5, "avg": 0.5}                          # PIQA: two solutions an item
    p = piqa["acc"]
    assert (row["start"], row["bits"], row["seed"], row["before"]) == ("qlora", 2, 0, None)
    assert row["after"]["generated"]["avg"] == p and row["after"]["generated"]["se"] == pytest.approx(
        math.sqrt(p * (1 - p) / 2))
    assert (tmp_path / "tasks.png").stat().st_size > 10_000
    # collected again from another lane's directory into the same JSON: the first run's row is kept
    (tmp_path / "lane2").mkdir()
    (tmp_path / "study" / "qlora-w2-s0").rename(tmp_path / "lane2" / "qlora-w2-s1")
    study.main(SimpleNamespace(results=str(tmp_path / "lane2"), json=str(tmp_path / "study.json"),
                               out=str(tmp_path / "tasks.png")))
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [(r["start"], r["seed"]) for r in rows] == [("qlora", 0), ("qlora", 1)] and rows[0] == row


def test_a_resumed_run_reads_the_start_s_scores_back(tiny_qlora, tmp_path, monkeypatch):
    """--eval-before scores the start once: a run killed in training reads OUT/eval_before.json back
    (under the same settings only), and the finished log carries it."""
    import finetune
    calls, real_held_out, real_train = [], finetune.held_out, finetune.train
    monkeypatch.setattr(finetune, "held_out", lambda *a: calls.append(1) or real_held_out(*a))

    def killed(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "train", killed)
    cfg = config(tiny_qlora, tmp_path / "ft", eval_before=True, eval_tasks="piqa", eval_items=2)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(cfg)
    kept = json.loads((tmp_path / "ft" / "eval_before.json").read_text())
    assert len(calls) == 1 and kept["eval"]["tasks"]["generated"]["piqa"]["n"] == 2
    monkeypatch.setattr(finetune, "train", real_train)
    finetune.main(cfg)
    log = json.loads((tmp_path / "ft" / "finetune_log.json").read_text())
    assert len(calls) == 2 and log["eval_before"] == kept["eval"]                # the start not scored again
    assert not (tmp_path / "ft" / "eval_before.json").exists()
    other = tmp_path / "other"                                                  # other settings: scored anew
    other.mkdir()
    (other / "eval_before.json").write_text(json.dumps({"settings": {"lr": 1}, "eval": {"tasks": "stale"}}))
    monkeypatch.setattr(finetune, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(config(tiny_qlora, other, eval_before=True, eval_tasks="piqa", eval_items=2))
    assert len(calls) == 3 and json.loads((other / "eval_before.json").read_text())["eval"] == kept["eval"]


def test_an_official_set_by_name_reads_through_datasets(tiny_qlora, tmp_path, monkeypatch):
    """commonsense_170k through `datasets` (replaced here by a small local .jsonl in its layout, since
    the Hub is out of reach): the same records, the commonsense template; unreachable, one line."""
    import examples
    import finetune
    rows = [{"instruction": f"Please choose the correct answer to the question: {q}?\n\nAnswer1: yes Answer2: no\n\n"
                            f"Answer format: answer1/answer2", "input": "", "output": f"the correct answer is {a}",
             "answer": a} for q, a in [("Is ice cold", "answer1"), ("Is fire cold", "answer2")] * 4]
    f = write_jsonl(tmp_path / "commonsense_170k.jsonl", rows)
    monkeypatch.setattr(examples, "hub_dataset", lambda *a, **kw: [json.loads(x) for x in f.read_text().splitlines()])
    finetune.main(config(tiny_qlora, tmp_path / "ft", data="commonsense_170k", max_steps=2, eval_tasks=None,
                         eval_items=1))
    log = json.loads((tmp_path / "ft" / "finetune_log.json").read_text())
    assert log["examples"] == 8 and set(log["eval"]["tasks"]["zeroshot"]) == set(TASKS)      # scored by default
    pairs = lambda exs: [(ex.prompt, ex.answer) for ex in exs]                  # noqa: E731
    assert pairs(examples.read_examples(f)) == pairs(examples.hub_examples("commonsense_170k"))

    def offline(*a, **kw):
        raise FileNotFoundError("the datasets hub is not reachable")
    monkeypatch.setattr(examples, "hub_dataset", offline)
    with pytest.raises(FileNotFoundError, match="--data gsm8k: `datasets` could not load openai/gsm8k"):
        examples.hub_examples("gsm8k")
