import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import DATA, run_graft
from graftlm.data.config import SourceConfig
from graftlm.data.read import read_documents
from graftlm.evaluate.bpb import load_text_set
from graftlm.recipe import validate_recipe
from graftlm.runs import RunDir
from graftlm.vocab.extend import (BYTE_LEVEL, SENTENCEPIECE, BpeTable, extend_tokenizer, is_word_piece,
                                  merge_pairs, pre_token_counts, token_bytes, token_shares, tokenizer_family,
                                  train_target_tokenizer)
from graftlm.vocab.init import (VocabRows, grow_embeddings, initialise_rows, similar_tokens, sparsemax,
                                train_only_rows, vocab_rows)

VI_TEXT = SourceConfig(paths=[str(DATA / "vi/viwiki.jsonl")], max_documents=120)
VI_EVAL = str(DATA / "eval/sib200/vie_Latn/test.tsv")
EN_EVAL = str(DATA / "eval/sib200/eng_Latn/test.tsv")
EN_REPLAY = SourceConfig(paths=[str(DATA / "en/*.jsonl")])


def extend(base_json: dict, texts, new_tokens: int, replay=None, ratio: float = 4.0):
    """Train on `texts` and extend, with the stage's replay check when `replay` (texts) is given."""
    texts = list(texts)
    trained = train_target_tokenizer(texts, base_json, new_tokens * 6 + 1000, min_frequency=3)
    if replay is None:
        return extend_tokenizer(base_json, trained, new_tokens)
    return extend_tokenizer(base_json, trained, new_tokens, pre_token_counts(replay, base_json),
                            token_shares(texts, trained, base_json), ratio)


def tokens_per_word(tokenizer_dir_or_tok, path: str) -> float:
    text_set = load_text_set(path, tokenizer_dir_or_tok)
    return sum(map(len, text_set.documents)) / sum(text_set.units)


@pytest.fixture(scope="module")
def smol(smol_tokenizer_dir):
    """The SmolLM2 tokenizer extended with up to 3000 tokens learned on the bundled Vietnamese Wikipedia slice, under
    the replay check on the bundled English."""
    base_json = json.loads((smol_tokenizer_dir / "tokenizer.json").read_text())
    extension = extend(base_json, read_documents(VI_TEXT), 3000, replay=list(read_documents(EN_REPLAY)))
    return base_json, extension, Tokenizer.from_str(json.dumps(base_json)), \
        Tokenizer.from_str(json.dumps(extension.tokenizer_json))


@pytest.fixture(scope="module")
def smol_merged_dir(smol, smol_tokenizer_dir, tmp_path_factory):
    """The merged tokenizer written as a Hugging Face folder, the way the stage writes it."""
    from graftlm.vocab.stage import write_tokenizer

    folder = tmp_path_factory.mktemp("merged") / "tok"
    write_tokenizer(smol_tokenizer_dir, smol[1], folder)
    return folder


@pytest.fixture(scope="module")
def smol_merged(smol_merged_dir):
    return AutoTokenizer.from_pretrained(smol_merged_dir)


def test_new_tokens_are_real_vocabulary_and_merges_each_reachable(smol):
    base_json, extension, base_rust, rust = smol
    merged = extension.tokenizer_json
    assert extension.family == BYTE_LEVEL and extension.first_id == 49152
    assert 2000 < len(extension.tokens) <= 3000
    assert merged["added_tokens"] == base_json["added_tokens"]  # nothing bolted on as an added token
    vocab = merged["model"]["vocab"]
    assert [vocab[t] for t in extension.tokens] == list(range(49152, 49152 + len(extension.tokens)))
    base_merges = merge_pairs(base_json["model"]["merges"])
    new_merges = merge_pairs(merged["model"]["merges"])[len(base_merges):]
    assert merge_pairs(merged["model"]["merges"])[:len(base_merges)] == base_merges
    assert new_merges == [pair for pair in extension.merges if pair]  # one merge per token, in id order
    assert all(pair is None or pair[0] + pair[1] == token for token, pair in zip(extension.tokens, extension.merges))
    # the bundled base (a GGUF conversion) lacks 21 bytes of its alphabet: they come first, without merges
    assert extension.merges[:21] == [None] * 21 and all(len(t) == 1 for t in extension.tokens[:21])
    assert all(pair is not None for pair in extension.merges[21:])
    assert all([t.value for t in rust.model.tokenize(token)] == [token] for token in extension.tokens)
    base = BpeTable.of(base_json)  # the pieces for FVT are the base's own split, as the base tokenizer does it
    for token, pieces in list(zip(extension.tokens, extension.base_pieces))[21::97]:
        assert pieces == [t.id for t in base_rust.model.tokenize(token)] == base.ids(base.split(token))


