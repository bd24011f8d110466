"""The `vocab` stage: grow the base's vocabulary for the target language and write the run's new starting model.

    runs/<name>/vocab/model/            the resized model and the merged tokenizer, a plain Hugging Face folder
                                        (+ graft-vocab.json: which embedding rows are new, see init.VocabRows)
    runs/<name>/vocab/stats.json        new tokens, fertility (tokens per word and per byte) before and after
    runs/<name>/vocab/new_tokens.jsonl  each new token: id, token, text, and the base tokens it used to be

Packing and training then start from vocab/model/ (`RunDir.start_model`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

from graftlm.data.config import SourceConfig
from graftlm.data.pack import training_source
from graftlm.data.read import ReadStats, read_documents, resolve_paths, text_bytes
from graftlm.errors import DataError, GraftError
from graftlm.progress import bytes_progress, log
from graftlm.recipe import Recipe
from graftlm.runs import RunDir, atomic_dir, file_signature, fingerprint, read_json, write_json_atomic
from graftlm.vocab.config import VocabConfig, target_source
from graftlm.vocab.extend import Extension, extend_tokenizer, tokenizer_family, train_target_tokenizer
from graftlm.vocab.init import (INITS, VOCAB_ROWS_FILE, grow_embeddings, initialise_output_rows, initialise_rows,
                                is_tied, similar_tokens, untie_output_embeddings)

VOCAB_FORMAT = 1
TRAIN_VOCAB_PER_NEW_TOKEN = 6
"""The target tokenizer is trained this many times larger than `new_tokens`: most of its tokens are ones the base
already has, or ASCII, digits and punctuation, which are not added."""
SIMILARITY_SAMPLE_BYTES = 8_000_000
"""Target text tokenised for the `weighted` init's similarity vectors."""
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""Copied from the base beside the merged tokenizer.json (tokenizer.model, a SentencePiece file, would be stale)."""


def run_vocab(recipe: Recipe, run: RunDir) -> dict:
    """Train, merge, resize and initialise, unless vocab/ already holds the result for the same inputs."""
    config = recipe.vocab or VocabConfig()
    name = target_source(recipe)
    source = training_source(run, name, recipe.sources[name])
    files = resolve_paths(source, name)
    key = fingerprint(VOCAB_FORMAT, config.model_dump(mode="json"), name, source.model_dump(mode="json"),
                      [file_signature(f) for f in files], _folder_signature(run.base), recipe.eval.text_field,
                      {lang: file_signature(path) for lang, path in recipe.eval.text.items()})
    stats_path = run.vocab / "stats.json"
    if (run.vocab / "model" / "config.json").is_file() and stats_path.is_file() \
            and read_json(stats_path).get("fingerprint") == key:
        log(f"vocab: {run.vocab} is up to date")
        return read_json(stats_path)

    started = time.perf_counter()
    if not (run.base / "tokenizer.json").is_file():
        raise GraftError(f"{run.base}: no tokenizer.json; vocabulary extension needs a fast (Rust) base tokenizer")
    base_json = read_json(run.base / "tokenizer.json")
    family = tokenizer_family(base_json)
    read = ReadStats()
    sample: list[str] = []
    compare = config.compare_inits and bool(recipe.eval.text)
    needs_similar = config.init == "weighted" or compare
    texts = _training_text(source, name, files, config.train_bytes, read, sample if needs_similar else None)
    train_vocab = config.new_tokens * TRAIN_VOCAB_PER_NEW_TOKEN + 1000
    trained = train_target_tokenizer(texts, base_json, train_vocab, config.min_frequency)
    if read.documents == 0:
        raise DataError(f"sources.{name}: no documents to train the tokenizer on")
    extension = extend_tokenizer(base_json, trained, config.new_tokens, config.ascii_tokens)
    log(f"vocab: trained a {family} tokenizer on {read.bytes / 1e6:.1f} MB of '{name}' "
        f"({time.perf_counter() - started:.1f}s); {len(extension.tokens):,} new tokens from id {extension.first_id}")
    if not extension.tokens:
        raise DataError(f"sources.{name}: the text offers no token worth adding (vocab.min_frequency="
                        f"{config.min_frequency}, vocab.ascii_tokens={str(config.ascii_tokens).lower()})")

    from graftlm.models import load_model, load_tokenizer, save_model

    with atomic_dir(run.vocab) as tmp:
        tokenizer = write_tokenizer(run.base, extension, tmp / "model")
        model = load_model(str(run.base), trust_remote_code=recipe.trust_remote_code)
        base_tokenizer = load_tokenizer(str(run.base), trust_remote_code=recipe.trust_remote_code)
        if compare:  # the eval text is read and tokenised once per tokenizer, then scored under every init
            extended_eval = _text_evaluator(recipe, tokenizer)
            step0 = {"base": _text_bpb(_text_evaluator(recipe, base_tokenizer), model)}
        else:
            step0 = {}
        rows = grow_embeddings(model, extension.first_id, len(extension.tokens), config.pad_to_multiple_of,
                               config.init)
        similar = None
        if needs_similar:
            log(f"vocab: similarity vectors from {sum(len(t.encode()) for t in sample) / 1e6:.1f} MB of '{name}'")
            documents = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(sample, add_special_tokens=False)]
            similar = similar_tokens(documents, rows, excluded=tokenizer.all_special_ids, seed=config.seed)
        for init in INITS if compare else ():
            initialise_rows(model, rows, init, extension.base_pieces, similar, config.seed)
            step0[init] = _text_bpb(extended_eval, model)
            log(f"vocab: before training, init {init}: " + ", ".join(f"{k} {v:.3f}" for k, v in step0[init].items())
                + " bits/byte")
        initialise_rows(model, rows, config.init, extension.base_pieces, similar, config.seed)
        if config.untie:
            if is_tied(model):
                untie_output_embeddings(model)
            initialise_output_rows(model, rows, config.output_init, extension.base_pieces)
            if compare:
                step0[f"{config.init}, untied output {config.output_init}"] = _text_bpb(extended_eval, model)
        save_model(model, tokenizer, tmp / "model", extra_files={VOCAB_ROWS_FILE: rows.to_json()})
        _write_jsonl(tmp / "new_tokens.jsonl", _describe_tokens(extension, tokenizer))
        stats = {
            "source": name, "family": family, "trained_on": {"documents": read.documents, "bytes": read.bytes},
            "train_vocab_size": train_vocab, "requested": config.new_tokens, "new_tokens": len(extension.tokens),
            "first_new_id": rows.first_new, "vocab_size": len(tokenizer), "embedding_rows": rows.rows,
            "init": config.init, "untied": config.untie, "output_init": config.output_init if config.untie else None,
            **({"weighted": {"from_similar_tokens": similar.covered,
                             "from_subword_mean": len(extension.tokens) - similar.covered}} if similar else {}),
            "examples": [text for text in map(tokenizer.decode, ([i] for i in rows.new_rows))
                         if "\ufffd" not in text][:40],
            "fertility": {lang: fertility_change(path, base_tokenizer, tokenizer, recipe.eval.text_field)
                          for lang, path in recipe.eval.text.items()},
            "bpb_before_training": step0,
            "fingerprint": key, "seconds": round(time.perf_counter() - started, 1),
        }
        write_json_atomic(tmp / "stats.json", stats)
    for lang, change in stats["fertility"].items():
        log(f"vocab: {lang}: {change['before']['tokens_per_word']:.2f} -> {change['after']['tokens_per_word']:.2f} "
            f"tokens per word, {change['identical_documents']:.0%} of documents tokenised as before")
    log(f"vocab: wrote {run.vocab / 'model'} ({rows.rows:,} embedding rows, init {config.init})")
    return stats


def _text_evaluator(recipe: Recipe, tokenizer):
    """The recipe's `eval.text` sets (the during-training subsets), read and tokenised with `tokenizer`."""
    from graftlm.evaluate.suite import Evaluator

    return Evaluator.from_config(recipe.eval.model_copy(update={"choice": {}}), tokenizer)


