"""Tokenizers for the Llama-family models apiq quantizes, all with one small interface.

    bos_id: int | None, eos_id: int | None, n_words: int
    encode(text, bos=False, eos=False) -> list[int];  decode(ids) -> str

* SentencePieceTokenizer -- Llama-2 ``tokenizer.model`` (sentencepiece).
* Llama3Tokenizer        -- Llama-3 tiktoken ranks file, behaving like Meta's llama3 tokenizer.py.
* GGUFTokenizer          -- the byte-level BPE vocabulary stored in a GGUF file
                            (``tokenizer.ggml.model == "gpt2"``, e.g. SmolLM2), run through tiktoken.

Example::

    tok = Llama3Tokenizer("tokenizer.model")
    tok.encode("Hello world, this is a test.")   # [9906, 1917, 11, 420, 374, 264, 1296, 13]
"""
from __future__ import annotations

import os

import tiktoken
from tiktoken.load import load_tiktoken_bpe


def _check_file(path) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return str(path)


def _wrap(ids: list[int], bos_id: int | None, eos_id: int | None, bos: bool, eos: bool) -> list[int]:
    return ([bos_id] if bos and bos_id is not None else []) + ids + ([eos_id] if eos and eos_id is not None else [])


class SentencePieceTokenizer:
    """Llama-2 SentencePiece tokenizer (bos=1, eos=2, 32000 pieces)."""

    def __init__(self, path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=_check_file(path))
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # -1 means "none"
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return _wrap(self.sp.encode(text), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


# Meta's Llama-3 split regex (llama3 tokenizer.py pat_str).
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                  + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])  # 256 in all


def _split_long_runs(s: str, max_run: int):
    """Cut s so no piece holds more than max_run consecutive whitespace (or non-whitespace)
    characters; tiktoken gets very slow on such runs. Same cut points as Meta's tokenizer."""
    start, run, in_space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != in_space:
            run, in_space = 1, ch.isspace()
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class Llama3Tokenizer:
    """Llama-3 tiktoken tokenizer (128000 BPE ranks + 256 special tokens, bos=128000, eos=128001).
    Special-token text in the input is encoded as plain text, as Meta's encode does by default."""

    MAX_CHARS = 400_000  # Meta's TIKTOKEN_MAX_ENCODE_CHARS
    MAX_RUN = 25_000  # Meta's MAX_NO_WHITESPACES_CHARS

    def __init__(self, path):
        self.path = _check_file(path)
        ranks = load_tiktoken_bpe(self.path)
        self.special_tokens = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)}
        self.model = tiktoken.Encoding(os.path.basename(str(path)), pat_str=LLAMA3_PAT,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = []
        for i in range(0, len(text), self.MAX_CHARS):
            for piece in _split_long_runs(text[i:i + self.MAX_CHARS], self.MAX_RUN):
                ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        return _wrap(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.model.decode([int(i) for i in ids])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens: printable
    Latin-1 bytes stand for themselves, the other bytes get chr(256), chr(257), ... in byte order."""
    table = {b: chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)]}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF's Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)] as one regex: every
# digit is its own piece, and since the digit split runs first, whitespace before a digit ends
# its piece, so `\s+(?!\S)` must treat a following digit like the end of the text.
SMOLLM_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
GGUF_PRE_PATTERNS = {"gpt2": GPT2_PAT, "default": GPT2_PAT, "smollm": SMOLLM_PAT,
                     "llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT}
NORMAL, BYTE = 1, 6  # llama.cpp token types; every other type (control, user-defined, ...) is matched whole


class GGUFTokenizer:
    """Byte-level BPE vocabulary of a GGUF file (``tokenizer.ggml.model == "gpt2"``), matching
    Hugging Face tokenizers: merges apply in the file's merge order, control/user-defined tokens
    are recognised inside the text, bytes missing from the vocabulary (SmolLM2 lacks e.g. \\x04)
    are dropped as HF does without an unk token -- but HF then merges across the gap and we
    do not, so ",\\x04," differs. ``encode(bos=True)`` adds bos only when the file's
    ``tokenizer.ggml.add_bos_token`` is true (SmolLM2's is false), i.e. it asks for "the model's
    usual prefix"; ``eos=True`` always appends eos."""

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str], pre: str,
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = False):
        # what a saved quantized model needs to rebuild this tokenizer without the GGUF file
        self.spec = dict(tokens=tokens, token_types=token_types, merges=merges, pre=pre,
                         bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)
        if pre not in GGUF_PRE_PATTERNS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(GGUF_PRE_PATTERNS)})")
        b2u = _bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        token_id = {t: i for i, t in enumerate(tokens)}
        self.id_to_bytes = []
        specials = {}
        for i, (t, ty) in enumerate(zip(tokens, token_types)):
            if ty in (NORMAL, BYTE):
                self.id_to_bytes.append(bytes(u2b[c] for c in t))
            else:
                self.id_to_bytes.append(t.encode("utf-8"))
                specials[t] = i
        # tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair
        # with the earliest merge rule; so rank = merge position (after the 256 single bytes),
        # mapped back to vocabulary ids after encoding. Bytes absent from the vocab map to None.
        # (tiktoken would also join a pair that is not itself a merge rule if the result is a
        # token; for SmolLM2 this never changes the output -- tests compare against HF.)
        ranks = {bytes([b]): b for b in range(256)}
        rank_to_id = [token_id.get(b2u[b]) for b in range(256)]
        for m in merges:
            a, b = m.split(" ")
            merged = bytes(u2b[c] for c in a + b)
            if merged not in ranks:
                ranks[merged] = len(rank_to_id)
                rank_to_id.append(token_id[a + b])
        special_ranks = {t: len(rank_to_id) + k for k, t in enumerate(specials)}
        rank_to_id += list(specials.values())
        self.rank_to_id = rank_to_id
        self.model = tiktoken.Encoding(f"gguf-{pre}", pat_str=GGUF_PRE_PATTERNS[pre],
                                       mergeable_ranks=ranks, special_tokens=special_ranks)
        self.n_words, self.bos_id, self.eos_id, self.add_bos, self.pre = len(tokens), bos_id, eos_id, add_bos, pre

    @classmethod
    def from_gguf(cls, reader_or_path) -> "GGUFTokenizer":
        """Build from a ``gguf.GGUFReader`` or a path to a .gguf file."""
        if isinstance(reader_or_path, (str, os.PathLike)):
            from gguf import GGUFReader

            reader_or_path = GGUFReader(_check_file(reader_or_path))
        fields = reader_or_path.fields

        def get(key, default=None):
            return fields[key].contents() if key in fields else default

        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"GGUFTokenizer needs tokenizer.ggml.model 'gpt2', got {get('tokenizer.ggml.model')!r}")
        tokens = get("tokenizer.ggml.tokens")
        return cls(tokens, get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)),
                   get("tokenizer.ggml.merges", []), get("tokenizer.ggml.pre", "default"),
                   get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id"),
                   bool(get("tokenizer.ggml.add_bos_token", False)))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ranks = self.model.encode(text, allowed_special="all", disallowed_special=())
        ids = [i for i in map(self.rank_to_id.__getitem__, ranks) if i is not None]
        return _wrap(ids, self.bos_id, self.eos_id, bos and self.add_bos, eos)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.id_to_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")
