"""The curate stage (graftlm/curate/): datatrove pipeline end to end, language ID quality, near-duplicate detection,
rehydration, switches, excluded documents and recipe errors. Corpora are built here from the bundled data."""

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

from conftest import DATA, run_graft
from graftlm.curate.config import CurateConfig, LanguageIdConfig
from graftlm.curate.filters import filter_settings, quality_filters
from graftlm.curate.langid import LanguageIdFilter, check_backend_knows, threshold_for
from graftlm.curate.rehydrate import rehydration_table, times_for
from graftlm.curate.stage import curate_source
from graftlm.data.config import SourceConfig
from graftlm.data.read import read_documents
from graftlm.errors import DataError, RecipeError
from graftlm.recipe import validate_recipe

VI_DOCS = list(read_documents(SourceConfig(paths=[str(DATA / "vi/viwiki.jsonl")])))
ID_DOCS = list(read_documents(SourceConfig(paths=[str(DATA / "id/libreoffice_help.jsonl")])))
EN_BOOKS = list(read_documents(SourceConfig(paths=[str(DATA / "en/*.jsonl")])))
KEPT_BY_DEFAULT = VI_DOCS[12]  # an article that every default filter keeps
ONLY_DEDUP = {"language_id": {"enabled": False}, "minhash": {"words": "whitespace"},
              "filters": {"gopher_repetition": False, "fineweb_quality": False, "gopher_quality": False}}


def chunks(text: str, size: int = 1500) -> list[str]:
    """The lines of a book or handbook chapter, grouped into documents of about `size` characters."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        if len(current) + len(line) > size and current.strip():
            out.append(current.strip())
            current = ""
        current += line
    return out + [current.strip()] if current.strip() else out


def perturb(text: str, rng: random.Random, vocabulary: list[str], fraction: float = 0.05) -> str:
    """The text with `fraction` of its words replaced by other words of the corpus."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def read_gz_jsonl(paths) -> list[dict]:
    return [json.loads(line) for path in sorted(paths) for line in gzip.open(path, "rt", encoding="utf-8")]


