"""Grow a base tokenizer with target-language tokens, as real BPE vocabulary and merges.

1. A BPE tokenizer of the base's own family is trained on the target text with the `tokenizers` library:
   byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2) keeps the base's normalizer and pre-tokenizer; SentencePiece-style
   BPE (Llama-2, Mistral: `▁` for spaces, byte fallback) splits words at `▁` the way SentencePiece does.
2. Its merges are walked in the order it learned them (most frequent first). Each token the base lacks that is a
   word or a piece of a word (letters and combining marks, optionally after a space) and, unless `ascii_tokens`,
   holds a non-ASCII character, is made reachable in the base: the base's own BPE splits it into pieces, and merges
   are appended that join those pieces — one merge when the base splits it in two, a short chain through
   intermediate tokens otherwise. Every added token and merge comes after the base's, so they have the lowest
   priority: the base applies all of its own merges first, and text whose base tokens never sit next to each other
   as a new merge's pair is tokenised exactly as before.
3. Tokens made only of ASCII are left out by default, and so are digits, punctuation and whitespace: English, code
   and numbers keep the base's token ids (the base split digits on purpose), and English words the target text
   happens to share — names such as "Kissinger" in Vietnamese Wikipedia — do not get new, untrained tokens.
4. Bytes the base's alphabet lacks (a GGUF conversion can drop some; the tokenizer then silently loses them) are
   added first, as tokens of their own, so that decode(encode(text)) == text for any UTF-8 text. A
   SentencePiece-style base likewise gains, as single-character tokens, the target's letters it only had as bytes.
"""

from __future__ import annotations

import copy
import json
import unicodedata
from dataclasses import dataclass
from typing import Iterable

from graftlm.errors import GraftError

BYTE_LEVEL = "byte-level BPE"
SENTENCEPIECE = "SentencePiece-style BPE"
SPACE_MARK = "▁"  # SentencePiece's visible space


def tokenizer_family(tokenizer_json: dict) -> str:
    """Which kind of BPE a tokenizer.json holds; other tokenizers (WordPiece, Unigram) are refused."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise GraftError(f"vocab: the base tokenizer is a {model.get('type', 'unknown')} model; vocabulary "
                         f"extension supports {BYTE_LEVEL} (GPT-2, Llama-3, Qwen, SmolLM2) and {SENTENCEPIECE} "
                         f"(Llama-2, Mistral)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise GraftError("vocab: the base BPE tokenizer uses subword prefixes or suffixes, which is not supported")
    components = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    if '"ByteLevel"' in components:
        return BYTE_LEVEL
    if model.get("byte_fallback") or SPACE_MARK in components or '"Metaspace"' in components:
        return SENTENCEPIECE
    raise GraftError("vocab: the base tokenizer is BPE but neither byte-level nor SentencePiece-style; "
                     "vocabulary extension cannot tell how it splits words")


def train_target_tokenizer(texts: Iterable[str], base_json: dict, vocab_size: int, min_frequency: int) -> dict:
    """Train a BPE tokenizer of the base's family on `texts`; returns its tokenizer.json as a dict."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = Tokenizer.from_str(json.dumps(base_json))
    if tokenizer_family(base_json) == BYTE_LEVEL:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = base.normalizer
        tokenizer.pre_tokenizer = base.pre_tokenizer
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(byte_fallback=True))
        tokenizer.normalizer = base.normalizer
        tokenizer.pre_tokenizer = _word_splitter(base_json.get("pre_tokenizer"))
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return json.loads(tokenizer.to_str())


def _word_splitter(pre_tokenizer: dict | None):
    """For SentencePiece-style training: split at `▁` so that no token spans two words (SentencePiece's default).
    A Metaspace base pre-tokenizer is kept with splitting on; otherwise the base normalizer has already put `▁`."""
    from tokenizers import pre_tokenizers

    if pre_tokenizer and pre_tokenizer.get("type") == "Metaspace":
        return pre_tokenizers.Metaspace(replacement=pre_tokenizer.get("replacement", SPACE_MARK),
                                        prepend_scheme=pre_tokenizer.get("prepend_scheme", "always"), split=True)
    return pre_tokenizers.Split(SPACE_MARK, behavior="merged_with_next")


