"""tokenizer.py on the real tokenizer files, checked against known ids and against independent
Hugging Face `tokenizers` pipelines built straight from the same vocabularies."""
import pytest

from conftest import need
from tokenizer import GGUFTokenizer, Llama3Tokenizer, SentencePieceTokenizer

TEXT = "Hello world, this is a test."
HARD = [
    "12345", "abc  123", "abc   123 x", "x 42", " 1 2  3\t4\n5", "3.14e-10", "$$$ 100", "½ ² ٣ Ⅻ ①",
    "a\n\n\nb", "\t\tx", "  leading", "trailing   ", "x \n 9", "\r\n\r\n", "   ", "", "x\u00a0y", "\u3000z",
    "héllo wörld", "日本語のテキスト", "emoji 😀🎉 👍🏽", "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f flag",
    "I'm you're we've they'll he'd it's", "DON'T", "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|><|endoftext|>", "<|begin_of_text|><|eot_id|>", "a\x04b",
]


@pytest.fixture(scope="module")
def wiki_lines(data_dir):
    return (data_dir / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")


@pytest.fixture(scope="module")
def llama2(data_dir):
    return SentencePieceTokenizer(data_dir / "tokenizers" / "llama2" / "tokenizer.model")


@pytest.fixture(scope="module")
def llama3(data_dir):
    return Llama3Tokenizer(data_dir / "tokenizers" / "llama3" / "tokenizer.model")


@pytest.fixture(scope="module")
def reader(smollm2_gguf):
    from gguf import GGUFReader
    return GGUFReader(str(smollm2_gguf))


@pytest.fixture(scope="module")
def smol(reader):
    return GGUFTokenizer.from_gguf(reader)


def first_mismatch(texts, ours, ref):
    bad = [(t, a, b) for t, a, b in zip(texts, ours, ref) if a != b]
    return f"{len(bad)}/{len(texts)} differ, first: {bad[0]}" if bad else None


# --- known ids -------------------------------------------------------------------------------

def test_llama2_known_ids(llama2):
    assert llama2.encode(TEXT) == [15043, 3186, 29892, 445, 338, 263, 1243, 29889]
    assert (llama2.bos_id, llama2.eos_id, llama2.n_words) == (1, 2, 32000)
    assert llama2.encode(TEXT, bos=True, eos=True)[::9] == [1, 2]


def test_llama3_known_ids_and_special_tokens(llama3):
    assert llama3.encode(TEXT) == [9906, 1917, 11, 420, 374, 264, 1296, 13]
    assert (llama3.bos_id, llama3.eos_id, llama3.n_words) == (128000, 128001, 128256)
    assert llama3.encode(TEXT, bos=True, eos=True)[::9] == [128000, 128001]
    # Meta's published ids for the chat tokens and the reserved range.
    sp = llama3.special_tokens
    assert [sp["<|start_header_id|>"], sp["<|end_header_id|>"], sp["<|eot_id|>"]] == [128006, 128007, 128009]
    assert sp["<|reserved_special_token_4|>"] == 128008 and sp["<|reserved_special_token_5|>"] == 128010
    assert sp["<|reserved_special_token_250|>"] == 128255 and len(sp) == 256
    assert llama3.decode([128006, 882, 128007]) == "<|start_header_id|>user<|end_header_id|>"


# --- Llama-3 vs Meta's behaviour (reference: HF BPE built from the same ranks) ----------------

@pytest.fixture(scope="module")
def llama3_ref(data_dir):
    conv = need("tokenizers", "transformers.convert_slow_tokenizer")
    # No special tokens added: Meta's encode treats special-token text as plain text.
    return conv.TikTokenConverter(vocab_file=str(data_dir / "tokenizers" / "llama3" / "tokenizer.model")).converted()


def test_llama3_matches_reference(llama3, llama3_ref, wiki_lines):
    texts = wiki_lines[:1500] + HARD + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]
    ref = [e.ids for e in llama3_ref.encode_batch(texts, add_special_tokens=False)]
    assert first_mismatch(texts, [llama3.encode(t) for t in texts], ref) is None
    assert not set(llama3.encode("<|begin_of_text|><|eot_id|>")) & set(llama3.special_tokens.values())


def test_llama3_chunks_long_runs_like_meta(llama3, llama3_ref):
    def ref(s):
        return llama3_ref.encode(s, add_special_tokens=False).ids
    # Meta cuts after 25000 consecutive whitespace (or non-whitespace) characters.
    text = "x" + " " * 30000 + "y"
    assert llama3.encode(text) == ref("x" + " " * 25000) + ref(" " * 5000 + "y") != ref(text)
    assert llama3.encode(" " * 25000 + "y") == ref(" " * 25000 + "y")  # exactly at the limit: one piece
    long_word = "ab" * 13000
    assert llama3.encode(long_word) == ref(long_word[:25000]) + ref(long_word[25000:])
    assert llama3.decode(llama3.encode(text)) == text


# --- GGUF (SmolLM2) vs Hugging Face tokenizers built from the file's vocab + merges ----------

@pytest.fixture(scope="module")
def smol_ref(reader):
    tk = need("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    f = reader.fields
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"].contents()]
    ref = tk.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2's tokenizer.json pre-tokenizer, i.e. what tokenizer.ggml.pre == "smollm" stands for.
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, y in zip(tokens, types) if y == 3])
    return ref


def test_smollm2_metadata(smol, smollm2_gguf):
    assert (smol.n_words, smol.bos_id, smol.eos_id, smol.add_bos, smol.pre) == (49152, 1, 2, False, "smollm")
    assert smol.encode("Hi", bos=True, eos=True) == smol.encode("Hi") + [2]  # file says add_bos_token=False
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5  # control tokens are matched whole
    assert GGUFTokenizer.from_gguf(smollm2_gguf).encode(TEXT) == smol.encode(TEXT)  # path == reader


def test_smollm2_splits_every_digit(smol):
    assert [smol.decode([i]) for i in smol.encode("abc   123")] == ["abc", "   ", "1", "2", "3"]


def test_smollm2_matches_reference(smol, smol_ref, wiki_lines):
    texts = wiki_lines + HARD + ["\n".join(wiki_lines[:300])]
    ref = [e.ids for e in smol_ref.encode_batch(texts, add_special_tokens=False)]
    assert first_mismatch(texts, [smol.encode(t) for t in texts], ref) is None
    ids = smol.encode(texts[-1])
    assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=False)


# --- round trips and errors -------------------------------------------------------------------

def test_round_trips(llama2, llama3, smol, wiki_lines):
    texts = wiki_lines[:300] + [t for t in HARD if t != "a\x04b"]  # \x04 is not in SmolLM2's vocab
    for tok in (llama2, llama3, smol):
        bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
        assert not bad, f"{type(tok).__name__}: {bad[:3]}"
    assert smol.decode(smol.encode("a\x04b")) == "ab"  # dropped, as HF does without an unk token


def test_errors(tmp_path, reader):
    for cls in (SentencePieceTokenizer, Llama3Tokenizer):
        with pytest.raises(FileNotFoundError, match="not found"):
            cls(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError):
        GGUFTokenizer.from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'nope'"):
        GGUFTokenizer(["a"], [1], [], "nope")
