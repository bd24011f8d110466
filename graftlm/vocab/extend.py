"""Grow a base tokenizer with target-language tokens, as real BPE vocabulary and merges.

1. A BPE tokenizer of the base's own family is trained on the target text with the `tokenizers` library:
   byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2) keeps the base's normalizer and pre-tokenizer; SentencePiece-style
   BPE (Llama-2, Mistral: `▁` for spaces, byte fallback) splits words at `▁` the way SentencePiece does.
2. Its merges are walked in the order it learned them (most frequent first). Each token the base lacks that is a
   word or a piece of a word (letters and combining marks, optionally after a space; any script) is made reachable
   in the base: the base's own BPE splits it into pieces, and merges are appended that join those pieces — one
   merge when the base splits it in two, a short chain through intermediate tokens otherwise. Every added token and
   merge comes after the base's, so they have the lowest priority: the base applies all of its own merges first,
   and text whose base tokens never sit next to each other as a new merge's pair is tokenised exactly as before.
3. The replay (source-language) text is protected where it matters, whatever the characters: a candidate is
   skipped when it would change the tokens of more than `max_replay_change` of the replay text's words, or serve
   the target text less than `replay_ratio` times as often as it changes them (`ReplayGuard`, measured on samples
   of both). Plain-ASCII target languages (Indonesian, Swahili) get
   their words, and English words the target text happens to share — names such as "Kissinger" in Vietnamese
   Wikipedia — do not get new, untrained tokens. Digits, punctuation and whitespace are never added: numbers keep
   the base's ids (the base split digits on purpose).
4. Bytes the base's alphabet lacks (a GGUF conversion can drop some; the tokenizer then silently loses them) are
   added first, as tokens of their own, so that decode(encode(text)) == text for any UTF-8 text. A
   SentencePiece-style base likewise gains, as single-character tokens, the target's letters it only had as bytes.
"""

from __future__ import annotations

import copy
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
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


def is_word_piece(data: bytes) -> bool:
    """A word or a piece of a word: letters and combining marks (any script), optionally after one space; a
    byte-level piece may start or end in the middle of a character."""
    if data.startswith(b" "):
        data = data[1:]
    if not data:
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


# ---- protecting the replay text ------------------------------------------------------------------------------


def pre_token_counts(texts: Iterable[str], base_json: dict) -> Counter:
    """How often each pre-token (a word with its leading space, as the base's normalizer and pre-tokenizer cut
    text before BPE) occurs in `texts`, written in the base's token alphabet."""
    from tokenizers import Tokenizer

    base = Tokenizer.from_str(json.dumps(base_json))
    normalizer = base.normalizer
    if tokenizer_family(base_json) == BYTE_LEVEL:
        pre_tokenizer = base.pre_tokenizer
    else:  # SentencePiece-style: words start at ▁, as the target tokenizer is trained
        pre_tokenizer = _word_splitter(base_json.get("pre_tokenizer"))
    counts: Counter = Counter()
    for text in texts:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    return counts


def token_shares(texts: list[str], trained_json: dict, base_json: dict) -> dict[str, float]:
    """How often the trained tokenizer uses each of its tokens on `texts`, per word of the text (a word being a
    pre-token, `pre_token_counts`): what a token would do for the target text."""
    from tokenizers import Tokenizer

    trained = Tokenizer.from_str(json.dumps(trained_json))
    uses: Counter = Counter()
    for encoding in trained.encode_batch(texts, add_special_tokens=False):
        uses.update(encoding.tokens)
    words = max(sum(pre_token_counts(texts, base_json).values()), 1)
    return {token: count / words for token, count in uses.items()}