# ---- a BPE model small enough to reason with ------------------------------------------------------------


class BpeTable:
    """The vocabulary and ranked merges of a BPE model, able to split one token exactly as `tokenizers` does
    (repeatedly join the adjacent pair of lowest merge rank, leftmost first) and to grow by appended merges."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], byte_fallback: bool = False,
                 unk_token: str | None = None):
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.byte_fallback, self.unk_token = byte_fallback, unk_token

    @classmethod
    def of(cls, tokenizer_json: dict) -> "BpeTable":
        model = tokenizer_json["model"]
        return cls(model["vocab"], merge_pairs(model["merges"]), bool(model.get("byte_fallback")),
                   model.get("unk_token"))

    def split(self, token: str) -> list[str]:
        symbols: list[str] = []
        for char in token:
            if char in self.vocab:
                symbols.append(char)
            elif self.byte_fallback:
                symbols.extend(f"<0x{byte:02X}>" for byte in char.encode())
            else:
                symbols.append(self.unk_token or char)
        unmerged = len(self.ranks)
        while len(symbols) > 1:
            rank, i = min((self.ranks.get((symbols[i], symbols[i + 1]), unmerged), i)
                          for i in range(len(symbols) - 1))
            if rank == unmerged:
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    def ids(self, pieces: list[str]) -> list[int]:
        unk = self.vocab.get(self.unk_token) if self.unk_token else None
        return [self.vocab.get(p, unk) for p in pieces if p in self.vocab or unk is not None]

    def add(self, token: str, token_id: int, pair: tuple[str, str] | None) -> None:
        """Add a token, made by merging `pair` (None: a single character, reached without a merge)."""
        self.vocab[token] = token_id
        if pair is not None:
            self.ranks[pair] = len(self.merges)
            self.merges.append(pair)

    def remove(self, token: str, pair: tuple[str, str] | None) -> None:
        """Undo the latest `add`."""
        del self.vocab[token]
        if pair is not None:
            del self.ranks[self.merges.pop()]


def merge_pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json stores merges as `[a, b]` pairs or, in older files, as `"a b"` strings."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


# ---- which trained tokens are worth adding ------------------------------------------------------------------


def _byte_level_decoding() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's): each byte is shown as a printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    return dict(zip(chars, printable + others))


BYTE_OF_CHAR = _byte_level_decoding()


def token_bytes(token: str, family: str) -> bytes:
    """The UTF-8 bytes a token stands for (a byte-level token may hold part of a character)."""
    if family == BYTE_LEVEL:
        return bytes(BYTE_OF_CHAR[c] for c in token)
    return token.replace(SPACE_MARK, " ").encode()


def is_word_piece(data: bytes, ascii_tokens: bool) -> bool:
    """A word or a piece of a word: letters and combining marks, optionally after one space; a byte-level piece may
    start or end in the middle of a (non-ASCII) character. Unless `ascii_tokens`, it must hold a non-ASCII byte."""
    if data.startswith(b" "):
        data = data[1:]
    if not data or (not ascii_tokens and data.isascii()):
        return False
    start = 0
    while start < len(data) and 0x80 <= data[start] < 0xC0:  # the tail of a character begun in another token
        start += 1
    end = len(data)
    lead = end - 1
    while lead >= start and 0x80 <= data[lead] < 0xC0:
        lead -= 1
    if lead >= start and data[lead] >= 0xC0:  # a character that another token completes
        length = 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
        if end - lead < length:
            end = lead
    try:
        text = data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(unicodedata.category(c)[0] in "LM" for c in text)


# ---- the merge ------------------------------------------------------------------------------------------------


@dataclass
class Extension:
    """A base tokenizer grown with new tokens: ids `first_id ...` are `tokens`, in order."""

    family: str
    tokenizer_json: dict
    first_id: int
    tokens: list[str]
    merges: list[tuple[str, str] | None]
    """The merge that makes each new token; None for a byte or character the base lacked (reached without one)."""
    base_pieces: list[list[int]]
    """For each new token, the ids of the base tokens that the base tokenizer splits it into (for FVT)."""
    trained_candidates: int
    """How many tokens of the trained tokenizer were new to the base and word pieces."""


def extend_tokenizer(base_json: dict, trained_json: dict, new_tokens: int, ascii_tokens: bool = False) -> Extension:
    """Add up to `new_tokens` tokens of the trained tokenizer to the base, most frequent first."""
    family = tokenizer_family(base_json)
    table = BpeTable.of(base_json)
    first_id = 1 + max([*table.vocab.values(), *(t["id"] for t in base_json.get("added_tokens") or [])])
    added: list[tuple[str, tuple[str, str] | None]] = []  # (token, the merge that makes it)

    def add(token: str, pair: tuple[str, str] | None) -> None:
        table.add(token, first_id + len(added), pair)
        added.append((token, pair))

    def allowed(token: str) -> bool:
        return is_word_piece(token_bytes(token, family), ascii_tokens)

    for byte_token in _missing_bytes(family, table)[:new_tokens]:
        add(byte_token, None)
    trained_order = {a + b: rank for rank, (a, b) in enumerate(merge_pairs(trained_json["model"]["merges"]))}
    candidates = 0
    for token in trained_order:
        if len(added) >= new_tokens:
            break
        if token in table.vocab or not allowed(token):
            continue
        candidates += 1
        mark = len(added)
        if not _make_reachable(token, table, add, allowed, trained_order, family) or len(added) > new_tokens:
            while len(added) > mark:  # could not reach it within the budget: take back its intermediates
                table.remove(*added.pop())

    merged = copy.deepcopy(base_json)
    merged["model"]["vocab"] = table.vocab
    merged["model"]["merges"] = [list(pair) for pair in table.merges]
    base_table = BpeTable.of(base_json)
    pieces = [base_table.ids(base_table.split(token)) for token, _ in added]
    return Extension(family, merged, first_id, [token for token, _ in added], [pair for _, pair in added], pieces,
                     candidates)


def _missing_bytes(family: str, table: BpeTable) -> list[str]:
    """The byte tokens a byte-level or byte-fallback tokenizer should have and this one lacks."""
    if family == BYTE_LEVEL:
        wanted = sorted(BYTE_OF_CHAR, key=BYTE_OF_CHAR.get)
    elif table.byte_fallback:
        wanted = [f"<0x{byte:02X}>" for byte in range(256)]
    else:
        wanted = []
    return [token for token in wanted if token not in table.vocab]


def _make_reachable(token: str, table: BpeTable, add, allowed, trained_order: dict[str, int], family: str) -> bool:
    """Append merges until the table's own BPE turns `token` into one token. When the base splits it into more than
    two pieces, adjacent pieces are joined first into intermediate tokens that are themselves allowed, preferring
    those the trained tokenizer learned earliest. False when no allowed join is left."""
    if family == SENTENCEPIECE:  # characters the base lacks (it would fall back to bytes) become tokens first
        for char in dict.fromkeys(token):
            if char not in table.vocab:
                if not allowed(char):
                    return False
                add(char, None)
    pieces = table.split(token)
    while len(pieces) > 1:
        if len(pieces) == 2:
            i = 0
        else:
            joins = [(trained_order.get(joined, len(trained_order)), i) for i in range(len(pieces) - 1)
                     if (joined := pieces[i] + pieces[i + 1]) not in table.vocab and allowed(joined)]
            if not joins:
                return False
            i = min(joins)[1]
        add(pieces[i] + pieces[i + 1], (pieces[i], pieces[i + 1]))
        pieces = table.split(token)
    return True