def test_english_keeps_its_ids_and_vietnamese_fertility_drops(smol_tokenizer_dir, smol_merged):
    base, merged = AutoTokenizer.from_pretrained(smol_tokenizer_dir), smol_merged
    same = [a == b for a, b in zip(load_text_set(EN_EVAL, merged).documents, load_text_set(EN_EVAL, base).documents)]
    assert sum(same) / len(same) >= 0.99  # the replay check on the bundled English protects FLORES English
    before, after = tokens_per_word(base, VI_EVAL), tokens_per_word(merged, VI_EVAL)
    assert before > 3.4 and after < 1.6


_mixed_text = st.text(st.sampled_from(list("aăâbcdđeêghiklmnoôơpqrstuưvxyàảãáạằẳẵắặầẩẫấậèẻẽéẹềểễếệìỉĩíịòỏõóọ"
                                           "ồổỗốộờởỡớợùủũúụừửữứựỳỷỹýỵAĐÊƯNT ,.0123\n")), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_mixed_text, st.text(max_size=40)))
def test_text_keeps_its_ids_unless_it_touches_a_new_merge(smol, text):
    _, extension, base, merged = smol
    before = base.encode(text, add_special_tokens=False)
    base_could = base.decode(before.ids) == text  # the bundled base drops the bytes its alphabet lacks
    if base_could and not set(extension.merges) & set(zip(before.tokens, before.tokens[1:])):
        assert merged.encode(text, add_special_tokens=False).ids == before.ids


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), _mixed_text))
def test_decode_encode_is_identity(smol_merged, text):
    assert smol_merged.decode(smol_merged.encode(text, add_special_tokens=False)) == text


def test_merged_tokenizer_saves_and_loads_with_plain_autotokenizer(smol, smol_merged_dir, tmp_path):
    extension = smol[1]
    tokenizer = AutoTokenizer.from_pretrained(smol_merged_dir)
    assert len(tokenizer) == extension.first_id + len(extension.tokens)
    text = "Hà Nội là thủ đô của Việt Nam. Hanoi is the capital of Vietnam."
    ids = tokenizer(text)["input_ids"]
    assert any(i >= extension.first_id for i in ids)
    assert ids == Tokenizer.from_str(json.dumps(extension.tokenizer_json)).encode(text).ids
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids


def test_ascii_words_of_the_target_are_added_digits_never(smol):
    extension = smol[1]
    ascii_tokens = [t for t in extension.tokens if t.isascii()]  # byte-level shows non-ASCII bytes as non-ASCII
    assert len(ascii_tokens) > 50  # Vietnamese words without diacritics (" trong", " khi") are words too
    texts = [token_bytes(t, BYTE_LEVEL).decode(errors="ignore") for t in extension.tokens]
    assert not any(c.isdigit() for t in texts for c in t)  # digits keep the base's split


def test_replay_check_skips_what_the_replay_text_uses(smol):
    base_json = smol[0]
    vietnamese = list(read_documents(VI_TEXT))[:60]
    english = [next(iter(read_documents(EN_REPLAY)))[:30_000]]  # a small replay sample, ~6,000 words
    word = "Mountbatten"  # an English name, split by the base, written into both texts
    target = [f"{doc} {word} {word}." for doc in vietnamese]
    replay = [f"Lord {word} said so; {word} agreed." for _ in range(100)] + english
    unchecked = extend(base_json, target, 800)
    checked = extend(base_json, target, 800, replay=replay)
    assert f"Ġ{word}" in unchecked.tokens and f"Ġ{word}" not in checked.tokens
    assert checked.skipped["changes_replay"] >= 1 and checked.replay["changed_share"] < 1e-2
    # a name the replay sample never shows counts as one replay word: used less than replay_ratio times as often
    # in the target, it is skipped, whereas a token with characters the replay text never uses (Cyrillic against
    # English) is not held back
    target = [f"{doc} Hartleton Москва." for doc in vietnamese]
    plain = extend(base_json, target, 800)
    assert {"ĠHartleton", "ĠÐľÐ¾ÑģÐºÐ²Ð°"} <= set(plain.tokens)
    checked = extend(base_json, target, 800, replay=english)
    assert "ĠHartleton" not in checked.tokens and "ĠÐľÐ¾ÑģÐºÐ²Ð°" in checked.tokens


