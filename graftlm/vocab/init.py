"""Grow a model's input embeddings and output head for new tokens, and give the new rows a good start.

Rows below `first_new` are the base's and are never touched. The new tokens' rows follow, then padding rows up to a
multiple of `pad_to_multiple_of`; no token produces a padding row, and padding rows get the mean of the base rows
(what transformers' mean resizing does), whatever `init` says, so that they take almost no probability. A tied
model has one matrix for both; an untied head is initialised by the same rule from its own rows. `vocab.untie`
gives a tied model a head of its own (`untie_output_embeddings`), whose new rows can then start by another rule
(`initialise_output_rows`).

`VocabRows` is what the training stage asks about an extended model (`vocab_rows(folder)`): which rows are new, so
that it can train the embeddings first, or only the new rows (`train_only_rows`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

INITS = ("mean", "subword-mean", "weighted", "random")
"""How new embedding rows can start (see `VocabConfig.init`)."""
VOCAB_ROWS_FILE = "graft-vocab.json"
"""Written beside config.json of a vocabulary-extended model."""


@dataclass(frozen=True)
class VocabRows:
    """Which embedding rows a vocabulary-extended model added."""

    first_new: int
    """Rows below this one are the base model's, unchanged."""
    new_tokens: int
    rows: int
    """Embedding rows in all, padding included."""
    init: str = ""

    @property
    def new_rows(self) -> range:
        return range(self.first_new, self.first_new + self.new_tokens)

    @property
    def padding_rows(self) -> range:
        return range(self.first_new + self.new_tokens, self.rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def vocab_rows(model_dir: str | Path) -> VocabRows | None:
    """The added rows of a model folder written by the vocab stage; None for any other model."""
    path = Path(model_dir) / VOCAB_ROWS_FILE
    return VocabRows(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def embedding_weights(model: "PreTrainedModel") -> list["torch.nn.Parameter"]:
    """The input embedding matrix and the output head (one parameter when they are tied)."""
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    return weights


def train_only_rows(model: "PreTrainedModel", rows: range) -> list:
    """Zero the gradient of every embedding and head row outside `rows`, so that only those rows learn (freeze the
    rest of the model separately). Returns the hook handles; `.remove()` them to train all rows again. Note that
    decoupled weight decay still shrinks rows whose gradient is zero: give these weights no weight decay."""
    handles = []
    for weight in embedding_weights(model):
        mask = weight.new_zeros(weight.shape[0], 1)
        mask[rows.start:rows.stop] = 1
        handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def is_tied(model: "PreTrainedModel") -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def untie_output_embeddings(model: "PreTrainedModel") -> None:
    """Give a tied model's output head its own copy of the embedding matrix, and a config that says so
    (`tie_word_embeddings: false`), so that save_pretrained writes both and plain transformers loads them apart."""
    import torch

    embed = model.get_input_embeddings()
    model.get_output_embeddings().weight = torch.nn.Parameter(embed.weight.detach().clone())
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 keeps the mapping it ties and saves by
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    if is_tied(model):
        raise ValueError(f"{type(model).__name__}: the output head is still tied to the input embeddings")


def grow_embeddings(model: "PreTrainedModel", first_new: int, new_tokens: int, pad_to_multiple_of: int = 64,
                    init: str = "") -> VocabRows:
    """Resize the input embeddings and the output head to hold `new_tokens` rows from `first_new` on, padded.
    Rows from `first_new` on are left for `initialise_rows` to fill."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < first_new:
        raise ValueError(f"the model has {old_rows} embedding rows but its tokenizer uses ids up to {first_new - 1}")
    needed = first_new + new_tokens
    rows = max(old_rows, math.ceil(needed / pad_to_multiple_of) * pad_to_multiple_of)
    if rows != old_rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return VocabRows(first_new, new_tokens, rows, init)


def initialise_rows(model: "PreTrainedModel", rows: VocabRows, init: str, base_pieces: Sequence[Sequence[int]],
                    similar: "SimilarTokens | None" = None, seed: int = 0) -> None:
    """Fill the new and padding rows of every embedding matrix (see `VocabConfig.init`)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in embedding_weights(model):
            base = weight[:rows.first_new].float()
            mean = base.mean(0)
            weight[rows.padding_rows.start:rows.rows] = mean.to(weight.dtype)
            if init == "mean":
                new = mean.expand(rows.new_tokens, -1)
            elif init == "subword-mean":
                new = subword_mean(base, base_pieces)
            elif init == "weighted":
                if similar is None:
                    raise ValueError("init 'weighted' needs the similar tokens")
                new = similar.combine(base, subword_mean(base, base_pieces))
            elif init == "random":
                std = getattr(model.config, "initializer_range", 0.02)
                new = torch.randn(rows.new_tokens, base.shape[1], generator=generator) * std
            else:
                raise ValueError(f"unknown init {init!r}")
            weight[rows.new_rows.start:rows.new_rows.stop] = new.to(weight.dtype)


def initialise_output_rows(model: "PreTrainedModel", rows: VocabRows, output_init: str,
                           base_pieces: Sequence[Sequence[int]]) -> None:
    """The new rows of an untied output head (see `VocabConfig.output_init`): `input` leaves what
    `initialise_rows` wrote (the input rule, applied to the head's own rows); `mean`, the mean of the head's base
    rows, whose logit is the average one, so that the new tokens take almost no probability and the base's
    next-token distribution on text without them is kept; `first-piece`, the row of the first base token the new
    token used to start with, whose logit is that piece's."""
    import torch

    if output_init == "input":
        return
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        base = head[:rows.first_new].float()
        if output_init == "mean":
            new = base.mean(0).expand(rows.new_tokens, -1)
        elif output_init == "first-piece":
            new = base[torch.tensor([p[0] if p else 0 for p in base_pieces])]
            new[[i for i, p in enumerate(base_pieces) if not p]] = base.mean(0)  # a byte the base lacked
        else:
            raise ValueError(f"unknown output init {output_init!r}")
        head[rows.new_rows.start:rows.new_rows.stop] = new.to(head.dtype)


def subword_mean(base: "torch.Tensor", pieces: Sequence[Sequence[int]]) -> "torch.Tensor":
    """FVT: each new token's row is the mean of the rows of the base tokens the base tokenizer split it into (the
    mean of all rows for a token the base could not represent at all, such as a byte missing from its alphabet)."""
    import torch

    flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
    offsets = torch.tensor([0, *np.cumsum([len(p) for p in pieces])[:-1]], dtype=torch.long)
    rows = torch.nn.functional.embedding_bag(flat, base, offsets, mode="mean")
    rows[[i for i, p in enumerate(pieces) if not p]] = base.mean(0)
    return rows


# ---- `weighted`: FOCUS-like, with similarities learned from the target text ----------------------------------


@dataclass
class SimilarTokens:
    """For each new token, base tokens and weights (summing to 1), or nothing when the token was too rare in the
    sample to have a context vector.

    `weighted` follows FOCUS (Dobler & de Melo, 2023): a new token's row is a sparsemax-weighted combination of the
    rows of the base tokens that are most similar to it, similarity being the cosine of small auxiliary vectors
    learned on the target text tokenised with the extended tokenizer — there the new tokens and the base tokens
    the target text still uses live in one space. FOCUS learns those vectors with fastText; here they are PPMI
    co-occurrence vectors reduced by a truncated SVD (Levy & Goldberg's equivalent of skip-gram), which needs no
    extra dependency and is deterministic. FOCUS rather than OFA because OFA needs external multilingual word vectors
    (ColexNet+), which an offline run does not have. A new token without a vector falls back to its subword mean.
    """

    tokens: list[np.ndarray]
    weights: list[np.ndarray]

    @property
    def covered(self) -> int:
        return sum(len(t) > 0 for t in self.tokens)

    def combine(self, base: "torch.Tensor", fallback: "torch.Tensor") -> "torch.Tensor":
        import torch

        covered = [row for row, tokens in enumerate(self.tokens) if len(tokens)]
        out = fallback.clone()
        if covered:
            tokens = [self.tokens[row] for row in covered]
            offsets = torch.tensor([0, *np.cumsum([len(t) for t in tokens])[:-1]], dtype=torch.long)
            out[covered] = torch.nn.functional.embedding_bag(
                torch.from_numpy(np.concatenate(tokens)), base, offsets, mode="sum",
                per_sample_weights=torch.from_numpy(np.concatenate([self.weights[row] for row in covered])))
        return out


def similar_tokens(documents: Sequence[Sequence[int]], rows: VocabRows, excluded: Sequence[int] = (),
                   dim: int = 100, window: int = 5, min_count: int = 5, top: int = 64, seed: int = 0) -> SimilarTokens:
    """Find, for each new token, the base tokens most similar to it in `documents` (token ids of target text) and
    their sparsemax weights. `excluded` (special tokens) are never chosen."""
    vocab, vectors = cooccurrence_vectors(documents, rows.rows, dim, window, min_count, seed)
    index = np.full(rows.rows, -1)
    index[vocab] = np.arange(len(vocab))
    is_base = (vocab < rows.first_new) & ~np.isin(vocab, np.asarray(excluded, dtype=np.int64))
    base_ids, base_vectors = vocab[is_base], vectors[is_base]
    tokens: list[np.ndarray] = [np.empty(0, np.int64)] * rows.new_tokens
    weights: list[np.ndarray] = [np.empty(0, np.float32)] * rows.new_tokens
    new_ids = np.array([t for t in rows.new_rows if index[t] >= 0], dtype=np.int64)
    top = min(top, len(base_ids))
    for start in range(0, len(new_ids), 1024):
        chunk = new_ids[start:start + 1024]
        similarity = vectors[index[chunk]] @ base_vectors.T
        best = np.argpartition(-similarity, top - 1, axis=1)[:, :top]
        for token, candidates, sims in zip(chunk, best, np.take_along_axis(similarity, best, axis=1)):
            w = sparsemax(sims)
            keep = w > 0
            tokens[token - rows.first_new] = base_ids[candidates[keep]]
            weights[token - rows.first_new] = (w[keep] / w[keep].sum()).astype(np.float32)
    return SimilarTokens(tokens, weights)


def cooccurrence_vectors(documents: Sequence[Sequence[int]], vocab_size: int, dim: int = 100, window: int = 5,
                         min_count: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length vectors for the tokens seen at least `min_count` times: positive PMI of co-occurrence within
    `window` tokens (weighted 1/distance, context counts smoothed by ^0.75), reduced to `dim` by truncated SVD."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import svds

    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents if len(d)])
    doc = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    counts = np.bincount(ids, minlength=vocab_size)
    vocab = np.flatnonzero(counts >= min_count)
    if len(vocab) <= dim + 1:
        raise ValueError(f"too little text for similarity vectors: {len(vocab)} tokens seen {min_count}+ times")
    index = np.full(vocab_size, -1)
    index[vocab] = np.arange(len(vocab))
    rows, cols, values = [], [], []
    for distance in range(1, window + 1):
        a, b = index[ids[:-distance]], index[ids[distance:]]
        ok = (a >= 0) & (b >= 0) & (doc[:-distance] == doc[distance:])
        rows += [a[ok], b[ok]]
        cols += [b[ok], a[ok]]
        values.append(np.full(2 * ok.sum(), 1.0 / distance, dtype=np.float32))
    matrix = coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(len(vocab), len(vocab))).tocsr()
    matrix.sum_duplicates()
    total = matrix.sum()
    row_sums = np.asarray(matrix.sum(1)).ravel()
    context = np.asarray(matrix.sum(0)).ravel() ** 0.75
    context /= context.sum()
    coo = matrix.tocoo()
    pmi = np.log(coo.data / total / (row_sums[coo.row] / total) / context[coo.col])
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=matrix.shape).tocsr()
    u, s, _ = svds(ppmi, k=dim, rng=np.random.default_rng(seed))
    vectors = u * np.sqrt(s)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vocab, vectors.astype(np.float32)


def sparsemax(scores: np.ndarray) -> np.ndarray:
    """The Euclidean projection of `scores` onto the probability simplex (Martins & Astudillo, 2016): like softmax,
    but exactly zero for scores far enough below the best."""
    ordered = np.sort(scores)[::-1]
    cumulative = np.cumsum(ordered)
    k = np.arange(1, len(scores) + 1)
    support = k[1 + k * ordered > cumulative][-1]
    threshold = (cumulative[support - 1] - 1) / support
    return np.maximum(scores - threshold, 0)