def _text_bpb(evaluator, model) -> dict[str, float]:
    """Bits per byte of `model` on each of the evaluator's text sets."""
    return {name: round(result["bpb"], 4) for name, result in evaluator(model)["text"].items()}


def _training_text(source: SourceConfig, name: str, files: list[str], limit: int, read: ReadStats,
                   sample: list[str] | None) -> Iterator[str]:
    """The target documents of `files`, up to `limit` bytes, with a progress bar; the first few MB also go to
    `sample`."""
    size = text_bytes(files)
    total = limit if size is None else min(limit, size)
    sampled = 0
    with bytes_progress() as progress:
        task = progress.add_task(f"vocab: train on {name}", total=total)
        for text in read_documents(source, name, read):
            if sample is not None and sampled < SIMILARITY_SAMPLE_BYTES:
                sample.append(text)
                sampled += len(text.encode())
            progress.update(task, completed=min(read.bytes, total))
            yield text
            if read.bytes >= limit:
                break
        progress.update(task, completed=total)


def write_tokenizer(base_dir: Path, extension: Extension, folder: Path):
    """The merged tokenizer.json beside the base's tokenizer settings, loaded as transformers loads it."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for side_file in TOKENIZER_SIDE_FILES:
        if (base_dir / side_file).is_file():
            shutil.copy2(base_dir / side_file, folder / side_file)
    write_json_atomic(folder / "tokenizer.json", extension.tokenizer_json)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = extension.first_id + len(extension.tokens) - 1
    if tokenizer.convert_tokens_to_ids(extension.tokens[-1]) != expected:
        raise GraftError(f"vocab: transformers does not load the merged tokenizer as written "
                         f"({type(tokenizer).__name__} rebuilt it); please report this base model")
    return tokenizer


def _describe_tokens(extension: Extension, tokenizer) -> Iterator[dict]:
    for offset, (token, pieces) in enumerate(zip(extension.tokens, extension.base_pieces)):
        token_id = extension.first_id + offset
        yield {"id": token_id, "token": token, "text": tokenizer.decode([token_id]), "base_pieces": pieces}


def _write_jsonl(path: Path, records) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _folder_signature(folder: Path) -> list:
    return [file_signature(p) for p in sorted(folder.glob("*")) if p.is_file()]


# ---- fertility --------------------------------------------------------------------------------------------------


def fertility_change(path: str, before, after, text_field: str = "text") -> dict:
    """Tokens per whitespace word and per UTF-8 byte of a held-out text under two tokenizers, and the share of its
    documents that both tokenise identically."""
    from graftlm.evaluate.bpb import load_text_set

    old, new = load_text_set(path, before, text_field), load_text_set(path, after, text_field)
    same = sum(a == b for a, b in zip(old.documents, new.documents))
    return {"path": path, "before": _fertility(old), "after": _fertility(new),
            "identical_documents": round(same / len(old.documents), 4)}


def _fertility(text_set) -> dict:
    tokens, words, size = sum(map(len, text_set.documents)), sum(text_set.words), sum(text_set.bytes)
    return {"tokens": tokens, "words": words, "bytes": size, "tokens_per_word": round(tokens / max(words, 1), 4),
            "tokens_per_byte": round(tokens / max(size, 1), 4)}
