"""Evaluation: bits per byte, multiple choice, the training-time evaluator and `graft eval`."""

import json
import math

import pytest
import torch

from conftest import DATA, run_graft
from graftlm.errors import DataError
from graftlm.evaluate.bpb import bits_per_byte, load_text_set, windows
from graftlm.evaluate.choice import (choice_accuracy, choice_span, encode_item, load_choice_set, wilson_interval,
                                    xcopa_context)
from graftlm.evaluate.suite import Evaluator
from graftlm.recipe import validate_recipe

DOCS = ["Hà Nội là thủ đô của Việt Nam.", "The quick brown fox jumps over the lazy dog, twice."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from graftlm.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def sequence_log_prob(model, ids: list[int], first: int = 1) -> float:
    """Plain transformers: one sequence, no batching, sum of log-softmax of ids[first:]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits[:-1].double(), dim=-1)
    return sum(log_probs[t - 1, ids[t]].item() for t in range(first, len(ids)))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_bpb_equals_a_hand_computation(tmp_path, tiny):
    model, tokenizer = tiny
    text_set = load_text_set(write_lines(tmp_path / "docs.txt", DOCS), tokenizer)
    result = bits_per_byte(model, text_set, start_id=tokenizer.bos_token_id, pad_id=0, max_length=256)

    nats, tokens = 0.0, 0
    for doc in DOCS:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        nats -= sequence_log_prob(model, [tokenizer.bos_token_id, *ids])
        tokens += len(ids)
    size = sum(len(doc.encode("utf-8")) for doc in DOCS)
    assert result["bpb"] == pytest.approx(nats / math.log(2) / size, rel=1e-5)
    assert result["tokens_per_byte"] == pytest.approx(tokens / size)
    assert result["tokens_per_word"] == pytest.approx(tokens / sum(len(doc.split()) for doc in DOCS))
    assert result["documents"] == 2


def test_text_formats_read_through_the_shared_readers(tmp_path, tiny):
    _, tokenizer = tiny
    tsv = tmp_path / "t.tsv"
    tsv.write_text("index_id\ttext\n1\t" + DOCS[0] + "\n2\t" + DOCS[1] + "\n", encoding="utf-8")
    jsonl = write_lines(tmp_path / "t.jsonl", [json.dumps({"body": doc}) for doc in DOCS])
    txt = write_lines(tmp_path / "t.txt", ["", DOCS[0], "  ", DOCS[1]])  # blank lines are not documents
    sets = [load_text_set(str(tsv), tokenizer), load_text_set(jsonl, tokenizer, "body"), load_text_set(txt, tokenizer)]
    assert sets[0].documents == sets[1].documents == sets[2].documents
    assert len(load_text_set(str(tsv), tokenizer, max_documents=1).documents) == 1
    with pytest.raises(DataError, match="no field 'text'"):
        load_text_set(jsonl, tokenizer)


def test_windows_score_every_token_once_with_left_context():
    ids = list(range(23))
    spans = windows(ids, max_length=8, stride=3)
    scored = []
    for span in spans:
        assert len(span.ids) <= 8 and span.first >= 1
        offset = ids.index(span.ids[0])
        scored += span.ids[span.first:]
        if offset > 0:
            assert span.first >= 8 - 3  # at least max_length - stride tokens of context
    assert scored == ids[1:]
    assert windows(ids, max_length=23) == windows(ids, max_length=1000)  # fits: one pass
    assert len(windows(ids, max_length=23)) == 1


def test_windowed_scoring_matches_scoring_each_window_by_hand(tmp_path, tiny):
    model, tokenizer = tiny
    doc = " ".join(DOCS * 3)
    text_set = load_text_set(write_lines(tmp_path / "long.txt", [doc]), tokenizer)
    ids = [tokenizer.bos_token_id, *text_set.documents[0]]
    fits = bits_per_byte(model, text_set, tokenizer.bos_token_id, 0, max_length=len(ids))
    assert fits["bpb"] == pytest.approx(bits_per_byte(model, text_set, tokenizer.bos_token_id, 0, 256)["bpb"],
                                        rel=1e-6)

    windowed = bits_per_byte(model, text_set, tokenizer.bos_token_id, 0, max_length=16)
    nats = -sum(sequence_log_prob(model, span.ids, span.first) for span in windows(ids, 16))
    assert windowed["bpb"] == pytest.approx(nats / math.log(2) / text_set.bytes[0], rel=1e-5)
    assert windowed["tokens_per_byte"] == fits["tokens_per_byte"]


def test_batch_size_and_padding_do_not_change_results(tiny):
    model, tokenizer = tiny
    text_set = load_text_set(str(DATA / "eval/sib200/vie_Latn/dev.tsv"), tokenizer, max_documents=12)
    results = [bits_per_byte(model, text_set, tokenizer.bos_token_id, pad_id, 256, batch_size=size)["bpb"]
               for size, pad_id in [(1, 0), (5, 0), (12, 2), (12, 1234)]]
    assert results == pytest.approx([results[0]] * 4, rel=1e-5)


def test_choice_accuracy_on_a_constructed_set(tmp_path, tiny):
    model, tokenizer = tiny
    items = [{"context": f"Question {i}: which word comes next?", "choices": ["yes", "no", "a much longer answer"],
              "label": i % 3} for i in range(8)]
    path = write_lines(tmp_path / "set.jsonl", [json.dumps(item) for item in items])
    choice_set = load_choice_set(path)
    assert choice_set.format == "generic"
    encoded = [encode_item(item, tokenizer) for item in choice_set.items]
    result = choice_accuracy(model, encoded, [item.label for item in choice_set.items], tokenizer.bos_token_id, 0,
                             max_length=256, batch_size=4)

    correct = correct_norm = 0
    for item, choices in zip(items, encoded):
        scores = [sequence_log_prob(model, [*c.context, *c.continuation], len(c.context)) for c in choices]
        per_byte = [s / len((" " + text).encode()) for s, text in zip(scores, item["choices"])]
        correct += scores.index(max(scores)) == item["label"]
        correct_norm += per_byte.index(max(per_byte)) == item["label"]
    assert result["n"] == 8
    assert result["accuracy"] == correct / 8 and result["accuracy_norm"] == correct_norm / 8
    low, high = result["ci95"]
    assert low <= result["accuracy"] <= high


def test_wilson_interval():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(243, 500) == pytest.approx((0.4425, 0.5297), abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_xcopa_context_as_lm_evaluation_harness_builds_it(tiny):
    _, tokenizer = tiny
    assert xcopa_context("The item was packed in bubble wrap.", "cause", "en") == \
        "The item was packed in bubble wrap because"
    vi = load_choice_set(str(DATA / "eval/xcopa/vi/test.vi.jsonl"))
    assert (vi.format, vi.lang, len(vi.items)) == ("xcopa", "vi", 500)
    first = vi.items[0]
    assert first.context == "Các mặt hàng đã được đóng gói trong bọc bong bóng bởi vì"
    assert first.choices == ["nó dễ vỡ.", "nó nhỏ."] and first.label == 0
    assert vi.items[1].context == "Tôi lục túi của tôi vì vậy"  # an effect
    assert load_choice_set(str(DATA / "eval/xcopa/vi-en/test.vi.jsonl")).lang == "en"  # detected, not the name
    assert load_choice_set(str(DATA / "eval/xcopa/vi-en/test.vi.jsonl"), lang="vi").items[0].context.endswith("bởi vì")
    # the continuation is " nó dễ vỡ." tokenised after the context, as one text
    choice = encode_item(first, tokenizer)[0]
    whole = tokenizer(first.context + " " + first.choices[0], add_special_tokens=False).input_ids
    assert choice.context + choice.continuation == whole
    assert choice.continuation_bytes == len(" nó dễ vỡ.".encode())
    span = choice_span(tokenizer.bos_token_id, choice, 2048)  # no BOS first, as lm-evaluation-harness does it
    assert span.ids == whole and span.first == len(choice.context)
    keep = len(choice.continuation) + 2  # a context window shorter than the item: the context is cut
    cut = choice_span(tokenizer.bos_token_id, choice, keep)
    assert cut.ids == whole[-keep:] and cut.ids[cut.first:] == choice.continuation


@pytest.mark.parametrize("line, message", [
    ('{"premise": "A.", "choice1": "B.", "choice2": "C.", "question": "why", "label": 0}', "question must be"),
    ('{"premise": "A.", "choice1": "B.", "choice2": "C.", "question": "cause", "label": 2}', "label 2 is not"),
    ('{"premise": "A.", "choice1": "B.", "question": "cause", "label": 0}', "no field 'choice2'"),
    ('{"context": "A", "choices": ["x"], "label": 0}', "at least two strings"),
    ('{"prompt": "A"}', "neither an XCOPA item"),
    ('{"context": "A", "choices": ["x", "y"], "label": 0', "invalid JSON"),
])
def test_bad_choice_items_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [line])
    with pytest.raises(DataError, match=f"bad.jsonl:1: .*{message}"):
        load_choice_set(path, lang="en")


def test_evaluator_subsets_restores_mode_and_matches_the_parts(tiny):
    model, tokenizer = tiny
    config = validate_recipe({
        "name": "t", "sources": {"vi": {"paths": ["x.jsonl"]}},
        "eval": {"text": {"vi": "eval/sib200/vie_Latn/dev.tsv"},
                 "choice": {"xcopa_vi": "eval/xcopa/vi/val.vi.jsonl"},
                 "max_documents": 5, "max_items": 4, "every": 50}}, base_dir=DATA).eval
    assert config.choice["xcopa_vi"].path == str(DATA / "eval/xcopa/vi/val.vi.jsonl")
    evaluator = Evaluator.from_config(config, tokenizer)
    model.train()
    results = evaluator(model)
    assert model.training
    assert set(results) == {"text", "choice", "seconds"}
    assert set(results["seconds"]) == {"bpb vi", "choice xcopa_vi"}  # the time each part took
    assert results["text"]["vi"]["documents"] == 5 and results["choice"]["xcopa_vi"]["n"] == 4
    assert set(results["choice"]["xcopa_vi"]) == {"accuracy", "accuracy_norm", "ci95", "n"}
    alone = bits_per_byte(model, load_text_set(config.text["vi"], tokenizer, max_documents=5),
                          tokenizer.bos_token_id, tokenizer.pad_token_id, 256)
    assert results["text"]["vi"]["bpb"] == pytest.approx(alone["bpb"], rel=1e-6)
    model.eval()
    assert evaluator(model, full=True)["choice"]["xcopa_vi"]["n"] == 100
    assert not model.training
    bf16 = Evaluator.from_config(config.model_copy(update={"dtype": "bfloat16"}), tokenizer)(model)
    assert bf16["text"]["vi"]["bpb"] == pytest.approx(results["text"]["vi"]["bpb"], rel=0.02)


def test_graft_eval_json(tmp_path, tiny_model_dir, monkeypatch, capsys):
    text = str(DATA / "eval/sib200/eng_Latn/dev.tsv")
    items = (DATA / "eval/xcopa/vi/val.vi.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    choice = write_lines(tmp_path / "few.vi.jsonl", items)
    code, out, err = run_graft(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--text", text,
                               "--choice", choice, "--json", "--batch-size", "7", "--max-length", "64")
    assert code == 0, err
    results = json.loads(out)
    assert set(results["text"][text]) == {"bpb", "tokens_per_byte", "tokens_per_word", "documents"}
    assert results["text"][text]["documents"] == 99
    assert results["choice"][choice]["n"] == 6 and len(results["choice"][choice]["ci95"]) == 2

    code, out, err = run_graft(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--choice", choice)
    assert code == 0 and "accuracy" in out and "few.vi.jsonl" in out.replace("\n", "")


@pytest.mark.parametrize("args, message", [
    (["--text", "missing.tsv"], "missing.tsv: no such file"),
    (["--choice", "BAD"], "bad.jsonl:2: invalid JSON"),
    ([], "give at least one --text, --choice, --harness, --generate or --lens"),
    (["--text", "GOOD", "--dtype", "fp8"], "--dtype: expected one of"),
])
def test_graft_eval_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, monkeypatch, capsys, args, message):
    bad = write_lines(tmp_path / "bad.jsonl", ['{"context": "a", "choices": ["b", "c"], "label": 0}', "{oops"])
    good = write_lines(tmp_path / "good.txt", DOCS)
    args = [{"BAD": bad, "GOOD": good}.get(a, a) for a in args]
    code, out, err = run_graft(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), *args)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bpb_agrees_with_plain_transformers_on_the_real_model():
    from graftlm.models import load_model, load_tokenizer

    model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    for lang in ("vie_Latn", "eng_Latn"):
        text_set = load_text_set(str(DATA / f"eval/sib200/{lang}/test.tsv"), tokenizer, max_documents=10)
        ours = bits_per_byte(model, text_set, tokenizer.bos_token_id, tokenizer.pad_token_id, 2048, batch_size=8)
        nats = 0.0
        for doc in text_set.documents:
            ids = torch.tensor([[tokenizer.bos_token_id, *doc]])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            nats -= log_probs.gather(-1, ids[0, 1:, None]).sum().item()
        direct = nats / math.log(2) / sum(text_set.bytes)
        assert ours["bpb"] == pytest.approx(direct, rel=0.005)


def test_batches_group_similar_lengths_within_the_limits():
    from graftlm.evaluate.scoring import Span, span_batches

    spans = [Span([0] * n, 1) for n in (50, 100, 10, 95, 49, 48, 47)]
    order = sorted(range(len(spans)), key=lambda i: len(spans[i].ids), reverse=True)
    lengths = [[len(spans[i].ids) for i in batch] for batch in span_batches(order, spans, batch_size=2)]
    assert lengths == [[100, 95], [50, 49], [48, 47], [10]]


def masked_full_softmax_scores(model, spans, pad_id: int) -> list[float]:
    """The reference for `log_likelihoods`: each batch of spans with its padding mask, every position through a
    full-vocabulary log-softmax (how graftlm scored before it kept only the scored positions)."""
    results = []
    with torch.no_grad():
        for span in spans:
            padded = span.ids + [pad_id] * 3
            mask = [1] * len(span.ids) + [0] * 3
            logits = model(input_ids=torch.tensor([padded]), attention_mask=torch.tensor([mask])).logits[0]
            log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
            results.append(sum(log_probs[t - 1, padded[t]].double().item() for t in range(span.first, len(span.ids))))
    return results


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no `logits_to_keep` (scored on its full logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)


def test_scoring_only_the_needed_positions_matches_the_masked_full_softmax(tiny):
    from graftlm.evaluate.scoring import Span, log_likelihoods

    model, tokenizer = tiny
    text_set = load_text_set(str(DATA / "eval/sib200/vie_Latn/dev.tsv"), tokenizer, max_documents=6)
    # whole documents, windows scored from the middle, and choice-like spans scored only at the end
    spans = [Span([tokenizer.bos_token_id, *doc], 1) for doc in text_set.documents]
    spans += [Span(doc, len(doc) // 2) for doc in text_set.documents] + [Span(doc, len(doc) - 2)
                                                                        for doc in text_set.documents]
    reference = masked_full_softmax_scores(model, spans, pad_id=0)
    assert log_likelihoods(model, spans, pad_id=0, batch_size=8) == pytest.approx(reference, rel=1e-6)
    assert log_likelihoods(NoLogitsToKeep(model), spans, pad_id=0, batch_size=8) == pytest.approx(reference, rel=1e-6)
