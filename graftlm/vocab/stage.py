"""The `vocab` stage: grow the base's vocabulary for the target language and write the run's new starting model.

    runs/<name>/vocab/model/            the resized model and the merged tokenizer, a plain Hugging Face folder
                                        (+ graft-vocab.json: which embedding rows are new, see init.VocabRows)
    runs/<name>/vocab/stats.json        new tokens, why candidates were skipped, the replay check, fertility
                                        (tokens per word, or per character, and per byte) before and after
    runs/<name>/vocab/new_tokens.jsonl  each new token: id, token, text, and the base tokens it used to be

Packing and training then start from vocab/model/ (`RunDir.start_model`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

from graftlm.data.config import SourceConfig
from graftlm.data.stage import training_source
from graftlm.data.read import ReadStats, read_documents, resolve_paths, text_bytes
from graftlm.errors import DataError, GraftError
from graftlm.progress import bytes_progress, log
from graftlm.recipe import Recipe
from graftlm.runs import RunDir, atomic_dir, file_signature, read_json, write_json_atomic
from graftlm.stage import Stage
from graftlm.vocab.config import VocabConfig
from graftlm.vocab.extend import (Extension, extend_tokenizer, pre_token_counts, token_shares, tokenizer_family,
                                  train_target_tokenizer)
from graftlm.vocab.init import (INITS, VOCAB_ROWS_FILE, grow_embeddings, initialise_output_rows, initialise_rows,
                                is_tied, similar_tokens, untie_output_embeddings)

VOCAB_FORMAT = 1
TRAIN_VOCAB_PER_NEW_TOKEN = 6
"""The target tokenizer is trained this many times larger than `new_tokens`: most of its tokens are ones the base
already has, digits and punctuation, or pieces the replay check skips, which are not added."""
SAMPLE_BYTES = 8_000_000
"""Target text tokenised for the replay check (each token's use to the target) and the `weighted` init's
similarity vectors."""
FEW_TOKENS = 0.5
"""Adding fewer than this share of `new_tokens` is worth a warning that says why."""
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""Copied from the base beside the merged tokenizer.json (tokenizer.model, a SentencePiece file, would be stale)."""


class Vocab(Stage):
    name = "vocab"
    needs = ("base", "curate")
    prepares_data = True
    recipe_keys = ("vocab",)
    outputs = ("vocab",)

    def enabled(self):
        return self.recipe.vocab is not None

    def marker(self, unit):
        return self.run_dir.vocab / "stats.json"

    def fingerprint(self, unit):
        recipe, run = self.recipe, self.run_dir
        name, source, files, replay, replay_files = _inputs(recipe, run)
        return [VOCAB_FORMAT, recipe.vocab.model_dump(mode="json"), name, source.model_dump(mode="json"),
                [file_signature(f) for f in files], _folder_signature(run.base), recipe.eval.text_field,
                {lang: file_signature(path) for lang, path in recipe.eval.text.items()},
                {other: [file_signature(f) for f in paths] for other, paths in replay_files.items()}]

    def run(self, unit, key):
        extend_vocabulary(self.recipe, self.run_dir, key)


def _inputs(recipe: Recipe, run: RunDir):
    """The target source the tokenizer is trained on, its files, and the replay sources whose text it must not
    disturb (each read from its curated text when curation cleaned it)."""
    name = recipe.vocab_source()
    source = training_source(run, recipe, name)
    replay = {other: training_source(run, recipe, other) for other in recipe.replay_sources()}
    replay_files = {other: resolve_paths(replay_source, other) for other, replay_source in replay.items()}
    return name, source, resolve_paths(source, name), replay, replay_files


def extend_vocabulary(recipe: Recipe, run: RunDir, key: str) -> dict:
    """Train, merge, resize and initialise into vocab/; stats.json (holding `key`) last."""
    config = recipe.vocab
    name, source, files, replay, replay_files = _inputs(recipe, run)
    started = time.perf_counter()
    if not (run.base / "tokenizer.json").is_file():
        raise GraftError(f"{run.base}: no tokenizer.json; vocabulary extension needs a fast (Rust) base tokenizer")
    base_json = read_json(run.base / "tokenizer.json")
    family = tokenizer_family(base_json)
    read = ReadStats()
    sample: list[str] = []
    compare = config.compare_inits and bool(recipe.eval.text)
    needs_similar = config.init == "weighted" or compare
    texts = _source_text(source, name, f"vocab: train on {name}", files, config.train_bytes, read, sample)
    train_vocab = config.new_tokens * TRAIN_VOCAB_PER_NEW_TOKEN + 1000
    trained = train_target_tokenizer(texts, base_json, train_vocab, config.min_frequency)
    if read.documents == 0:
        raise DataError(f"sources.{name}: no documents to train the tokenizer on")
    replay_read = ReadStats()
    replay_words = _replay_words(replay, replay_files, config, base_json, replay_read)
    shares = token_shares(sample, trained, base_json) if replay_words else None
    extension = extend_tokenizer(base_json, trained, config.new_tokens, replay_words, shares, config.replay_ratio,
                                 config.max_replay_change)
    log(f"vocab: trained a {family} tokenizer on {read.bytes / 1e6:.1f} MB of '{name}' "
        f"({time.perf_counter() - started:.1f}s); {len(extension.tokens):,} new tokens from id {extension.first_id}"
        + (f"; replay text ({', '.join(replay)}, {replay_read.bytes / 1e6:.1f} MB): "
           f"{extension.replay['changed_share']:.3%} of its words tokenise differently" if replay_words else
           "; no replay source: new tokens are not checked against replay text"))
    if len(extension.tokens) < FEW_TOKENS * config.new_tokens:
        log(f"vocab: warning: added {len(extension.tokens):,} of the {config.new_tokens:,} tokens asked for: "
            + _why_few(extension, config, name, read.bytes))
    if not extension.tokens:
        raise DataError(f"sources.{name}: the text offers no token worth adding: "
                        + _why_few(extension, config, name, read.bytes))

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
            "candidates": extension.trained_candidates, "skipped": extension.skipped,
            "replay": {"sources": list(replay), "documents": replay_read.documents, "bytes": replay_read.bytes,
                       **extension.replay},
            "first_new_id": rows.first_new, "vocab_size": len(tokenizer), "embedding_rows": rows.rows,
            "init": config.init, "untied": config.untie, "output_init": config.output_init if config.untie else None,
            **({"weighted": {"from_similar_tokens": similar.covered,
                             "from_subword_mean": len(extension.tokens) - similar.covered}} if similar else {}),
            "examples": [text for text in map(tokenizer.decode, ([i] for i in rows.new_rows))
                         if "\ufffd" not in text][:40],
            "fertility": {lang: fertility_change(path, base_tokenizer, tokenizer, recipe.eval.text_field, lang)
                          for lang, path in recipe.eval.text.items()},
            "bpb_before_training": step0,
            "fingerprint": key, "seconds": round(time.perf_counter() - started, 1),
        }
        write_json_atomic(tmp / "stats.json", stats)
    for lang, change in stats["fertility"].items():
        unit = change["unit"]
        log(f"vocab: {lang}: {change['before'][f'tokens_per_{unit}']:.2f} -> "
            f"{change['after'][f'tokens_per_{unit}']:.2f} tokens per {unit}, "
            f"{change['identical_documents']:.1%} of documents tokenised as before")
    log(f"vocab: wrote {run.vocab / 'model'} ({rows.rows:,} embedding rows, init {config.init})")
    return stats