def curate(tmp_path: Path, texts: list[str], overrides: dict | None = None, name: str = "vi") -> tuple[dict, Path]:
    """Curate a corpus in this process (one worker) and return its stats and the run's curated/ folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    config = CurateConfig.model_validate({"workers": 1, **(overrides or {})})
    stats = curate_source("test", name, SourceConfig(paths=[str(data)], lang="vi"), config, tmp_path / "curated")
    return stats, tmp_path / "curated"


# ---- the stage end to end ----------------------------------------------------------------------------------


def test_graft_curate_end_to_end(tmp_path, monkeypatch, capsys):
    english = chunks(EN_BOOKS[0])[:4]
    junk = "Trang này đang được xây dựng.\n" * 40
    corpus = VI_DOCS[:20] + english + [junk, KEPT_BY_DEFAULT, KEPT_BY_DEFAULT]  # 3 copies of one article
    data = write_jsonl(tmp_path / "mixed.jsonl", corpus)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: e2e\nsources:\n  vi: {{paths: [{data}], lang: vi}}\n"
                      "curate: {sources: [vi], minhash: {words: whitespace}}\n")
    code, _, err = run_graft(monkeypatch, capsys, "curate", str(recipe), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    curated = tmp_path / "runs/e2e/curated"
    stats = json.loads((curated / "vi/stats.json").read_text())
    written = read_gz_jsonl((curated / "vi").glob("*.jsonl.gz"))
    excluded = read_gz_jsonl((curated / "excluded/vi").rglob("*.jsonl.gz"))

    # every input document is either excluded (once) or kept, across both tasks' shards
    assert stats["input"] == {"documents": len(corpus), "bytes": sum(len(t.encode()) for t in corpus),
                              "empty": 0, "skipped": {}}
    unique_kept = next(s for s in stats["steps"] if s["step"] == "minhash")["documents_out"]
    assert unique_kept + len(excluded) == len(corpus)
    assert stats["output"]["documents"] == len(written)
    assert stats["output"]["bytes"] == sum(len(d["text"].encode()) for d in written)
    for before, after in zip(stats["steps"], stats["steps"][1:]):
        assert (after["documents_in"], after["bytes_in"]) == (before["documents_out"], before["bytes_out"])
        dropped = after["documents_in"] - after["documents_out"]
        assert sum(after.get("dropped", {}).values()) == max(dropped, 0)

    # English is dropped by language ID, the junk by the repetition filter, the copies by MinHash
    assert {d["text"] for d in excluded if d["metadata"].get("filter_reason") == "lang_en"} == set(english)
    assert stats["languages"]["vi"]["documents"] >= 20 and stats["languages"]["en"]["documents"] == 4
    assert next(s for s in stats["steps"] if s["step"] == "gopher_repetition")["dropped"].get("dup_line_frac") == 1
    assert [d["text"] for d in written].count(KEPT_BY_DEFAULT) == 3  # 1 of 3 kept, written 3 times (rehydration)
    assert stats["cluster_sizes"].get("3") == 1
    assert set(stats["seconds"]) >= {"filter", "minhash_signatures", "dedup_rehydrate", "total"}

    # the same recipe and input: nothing to do; a changed threshold: curated again
    stamp = (curated / "vi/stats.json").stat().st_mtime_ns
    code, _, err = run_graft(monkeypatch, capsys, "curate", str(recipe), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0 and "up to date" in err and (curated / "vi/stats.json").stat().st_mtime_ns == stamp
    assert not (curated / ".work").exists()


def test_excluded_documents_are_written_per_step_and_reason(tmp_path):
    english = chunks(EN_BOOKS[1])[:3]
    stats, curated = curate(tmp_path, VI_DOCS[:12] + english, {"minhash": False})
    folder = curated / "excluded/vi"
    for step in stats["steps"]:
        for reason, count in step.get("dropped", {}).items():
            documents = read_gz_jsonl((folder / step["step"] / reason).glob("*.jsonl.gz"))
            assert len(documents) == count
            assert all(d["metadata"]["filter_reason"] == reason for d in documents)
    assert len(read_gz_jsonl((folder / "language_id/lang_en").glob("*"))) == 3
    assert "minhash" not in [s["step"] for s in stats["steps"]]


def test_filters_switch_off(tmp_path):
    junk = ["Xem thêm.\n" * 30, "1, 2, 3, 4, 5 " * 40, "Ngắn quá."]
    config = CurateConfig.model_validate({"filters": {"gopher_repetition": False, "fineweb_quality": False,
                                                      "gopher_quality": {"enabled": False}}})
    assert quality_filters(config.filters, "vi", lambda step: None) == []
    stats, curated = curate(tmp_path / "off", junk, {**ONLY_DEDUP, "minhash": False})
    assert stats["output"]["documents"] == 3 and [s["step"] for s in stats["steps"]] == ["read"]
    stats, _ = curate(tmp_path / "on", junk + [KEPT_BY_DEFAULT], {"minhash": False})
    assert stats["output"]["documents"] == 1


def test_language_defaults_and_recipe_thresholds():
    config = CurateConfig.model_validate({"filters": {"fineweb_quality": {"line_punct_thr": 0.2}}})
    vi = filter_settings(config.filters, "vi", "fineweb_quality")
    assert vi["line_punct_thr"] == 0.2 and vi["new_line_ratio"] == 0.103  # recipe, then FineWeb2's Vietnamese
    assert vi["short_line_thr"] == 999 and vi["char_duplicates_ratio"] == 0.1  # FineWeb2's for every language
    assert "là" in filter_settings(config.filters, "vi", "gopher_quality")["stop_words"]
    assert filter_settings(config.filters, "en", "gopher_quality") == {}  # datatrove's (FineWeb English) defaults
    # any of FineWeb2's languages, by any of its codes: Swahili's thresholds and stop words, Chinese's 5-grams
    sw = filter_settings(config.filters, "swa", "gopher_quality")
    assert sw["stop_words"][:3] == ["ya", "na", "wa"] and sw["min_stop_words"] == 2 and sw["max_avg_word_length"] == 9
    zh = filter_settings(config.filters, "zho_Hans", "gopher_repetition")
    assert zh["dup_n_grams"][0] == (5, 0.198) and zh["dup_line_frac"] == 0.287
    assert "и" in filter_settings(config.filters, "ru", "gopher_quality")["stop_words"]
    # a language FineWeb2 has no config for (Kalenjin): FineWeb2's common settings, no stop-word check
    assert filter_settings(config.filters, "kln", "gopher_quality") == {"min_stop_words": 0}
    assert filter_settings(config.filters, "kln", "fineweb_quality")["short_line_thr"] == 999


def test_every_fineweb2_config_makes_datatrove_filters():
    from graftlm.curate.fineweb2 import configs
    from graftlm.languages import language

    config = CurateConfig()
    for name in configs():
        code = language(name).code
        assert language(code).fineweb2 == name, name  # the canonical code leads back to the same config
        for filter_name, filter_class in (("gopher_repetition", GopherRepetitionFilter),
                                          ("fineweb_quality", FineWebQualityFilter),
                                          ("gopher_quality", GopherQualityFilter)):
            settings = filter_settings(config.filters, code, filter_name)
            assert settings, (name, filter_name)
            filter_class(language=name, **settings)  # datatrove takes every value (types, n-gram pairs)
        assert 0 < threshold_for(config.language_id, code) < 1


def test_language_id_threshold_and_rehydration_from_fineweb2():
    assert threshold_for(LanguageIdConfig(), "vi") == 0.802  # FineWeb2's language_score for vie_Latn
    assert threshold_for(LanguageIdConfig(thresholds={"vie": 0.5}), "vi") == 0.5  # the recipe's, by any code
    assert threshold_for(LanguageIdConfig(default_threshold=0.3), "en") == 0.3  # no FineWeb2 config for English
    table = rehydration_table("fineweb2", 5, "vi")
    assert table == {1: 1, 2: 2, 4: 3, 6: 4, 17: 5, 20: 4, 27: 3, 34: 2, 65: 1}  # up_to_05_reps.json, vie_Latn
    assert max(rehydration_table("fineweb2", 10, "sw").values()) == 8 and list(rehydration_table("fineweb2", 10, "sw"))[:3] == [1, 2, 3]
    assert max(rehydration_table("fineweb2", 3, "sw").values()) == 3
    assert rehydration_table({1: 2}, 5, "vi") == {1: 2} and rehydration_table(None, 5, "vi") is None
    with pytest.raises(RecipeError, match=r"curate.rehydrate: FineWeb2 has no rehydration weights for Achinese"):
        rehydration_table("fineweb2", 5, "ace_Arab")


def test_a_backend_that_does_not_know_the_language_says_which_it_knows():
    check_backend_knows(LanguageIdConfig(), "sw")  # py3langid knows Swahili
    with pytest.raises(RecipeError) as error:
        check_backend_knows(LanguageIdConfig(), "ilo")  # Ilocano: FineWeb2 has it, py3langid does not
    message = str(error.value)
    assert message.startswith("curate.language_id.backend: py3langid does not know Iloko (ilo); it knows 1")
    assert ", vi, " in message and "backend: fasttext with a GlotLID model" in message
    with pytest.raises(RecipeError, match="lingua does not know"):
        check_backend_knows(LanguageIdConfig(backend="lingua"), "ilo")


def test_vietnamese_words_are_datatrove_s():
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from graftlm.curate.filters import VietnameseWords

    for text in VI_DOCS[:8]:
        assert VietnameseWords().word_tokenize(text) == load_word_tokenizer("vi").word_tokenize(text)
    assert "thành phố" in VietnameseWords().word_tokenize("Hà Nội là thành phố lớn.")


# ---- language ID -------------------------------------------------------------------------------------------


def language_id_scores(docs: list[tuple[str, str]], config: LanguageIdConfig) -> tuple[float, float]:
    """Document-level precision and recall of keeping Vietnamese, with the datatrove filter the stage uses."""
    lid = LanguageIdFilter("vi", config)
    kept = [(lid.filter(Document(text=text, id=str(i))) is True, lang) for i, (text, lang) in enumerate(docs)]
    true_positives = sum(keep and lang == "vi" for keep, lang in kept)
    return true_positives / max(1, sum(keep for keep, _ in kept)), true_positives / sum(l == "vi" for _, l in docs)


def mixed_language_corpus(per_language: int | None = None) -> list[tuple[str, str]]:
    english = [c for book in EN_BOOKS for c in chunks(book)]
    return ([(t, "vi") for t in VI_DOCS[:per_language]] + [(t, "en") for t in english[:per_language]]
            + [(t, "id") for t in ID_DOCS[:per_language]])


def test_language_id_precision_and_recall_for_vietnamese():
    corpus = mixed_language_corpus()
    assert Counter(lang for _, lang in corpus) == {"vi": 238, "en": len(corpus) - 238 - 380, "id": 380}
    precision, recall = language_id_scores(corpus, LanguageIdConfig())
    assert precision >= 0.98 and recall >= 0.95, (precision, recall)


def test_lingua_backend_identifies_the_same_languages():
    precision, recall = language_id_scores(mixed_language_corpus(40), LanguageIdConfig(backend="lingua",
                                                                                        max_chars=1000))
    assert precision >= 0.98 and recall >= 0.95, (precision, recall)


def test_fasttext_backend_reads_a_local_model(tmp_path):
    """A tiny fastText model trained here with GlotLID's label style (`__label__vie_Latn`) stands in for GlotLID."""
    import fasttext

    labelled = [(f"__label__{label}", line) for label, docs in
                (("vie_Latn", VI_DOCS[:60]), ("eng_Latn", [c for b in EN_BOOKS for c in chunks(b)][:60]),
                 ("ind_Latn", ID_DOCS[:60])) for doc in docs for line in doc.splitlines() if len(line) > 40]
    (tmp_path / "train.txt").write_text("".join(f"{label} {line}\n" for label, line in labelled), encoding="utf-8")
    fasttext.train_supervised(str(tmp_path / "train.txt"), dim=16, epoch=20, lr=0.5, minn=2, maxn=4,
                              thread=1, verbose=0).save_model(str(tmp_path / "lid.bin"))
    lid = LanguageIdFilter("vi", LanguageIdConfig(backend="fasttext", model=str(tmp_path / "lid.bin")))
    assert lid.filter(Document(text=VI_DOCS[100], id="vi")) is True
    assert lid.filter(Document(text=chunks(EN_BOOKS[-1])[30], id="en")) == (False, "lang_en")