def test_word_piece_rule():
    assert is_word_piece(" không".encode()) and is_word_piece(b" trong") and is_word_piece(" язык".encode())
    assert is_word_piece("ông".encode()[1:])  # begins inside a character
    assert is_word_piece("Việ".encode()[:-1])  # ends inside one
    assert is_word_piece("语言".encode())
    for junk in (" 2019", "ế,", "\u200b\u200b", "  ế", "ế ế", " ", "。"):
        assert not is_word_piece(junk.encode()), junk


# ---- the SentencePiece-style family (Llama-2, Mistral) ---------------------------------------------------------


def llama2_style_tokenizer(folder, texts) -> dict:
    """A tiny Llama-2-like tokenizer: `▁` for spaces, byte-fallback tokens <0x00>..<0xFF>, <unk> <s> </s>."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                                             show_progress=False))
    data = json.loads(tokenizer.to_str())
    data["pre_tokenizer"] = None  # as in Llama-2: the whole normalised text is one BPE word
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials[:3]]
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    os.makedirs(folder, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return data


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    from graftlm.vocab.stage import write_tokenizer

    english = list(read_documents(SourceConfig(paths=[str(DATA / "en/debian_handbook.jsonl")], max_documents=30)))
    folder = tmp_path_factory.mktemp("llama2-style")
    base_json = llama2_style_tokenizer(folder, english)
    vietnamese = list(read_documents(SourceConfig(paths=[str(DATA / "vi/viwiki.jsonl")], max_documents=80)))
    extension = extend(base_json, vietnamese, 1500, replay=english)
    merged = write_tokenizer(folder, extension, folder / "merged")
    return base_json, extension, AutoTokenizer.from_pretrained(folder), merged


def test_sentencepiece_style_extension(sentencepiece):
    base_json, extension, base, merged = sentencepiece
    assert tokenizer_family(base_json) == SENTENCEPIECE
    assert 1000 < len(extension.tokens) <= 1500
    assert all(is_word_piece(token_bytes(t, SENTENCEPIECE)) for t in extension.tokens)
    assert extension.replay["changed_share"] < 1e-3  # the replay check also runs on SentencePiece-style words
    new_merges = merge_pairs(extension.tokenizer_json["model"]["merges"])[len(base_json["model"]["merges"]):]
    assert new_merges == [pair for pair in extension.merges if pair]
    assert all(len(token) == 1 for token, pair in zip(extension.tokens, extension.merges) if pair is None)
    assert any(pair is None for pair in extension.merges)  # letters the base only had as bytes
    rust = Tokenizer.from_str(json.dumps(extension.tokenizer_json))
    assert all(len(rust.model.tokenize(t)) == 1 for t in extension.tokens)
    # this toy base (1,200 tokens) cuts English into short pieces that Vietnamese shares (▁ta, ▁cha): unchecked,
    # 20% of the English sentences keep their ids; checked on 30 English chapters, most do
    same = [a == b for a, b in zip(load_text_set(EN_EVAL, merged).documents, load_text_set(EN_EVAL, base).documents)]
    assert sum(same) / len(same) >= 0.75
    assert tokens_per_word(merged, VI_EVAL) < 0.6 * tokens_per_word(base, VI_EVAL)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(), _mixed_text))
def test_sentencepiece_style_decodes_as_the_base_does(sentencepiece, text):
    _, _, base, merged = sentencepiece
    decoded = merged.decode(merged.encode(text, add_special_tokens=False))
    assert decoded == base.decode(base.encode(text, add_special_tokens=False))
    if "▁" not in text:  # `▁` in the text comes back as the space it stands for
        assert decoded == text


# ---- resizing and initialising the embeddings ---------------------------------------------------------------------


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


PIECES = [[5, 6], [7, 8, 9], [10]] * 10  # 30 new tokens and the base rows they were split into


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("init", ["mean", "subword-mean", "random", "weighted"])
def test_grow_and_initialise(tied, init, tmp_path):
    model = tiny_llama(tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    rows = grow_embeddings(model, first_new=300, new_tokens=30, pad_to_multiple_of=64, init=init)
    assert rows == VocabRows(300, 30, 384, init) and rows.new_rows == range(300, 330)
    assert rows.padding_rows == range(330, 384)
    similar = None
    if init == "weighted":
        import numpy as np

        from graftlm.vocab.init import SimilarTokens

        similar = SimilarTokens([np.array([1, 2]), np.empty(0, np.int64)] + [np.array([3])] * 28,
                                [np.array([0.25, 0.75], np.float32), np.empty(0, np.float32)]
                                + [np.array([1.0], np.float32)] * 28)
    initialise_rows(model, rows, init, PIECES, similar, seed=1)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape == (384, 16) and head.shape == (384, 16) and model.config.vocab_size == 384
    assert (emb.data_ptr() == head.data_ptr()) == tied
    for weight, old in ((emb, old_in), (head, old_out)):
        assert torch.equal(weight[:300], old)  # the base rows are untouched
        assert torch.allclose(weight[330:], old.mean(0).expand(54, -1))  # padding rows: the mean
        new = weight[300:330]
        if init == "mean":
            assert torch.allclose(new, old.mean(0).expand(30, -1))
        elif init == "subword-mean":
            assert torch.allclose(new[0], old[[5, 6]].mean(0)) and torch.allclose(new[1], old[[7, 8, 9]].mean(0))
            assert torch.allclose(new[2], old[10])
        elif init == "weighted":
            assert torch.allclose(new[0], 0.25 * old[1] + 0.75 * old[2], atol=1e-6)
            assert torch.allclose(new[1], old[[7, 8, 9]].mean(0))  # no similar tokens: its subword mean
            assert torch.allclose(new[2], old[3])
        else:
            assert 0.01 < new.std().item() < 0.03 and not torch.allclose(new[0], new[1])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_input_embeddings().weight, emb)
    assert torch.equal(reloaded.get_output_embeddings().weight, head)


def test_new_tokens_may_take_rows_the_base_left_unused():
    rows = grow_embeddings(tiny_llama(tied=True), first_new=290, new_tokens=30, pad_to_multiple_of=64)
    assert rows == VocabRows(290, 30, 320) and rows.padding_rows == range(320, 320)


def test_train_only_rows_masks_the_gradient():
    model = tiny_llama(tied=False)
    rows = grow_embeddings(model, 300, 30, 64)
    handles = train_only_rows(model, rows.new_rows)
    model(torch.tensor([[1, 2, 305, 310]]), labels=torch.tensor([[1, 2, 305, 310]])).loss.backward()
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.grad[:300].abs().sum() == 0 and weight.grad[330:].abs().sum() == 0
        assert weight.grad[300:330].abs().sum() > 0
    for handle in handles:
        handle.remove()


def test_similar_tokens_find_the_token_used_in_the_same_contexts():
    import numpy as np

    rng = np.random.default_rng(0)
    # a corpus with structure: tokens come in topics; half of token 7's occurrences are replaced by new token 210
    topics = [rng.choice(150, size=15, replace=False) for _ in range(10)]
    documents = []
    for _ in range(400):
        doc = rng.choice(topics[rng.integers(10)], size=30)
        doc[(doc == 7) & (rng.random(30) < 0.5)] = 210
        documents.append(doc.tolist())
    rows = VocabRows(first_new=200, new_tokens=20, rows=256)
    similar = similar_tokens(documents, rows, excluded=[0], dim=16, min_count=3)
    assert similar.covered == 1 and 0 not in similar.tokens[10]
    best = similar.tokens[10][np.argmax(similar.weights[10])]
    assert any(7 in t and best in t for t in topics)  # the nearest is token 7 or one of its topic
    assert np.isclose(similar.weights[10].sum(), 1)


def test_sparsemax():
    import numpy as np

    w = sparsemax(np.array([2.0, 0.5, 0.4]))
    assert np.allclose(w, [1, 0, 0])
    w = sparsemax(np.array([0.6, 0.5, -1.0]))
    assert np.allclose(w, [0.55, 0.45, 0]) and np.isclose(w.sum(), 1)


# ---- the recipe and the stage ------------------------------------------------------------------------------------


def _recipe(**vocab):
    return validate_recipe({
        "name": "t", "sources": {"en": {"paths": [EN_EVAL], "lang": "en"}, "wiki": {"paths": [VI_EVAL], "lang": "vi"},
                                 "news": {"paths": [EN_EVAL], "lang": "vi"}},
        "mixture": {"en": 0.6, "wiki": 0.3, "news": 0.1}, "vocab": vocab})


def test_vocab_source_is_the_heaviest_target_language_source():
    assert _recipe().vocab_source() == "wiki"  # vi is the target although English weighs more
    assert _recipe(source="news").vocab_source() == "news"
    no_langs = validate_recipe({"name": "t", "sources": {"a": {"paths": [EN_EVAL]}, "b": {"paths": [EN_EVAL]}},
                                "mixture": {"a": 1, "b": 2}, "vocab": {}})
    assert no_langs.vocab_source() == "b"
    with pytest.raises(Exception, match="vocab.source: not a source"):
        _recipe(source="xx")


def test_graft_vocab_writes_the_start_model_and_skips_when_up_to_date(tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: tiny
base_model: {tiny_model_dir}
sources:
  vi: {{paths: [{DATA}/vi/viwiki.jsonl], lang: vi, max_documents: 40}}
  en: {{paths: [{DATA}/en/gutenberg.jsonl], lang: en}}
vocab: {{new_tokens: 400}}
train: {{seq_len: 32, batch_tokens: 64}}
eval:
  text: {{vi: {VI_EVAL}, en: {EN_EVAL}}}
  max_documents: 20
""")
    code, _, err = run_graft(monkeypatch, capsys, "vocab", str(recipe), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    run = RunDir(tmp_path / "runs/tiny")
    assert run.start_model == run.vocab / "model"
    stats = json.loads((run.vocab / "stats.json").read_text())
    assert stats["source"] == "vi" and stats["new_tokens"] == 400 and stats["embedding_rows"] == 49600
    assert stats["fertility"]["en"]["identical_documents"] == 1.0
    assert stats["fertility"]["vi"]["after"]["tokens_per_word"] < stats["fertility"]["vi"]["before"]["tokens_per_word"]
    assert vocab_rows(run.start_model) == VocabRows(49152, 400, 49600, "subword-mean")
    model = AutoModelForCausalLM.from_pretrained(run.start_model)
    tokenizer = AutoTokenizer.from_pretrained(run.start_model)
    assert model.get_input_embeddings().weight.shape[0] == 49600 and len(tokenizer) == 49552
    lines = (run.vocab / "new_tokens.jsonl").read_text().splitlines()
    assert len(lines) == 400 and json.loads(lines[0])["id"] == 49152
    step0 = stats["bpb_before_training"]  # every init scored before training, beside the unextended base
    assert list(step0) == ["base", "mean", "subword-mean", "weighted", "random"]
    assert all(set(bpb) == {"vi", "en"} and all(v > 0 for v in bpb.values()) for bpb in step0.values())
    assert step0["mean"]["en"] != step0["random"]["en"] or step0["mean"]["vi"] != step0["random"]["vi"]
    from graftlm.report.page import _vocabulary

    assert "Bits per byte before any training" in _vocabulary(stats)

    stamp = os.stat(run.vocab / "stats.json").st_mtime_ns
    code, _, err = run_graft(monkeypatch, capsys, "vocab", str(recipe), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0 and "up to date" in err and os.stat(run.vocab / "stats.json").st_mtime_ns == stamp
    code, _, err = run_graft(monkeypatch, capsys, "vocab", str(recipe), "--runs-dir", str(tmp_path / "runs"),
                             "--set", "vocab.new_tokens=20000", "--set", "vocab.compare_inits=false")
    stats = json.loads((run.vocab / "stats.json").read_text())  # a changed setting: made again
    assert code == 0 and 400 < stats["new_tokens"] < 10000  # 40 articles do not have 20,000 tokens: it says why
    assert f"vocab: warning: added {stats['new_tokens']:,} of the 20,000 tokens asked for: the tokenizer trained on" in err
    assert stats["replay"]["sources"] == ["en"] and stats["skipped"]["changes_replay"] > 0


def test_graft_vocab_untie_saves_a_head_that_plain_transformers_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """vocab.untie on a tied base: tie_word_embeddings false, the new output rows apart from the input rows, the
    base rows equal; plain transformers loads the folder and scores the held-out text as the stage did in memory."""
    from graftlm.evaluate.suite import Evaluator
    from graftlm.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: tiny
base_model: {tiny_model_dir}
sources:
  vi: {{paths: [{DATA}/vi/viwiki.jsonl], lang: vi, max_documents: 40}}
  en: {{paths: [{DATA}/en/gutenberg.jsonl], lang: en}}
vocab: {{new_tokens: 300, untie: true, output_init: mean}}
train: {{seq_len: 32, batch_tokens: 64}}
eval:
  text: {{vi: {VI_EVAL}, en: {EN_EVAL}}}
  max_documents: 10
""")
    code, _, err = run_graft(monkeypatch, capsys, "vocab", str(recipe), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    run = RunDir(tmp_path / "runs/tiny")
    stats = json.loads((run.vocab / "stats.json").read_text())
    assert stats["untied"] and stats["output_init"] == "mean"
    model = AutoModelForCausalLM.from_pretrained(run.start_model)
    assert model.config.tie_word_embeddings is False
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.data_ptr() != head.data_ptr()
    assert torch.equal(embed[:49152], head[:49152])
    assert not torch.equal(embed[49152:49452], head[49152:49452])
    evaluator = Evaluator.from_config(load_recipe(recipe).eval.model_copy(update={"choice": {}}),
                                      AutoTokenizer.from_pretrained(run.start_model))
    scored = {name: round(r["bpb"], 4) for name, r in evaluator(model)["text"].items()}
    assert scored == stats["bpb_before_training"]["subword-mean, untied output mean"]
    assert scored != stats["bpb_before_training"]["subword-mean"]  # the tied start, scored before untying


def test_graft_vocab_without_a_vocab_section_says_so(tmp_path, monkeypatch, capsys):
    code, _, err = run_graft(monkeypatch, capsys, "vocab", "--runs-dir", str(tmp_path))
    assert code == 2 and "vocab: the recipe has no vocab section" in err


def test_other_tokenizer_models_are_refused():
    from graftlm.errors import GraftError

    with pytest.raises(GraftError, match="a Unigram model"):
        tokenizer_family({"model": {"type": "Unigram"}})


def test_untie_gives_the_head_its_own_rows_and_plain_transformers_loads_it(tmp_path):
    """A tied model, untied: a separate head saved with tie_word_embeddings false; the same logits in graftlm
    (the model in memory) and in plain transformers (the folder reloaded)."""
    from graftlm.vocab.init import initialise_output_rows, is_tied, untie_output_embeddings

    model = tiny_llama(tied=True)
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    rows = grow_embeddings(model, first_new=300, new_tokens=30, pad_to_multiple_of=64)
    untie_output_embeddings(model)
    assert not is_tied(model) and model.config.tie_word_embeddings is False
    initialise_rows(model, rows, "subword-mean", PIECES)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb, head)  # both start as the same rows ...
    initialise_output_rows(model, rows, "first-piece", PIECES)
    # ... then the new output rows start apart, and the new input rows stay the subword means
    assert torch.equal(head[300:330], emb[torch.tensor([p[0] for p in PIECES])])
    assert torch.equal(emb[300:330], torch.stack([emb[p].mean(0) for p in PIECES]))
    initialise_output_rows(model, rows, "mean", PIECES)
    assert torch.allclose(head[300:330], emb[:300].mean(0).expand(30, -1))
    assert torch.equal(head[:300], emb[:300])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=tokens).logits[..., :300], before, atol=1e-5)  # base rows: unchanged
        logits = model(input_ids=torch.tensor([[1, 2, 305, 310]])).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.get_output_embeddings().weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=torch.tensor([[1, 2, 305, 310]])).logits, logits)



def test_word_bits_add_up_to_bits_per_byte(tiny_model_dir):
    """bench/vocab_words.py gives each word the bits of its tokens: over the words they sum to the set's bits per
    byte as `graft eval` scores it, with and without spaces, diacritics and a trailing space."""
    from bench.vocab_words import word_bits, word_spans
    from graftlm.evaluate.bpb import TextSet, bits_per_byte
    from graftlm.evaluate.scoring import start_token_id
    from graftlm.models import load_model, load_tokenizer

    texts = ["Xin chào thế giới, đây là   một câu.", "plain ascii words ", "  leading space"]
    bits, pieces = word_bits(tiny_model_dir, texts)
    assert [len(b) for b in bits] == [len(word_spans(t)) for t in texts] == [len(p) for p in pieces]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [sum(p, []) for p in pieces] == ids
    text_set = TextSet("t", ids, [len(t.encode("utf-8")) for t in texts], [1] * len(texts))
    model = load_model(str(tiny_model_dir), dtype=torch.float32)
    start = start_token_id(tokenizer)
    expected = bits_per_byte(model, text_set, start, start, 64)["bpb"]
    assert sum(b.sum() for b in bits) / sum(text_set.bytes) == pytest.approx(expected, rel=1e-5)