class ReplayGuard:
    """Replay protection: whether a candidate's merges would change the replay text's tokens more than its use to
    the target text is worth.

    The replay text is held as its words (pre-tokens) with their counts and current tokens under the growing
    BpeTable. New merges rank after every base merge, so on a word they only act on its final base tokens, in the
    order they were added: a merge (a, b) can change a word only where `a b` are adjacent among its current tokens
    (an index from pairs to words finds those), and a single character a SentencePiece-style base gains changes
    the words that hold it (they fell back to bytes).

    A candidate is allowed when it changes at most `max_change` of the replay words, and its share of the target
    text's words (`token_shares`) is at least `ratio` times the share of replay words it changes. A sample cannot
    show that a token never occurs in the replay language, so a
    token made only of characters the replay text uses counts one changed word more (add-one smoothing: the
    English name "Kissinger" in Vietnamese Wikipedia, unseen in a small English sample, needs a real use to the
    target text); a token with a character the replay text never uses (Cyrillic against English) does not."""

    def __init__(self, counts: Counter, table: BpeTable, family: str, ratio: float, max_change: float = 1.0):
        self.words = list(counts)
        self.counts = [counts[w] for w in self.words]
        self.total = max(sum(self.counts), 1)
        self.family, self.ratio, self.max_change = family, ratio, max_change
        self.tokens = [table.split(w) for w in self.words]
        self.index: dict[tuple[str, str], set[int]] = {}
        for i, tokens in enumerate(self.tokens):
            self._index(i, tokens, add=True)
        self.bytes = set(b"".join(token_bytes(w, family) for w in self.words))
        self.chars = set(b"".join(token_bytes(w, family) for w in self.words).decode("utf-8", errors="ignore"))
        self.changed: set[int] = set()  # words whose tokens differ from the base's

    def _index(self, i: int, tokens: list[str], add: bool) -> None:
        for pair in zip(tokens, tokens[1:]):
            if add:
                self.index.setdefault(pair, set()).add(i)
            elif pair in self.index:
                self.index[pair].discard(i)

    def retokenised(self, table: BpeTable, steps: list[tuple[str, tuple[str, str] | None]]) -> dict[int, list[str]]:
        """The words whose tokens change once `steps` (token, merge) are in `table` (they already are), with their
        new tokens."""
        touched: set[int] = set()
        for token, pair in steps:
            if pair is not None:
                touched |= self.index.get(pair, set())
            elif len(token) == 1:  # a character the base lacked
                touched |= {i for i, word in enumerate(self.words) if token in word}
        updates = {}
        for i in touched:
            tokens = table.split(self.words[i])
            if tokens != self.tokens[i]:
                updates[i] = tokens
        return updates

    def could_occur(self, token: str) -> bool:
        """Whether the replay text uses every character (and byte) of `token`."""
        data = token_bytes(token, self.family)
        return set(data) <= self.bytes and set(data.decode("utf-8", errors="ignore")) <= self.chars

    def allows(self, token: str, updates: dict[int, list[str]], target_share: float) -> bool:
        changed = sum(self.counts[i] for i in updates)
        if changed > self.max_change * self.total:
            return False
        smoothed = changed + (1 if self.could_occur(token) else 0)
        return target_share >= self.ratio * smoothed / self.total

    def commit(self, updates: dict[int, list[str]]) -> None:
        for i, tokens in updates.items():
            self._index(i, self.tokens[i], add=False)
            self.tokens[i] = tokens
            self._index(i, tokens, add=True)
            self.changed.add(i)

    def changed_share(self) -> float:
        """The share of the replay text's word occurrences that no longer tokenise as with the base."""
        return sum(self.counts[i] for i in self.changed) / self.total


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
    skipped: dict[str, int] = field(default_factory=dict)
    """Trained tokens not added, by reason: `in_base`, `not_a_word_piece`, `changes_replay` (see ReplayGuard),
    `unreachable` (no allowed chain of merges within the budget)."""
    replay: dict = field(default_factory=dict)
    """The replay check: {"words": replay word occurrences measured, "ratio", "max_change", "changed_share": the
    share of those words the added tokens retokenise}; empty without it."""


def extend_tokenizer(base_json: dict, trained_json: dict, new_tokens: int, replay: Counter | None = None,
                     target_shares: dict[str, float] | None = None, replay_ratio: float = 4.0,
                     max_replay_change: float = 1e-4) -> Extension:
    """Add up to `new_tokens` tokens of the trained tokenizer to the base, most frequent first. With `replay` (the
    pre-token counts of a sample of the replay text, `pre_token_counts`) and `target_shares` (`token_shares` of a
    sample of the target text), a candidate is skipped when it changes more than `max_replay_change` of the replay
    words, or serves the target text less than `replay_ratio` times as often as it changes them (ReplayGuard)."""
    family = tokenizer_family(base_json)
    table = BpeTable.of(base_json)
    guard = (ReplayGuard(replay, table, family, replay_ratio, max_replay_change)
             if replay and target_shares is not None else None)
    first_id = 1 + max([*table.vocab.values(), *(t["id"] for t in base_json.get("added_tokens") or [])])
    added: list[tuple[str, tuple[str, str] | None]] = []  # (token, the merge that makes it)

    def add(token: str, pair: tuple[str, str] | None) -> None:
        table.add(token, first_id + len(added), pair)
        added.append((token, pair))

    def allowed(token: str) -> bool:
        return is_word_piece(token_bytes(token, family))

    for byte_token in _missing_bytes(family, table)[:new_tokens]:
        add(byte_token, None)
    trained_order = {a + b: rank for rank, (a, b) in enumerate(merge_pairs(trained_json["model"]["merges"]))}
    candidates = 0
    skipped: Counter = Counter()
    for token in trained_order:
        if len(added) >= new_tokens:
            break
        if token in table.vocab or not allowed(token):
            skipped["in_base" if token in table.vocab else "not_a_word_piece"] += 1
            continue
        candidates += 1
        mark = len(added)
        reason = None
        if not _make_reachable(token, table, add, allowed, trained_order, family) or len(added) > new_tokens:
            reason = "unreachable"
        elif guard is not None:
            updates = guard.retokenised(table, added[mark:])
            if guard.allows(token, updates, target_shares.get(token, 0.0)):
                guard.commit(updates)
            else:
                reason = "changes_replay"
        if reason:
            skipped[reason] += 1
            while len(added) > mark:  # take back the token and its intermediates
                table.remove(*added.pop())

    merged = copy.deepcopy(base_json)
    merged["model"]["vocab"] = table.vocab
    merged["model"]["merges"] = [list(pair) for pair in table.merges]
    base_table = BpeTable.of(base_json)
    pieces = [base_table.ids(base_table.split(token)) for token, _ in added]
    replay_stats = {"words": guard.total, "ratio": replay_ratio, "max_change": max_replay_change,
                    "changed_share": round(guard.changed_share(), 6)} if guard else {}
    return Extension(family, merged, first_id, [token for token, _ in added], [pair for _, pair in added], pieces,
                     candidates, dict(skipped), replay_stats)


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