def test_language_id_labels_and_targets_are_normalised():
    lid = LanguageIdFilter("vie_Latn", LanguageIdConfig(thresholds={"vi": 0.99}))
    assert (lid.target, lid.threshold) == ("vi", 0.99)
    lid = LanguageIdFilter("zho_Hans", LanguageIdConfig(thresholds={"cmn": 0.5}))
    assert lid.filter(Document(text="这是一个测试。我们今天去北京参观博物馆。", id="zh")) is True


# ---- near duplicates and rehydration -----------------------------------------------------------------------


def test_near_duplicates_with_5_percent_of_words_changed(tmp_path):
    rng = random.Random(0)
    originals = VI_DOCS[:120]
    vocabulary = sorted({w for doc in originals for w in doc.split()})
    copies = [perturb(doc, rng, vocabulary) for doc in originals]
    corpus = originals + copies
    family = {text: i % len(originals) for i, text in enumerate(corpus)}  # an original and its copy: one family
    stats, curated = curate(tmp_path, corpus, {**ONLY_DEDUP, "rehydrate": None})
    kept = Counter(family[d["text"]] for d in read_gz_jsonl((curated / "vi").glob("*.jsonl.gz")))
    removed = [family[d["text"]] for d in read_gz_jsonl((curated / "excluded/vi/minhash").rglob("*.jsonl.gz"))]
    # a removal is right when the removed document's twin was kept
    correct = sum(kept[f] == 1 for f in removed)
    precision, recall = correct / max(1, len(removed)), correct / len(originals)
    assert precision >= 0.99 and recall >= 0.90, (precision, recall)
    assert stats["steps"][-2]["dropped"] == {"duplicate": len(removed)}