def _text_evaluator(recipe: Recipe, tokenizer):
    """The recipe's `eval.text` sets (the during-training subsets) alone, read and tokenised with `tokenizer`."""
    from graftlm.evaluate.config import EvalConfig
    from graftlm.evaluate.suite import Evaluator

    text_only = recipe.eval.model_dump(include={"text", "text_field", "max_documents", "batch_size", "max_length",
                                                "dtype"})
    return Evaluator.from_config(EvalConfig(**text_only), tokenizer)


def _text_bpb(evaluator, model) -> dict[str, float]:
    """Bits per byte of `model` on each of the evaluator's text sets."""
    return {name: round(result["bpb"], 4) for name, result in evaluator(model)["text"].items()}


def _replay_words(replay: dict[str, SourceConfig], files: dict[str, list[str]], config: VocabConfig, base_json: dict,
                  read: ReadStats):
    """The pre-token counts of up to `vocab.replay_bytes` of the replay sources (shared equally), or None."""
    if not replay or config.replay_ratio == 0:
        return None
    share = config.replay_bytes // len(replay)

    def texts() -> Iterator[str]:
        for other, source in replay.items():
            stats = ReadStats()
            yield from _source_text(source, other, f"vocab: replay check on {other}", files[other], share, stats)
            read.documents, read.bytes = read.documents + stats.documents, read.bytes + stats.bytes

    return pre_token_counts(texts(), base_json)