def test_rehydration_repeats_by_cluster_size(tmp_path):
    table = {1: 1, 2: 2, 3: 3, 5: 5, 100: 8, 1000: 1}
    assert [times_for(table, n) for n in (1, 2, 3, 4, 5, 99, 100, 999, 1000, 5000)] == [1, 2, 3, 3, 5, 5, 8, 8, 1, 1]
    clusters = {VI_DOCS[0]: 1, VI_DOCS[1]: 2, VI_DOCS[2]: 4, VI_DOCS[3]: 6}  # document: copies in the input
    corpus = [text for text, copies in clusters.items() for _ in range(copies)]
    random.Random(1).shuffle(corpus)
    stats, curated = curate(tmp_path / "fineweb2", corpus, ONLY_DEDUP)
    written = Counter(d["text"] for d in read_gz_jsonl((curated / "vi").glob("*.jsonl.gz")))
    assert [written[text] for text in clusters] == [1, 2, 3, 5]
    assert stats["cluster_sizes"] == {"1": 1, "2": 1, "4": 1, "6": 1}
    stats, curated = curate(tmp_path / "custom", corpus, {**ONLY_DEDUP, "rehydrate": {1: 2, 4: 0}})
    written = Counter(d["text"] for d in read_gz_jsonl((curated / "vi").glob("*.jsonl.gz")))
    assert [written[text] for text in clusters] == [2, 2, 0, 0]


# ---- recipe errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("curate, message", [
    ({"sources": ["fr"]}, "curate.sources: 'fr' is not a source"),
    ({"sources": ["en"]}, "sources.en.lang: required to curate the source"),
    ({"rehydrate": {2: 2}}, "curate.rehydrate: must give the times for cluster size 1"),
    ({"rehydrate": {1: -1}}, "curate.rehydrate: cluster sizes must be >= 1 and times >= 0"),
    ({"language_id": {"thresholds": {"vi": 1.5}}}, "curate.language_id.thresholds: threshold of 'vi' must be"),
    ({"language_id": {"backend": "fasttext"}}, "curate.language_id: backend fasttext needs `model`"),
    ({"language_id": {"backend": "cld3"}}, "curate.language_id.backend: expected one of"),
    ({"executor": "slurm", "executor_options": {"time": "1:00:00"}},
     "curate.executor_options: 'partition' is required by the slurm executor"),
    ({"executor_options": {"queue": "x"}}, "curate.executor_options: 'queue' is not a setting of datatrove's"),
    ({"executor_options": {"tasks": 4}}, "curate.executor_options: 'tasks' is set by graftlm"),
    ({"submit": False}, "curate.submit: only the slurm executor submits jobs (executor is local)"),
    ({"workers": 0}, "curate.workers: "),
    ({"filters": {"gopher_quality": {"min_doc_word": 10}}},
     "curate.filters.gopher_quality.min_doc_word: unknown key (did you mean 'min_doc_words'?)"),
    ({"filters": {"c4": "yes please"}}, "curate.filters.c4: expected a mapping"),
    ({"minhash": {"words": "syllables"}}, "curate.minhash.words: expected one of"),
])
def test_bad_curate_values_name_their_key(curate, message):
    data = {"name": "x", "sources": {"vi": {"paths": ["a.jsonl"], "lang": "vi"}, "en": {"paths": ["b.jsonl"]}},
            "curate": curate}
    with pytest.raises(RecipeError) as error:
        validate_recipe(data)
    assert str(error.value).startswith(message), str(error.value)


def test_slurm_and_ray_settings_pass_through():
    config = CurateConfig(executor="slurm", executor_options={"partition": "cpu", "time": "2:00:00",
                                                              "mem_per_cpu_gb": 4})
    assert config.executor_options["mem_per_cpu_gb"] == 4
    assert CurateConfig(executor="ray", executor_options={"cpus_per_task": 2}).executor == "ray"


def test_an_unknown_language_is_a_recipe_error():
    data = {"name": "x", "sources": {"x": {"paths": ["a.jsonl"], "lang": "qqq"}}, "curate": {}}
    with pytest.raises(RecipeError, match=r"^sources.x.lang: unknown language code 'qqq'"):
        validate_recipe(data)


def test_a_word_tokenizer_without_its_package_is_a_recipe_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pythainlp") is not None:
        pytest.skip("pythainlp is installed")
    data = write_jsonl(tmp_path / "x.jsonl", ["ภาษาไทย"])
    with pytest.raises(RecipeError, match=r"sources.x.lang: the word tokenizer for Thai needs a package: .*pythainlp"):
        curate_source("t", "x", SourceConfig(paths=[str(data)], lang="th"), CurateConfig(), tmp_path / "c")


def test_slurm_runs_the_curation_jobs_chained(tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    from graftlm.curate.executors import make_executor
    from graftlm.curate.stage import plan_jobs

    data = write_jsonl(tmp_path / "vi.jsonl", VI_DOCS[:2])
    config = CurateConfig(executor="slurm", executor_options={"partition": "cpu", "time": "1:00:00"})
    jobs = plan_jobs("vi", SourceConfig(paths=[str(data)], lang="vi"), "vi", config, tmp_path / "work", 2,
                     [str(data)])
    executor = None
    for job in jobs:
        executor = make_executor(config, job, "graft-x-vi", depends=executor)
    assert isinstance(executor, SlurmPipelineExecutor) and executor.job_name == "graft-x-vi-dedup_rehydrate"
    assert executor.depends.depends.depends.job_name == "graft-x-vi-minhash_signatures"
    assert [j.tasks for j in jobs] == [2, 2, config.minhash.num_buckets, 1, 2]


def test_bad_records_follow_the_sources_on_error(tmp_path):
    data = tmp_path / "vi.jsonl"
    data.write_text(json.dumps({"text": KEPT_BY_DEFAULT}, ensure_ascii=False) + "\n{broken\n", encoding="utf-8")
    config = CurateConfig(workers=1, minhash=False)
    stats = curate_source("t", "vi", SourceConfig(paths=[str(data)], lang="vi", on_error="skip"), config,
                          tmp_path / "skip")
    assert stats["input"]["skipped"] == {"invalid JSON": 1} and stats["output"]["documents"] == 1
    with pytest.raises(DataError, match=r"vi.jsonl:2: invalid JSON"):
        curate_source("t", "vi", SourceConfig(paths=[str(data)], lang="vi"), config, tmp_path / "stop")