def _why_few(extension: Extension, config: VocabConfig, name: str, trained_bytes: int) -> str:
    """The reasons, with the numbers, that fewer tokens than asked were added."""
    skipped = extension.skipped
    reasons = [f"the tokenizer trained on {trained_bytes / 1e6:.1f} MB of '{name}' offered "
               f"{extension.trained_candidates:,} word pieces the base lacks (more text, or a lower "
               f"vocab.min_frequency={config.min_frequency}, offers more)"]
    if skipped.get("changes_replay"):
        reasons.append(f"{skipped['changes_replay']:,} of them would change the replay text's tokens more than "
                       f"1/vocab.replay_ratio ({config.replay_ratio:g}) of what they serve the target text, or more "
                       f"than vocab.max_replay_change ({config.max_replay_change:g}) of its words (a lower ratio, a "
                       f"larger change, or more replay text to measure on adds more of them, at the replay "
                       f"language's expense)")
    if skipped.get("unreachable"):
        reasons.append(f"{skipped['unreachable']:,} could not be reached by merges within the budget")
    return "; ".join(reasons)


def _source_text(source: SourceConfig, name: str, label: str, files: list[str], limit: int, read: ReadStats,
                 sample: list[str] | None = None) -> Iterator[str]:
    """The documents of `files`, up to `limit` bytes, with a progress bar; the first few MB also go to `sample`."""
    size = text_bytes(files)
    total = limit if size is None else min(limit, size)
    sampled = 0
    with bytes_progress() as progress:
        task = progress.add_task(label, total=total)
        for text in read_documents(source, name, read):
            if sample is not None and sampled < SAMPLE_BYTES:
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


def fertility_change(path: str, before, after, text_field: str = "text", lang: str | None = None) -> dict:
    """Tokens per word (per character for a language without spaces, see evaluate/bpb.py) and per UTF-8 byte of a
    held-out text under two tokenizers, and the share of its documents that both tokenise identically."""
    from graftlm.evaluate.bpb import load_text_set

    old, new = load_text_set(path, before, text_field, lang=lang), load_text_set(path, after, text_field, lang=lang)
    same = sum(a == b for a, b in zip(old.documents, new.documents))
    return {"path": path, "unit": old.unit, "before": _fertility(old), "after": _fertility(new),
            "identical_documents": round(same / len(old.documents), 4)}


def _fertility(text_set) -> dict:
    tokens, units, size = sum(map(len, text_set.documents)), sum(text_set.units), sum(text_set.bytes)
    return {"tokens": tokens, f"{text_set.unit}s": units, "bytes": size,
            f"tokens_per_{text_set.unit}": round(tokens / max(units, 1), 4),
            "tokens_per_byte": round(tokens / max(size, 1), 4)}
