"""lm-evaluation-harness in process, generations and language mixing, the logit lens; their recipe keys, their
`graft eval` options and their place in the report. A tiny random model goes through every path."""

import json

import numpy as np
import pytest
import torch

from conftest import DATA, run_graft
from graftlm.errors import DataError, GraftError, RecipeError
from graftlm.evaluate.bpb import bits_per_byte, load_text_set
from graftlm.evaluate.choice import choice_accuracy, encode_item, load_choice_set
from graftlm.evaluate.config import EvalConfig, GenerateConfig, HarnessConfig, HarnessTask
from graftlm.recipe import validate_recipe

XCOPA_VI = str(DATA / "eval/xcopa/vi/test.vi.jsonl")
SIB_VI = str(DATA / "eval/sib200/vie_Latn/test.tsv")
SIB_EN = str(DATA / "eval/sib200/eng_Latn/test.tsv")
SIB_ID = str(DATA / "eval/sib200/ind_Latn/test.tsv")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from graftlm.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# ---- recipe keys ---------------------------------------------------------------------------------------


def test_harness_tasks_parse_and_resolve_against_the_recipe(tmp_path):
    recipe = validate_recipe({"name": "t", "sources": {"vi": {"paths": ["a.jsonl"]}}, "eval": {"harness": {
        "tasks": ["xcopa:vi=x/test.vi.jsonl", "hellaswag", {"task": "bpb", "lang": "vi", "path": "v.txt",
                                                             "name": "mine"}], "every": 4}}}, tmp_path)
    tasks = recipe.eval.harness.tasks
    assert (tasks[0].task, tasks[0].lang, tasks[0].path) == ("xcopa", "vi", str(tmp_path / "x/test.vi.jsonl"))
    assert [t.result_name for t in tasks] == ["graft_xcopa_vi", "hellaswag", "mine"]
    assert recipe.eval.harness.batch_size == 8 and recipe.eval.harness.limit is None
    assert recipe.eval.generate.max_new_tokens == 48 and recipe.eval.generate.n == 32
    assert recipe.eval.lens.max_documents == 100


@pytest.mark.parametrize("eval_section, message", [
    ({"harness": {"tasks": ["xcopa:xx=a.jsonl"]}}, "eval.harness.tasks.0: .*no connectives for language 'xx'"),
    ({"harness": {"tasks": ["xcopa"]}}, "eval.harness.tasks.0: .*give it as xcopa:LANG=PATH"),
    ({"harness": {"tasks": ["hellaswag:en=a.jsonl"]}}, "takes no language or path"),
    ({"harness": {"tasks": ["bpb:vi"]}}, "expected TASK:LANG=PATH"),
    ({"harness": {"tasks": ["bpb:vi=a.txt", "bpb:vi=b.txt"]}}, "two tasks are named graft_bpb_vi"),
    ({"harness": {"every": 0}}, "eval.harness.every"),
    ({"generate": {"max_new_tokens": 0}}, "eval.generate.max_new_tokens"),
    ({"generate": {"prompt": {"vi": "a.txt"}}}, "eval.generate.prompt: unknown key .*did you mean 'prompts'"),
    ({"lens": {"max_documents": "many"}}, "eval.lens.max_documents: expected an integer"),
])
def test_bad_eval_keys_name_the_key(tmp_path, eval_section, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe({"name": "t", "sources": {"vi": {"paths": ["a.jsonl"]}}, "eval": eval_section}, tmp_path)


# ---- lm-evaluation-harness -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness_results(tiny, tmp_path_factory):
    """lm-eval on the tiny model: XCOPA, SIB-200 and bits per byte, 6 documents each."""
    from graftlm.evaluate.harness import Harness

    model, tokenizer = tiny
    work = tmp_path_factory.mktemp("harness")
    config = HarnessConfig(tasks=[f"xcopa:vi={XCOPA_VI}", f"sib200:vi={SIB_VI}", f"bpb:vi={SIB_VI}"], limit=6)
    harness = Harness(config, work)
    harness.check()
    model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    results = harness(model, tokenizer)
    kept = model.training and torch.equal(state, torch.get_rng_state())
    model.eval()
    return results, work, kept


def test_harness_runs_lm_eval_in_process_and_leaves_the_model_as_it_was(harness_results):
    results, work, kept = harness_results
    assert kept  # training mode and torch's random state are back
    assert set(results) == {"graft_xcopa_vi", "graft_sib200_vi", "graft_bpb_vi"}
    xcopa = results["graft_xcopa_vi"]
    assert 0 <= xcopa["acc"] <= 1 and xcopa["acc_stderr"] > 0 and xcopa["n"] == 6
    assert (xcopa["task"], xcopa["lang"], xcopa["path"]) == ("xcopa", "vi", XCOPA_VI)
    assert results["graft_bpb_vi"]["bits_per_byte"] > 0 and results["graft_bpb_vi"]["bits_per_byte_stderr"] is None
    tasks = sorted(p.name for p in (work / "tasks").iterdir())
    assert tasks == ["graft_bpb_vi.yaml", "graft_sib200_vi.yaml", "graft_xcopa_vi.yaml"]
    assert '"bởi vì" if question == "cause" else "vì vậy"' in (work / "tasks/graft_xcopa_vi.yaml").read_text()
    assert any((work / "cache").iterdir())  # the datasets cache stayed in the work folder


def test_harness_agrees_with_graftlm_on_the_same_items(harness_results, tiny):
    """lm-eval's XCOPA accuracy and rolling bits per byte equal graftlm's own scorers on the same documents."""
    results, _, _ = harness_results
    model, tokenizer = tiny
    choice_set = load_choice_set(XCOPA_VI, "xcopa", "vi")
    items = choice_set.items[:6]
    settings = dict(start_id=tokenizer.bos_token_id, pad_id=0, max_length=256)
    own = choice_accuracy(model, [encode_item(item, tokenizer) for item in items], [i.label for i in items],
                          **settings)
    assert results["graft_xcopa_vi"]["acc"] == pytest.approx(own["accuracy"])
    text_set = load_text_set(SIB_VI, tokenizer, max_documents=6)
    assert results["graft_bpb_vi"]["bits_per_byte"] == pytest.approx(bits_per_byte(model, text_set, **settings)["bpb"],
                                                                      rel=1e-4)


def test_sib200_topics_come_from_the_file(harness_results):
    _, work, _ = harness_results
    import yaml

    task = yaml.safe_load((work / "tasks/graft_sib200_vi.yaml").read_text())
    assert task["doc_to_choice"] == ["entertainment", "geography", "health", "politics", "science/technology",
                                     "sports", "travel"]
    first = json.loads((work / "data/graft_sib200_vi.jsonl").read_text().splitlines()[0])
    assert task["doc_to_choice"][first["label"]] == first["category"]


def test_a_task_whose_data_is_not_local_is_a_clear_error(tmp_path):
    from graftlm.evaluate.harness import Harness

    own = tmp_path / "mine"
    own.mkdir()
    (own / "remote.yaml").write_text("task: remote_task\ndataset_path: nobody/not-a-local-dataset\n"
                                     "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\n"
                                     "doc_to_choice: [a, b]\ndoc_to_target: 0\n")
    harness = Harness(HarnessConfig(tasks=["remote_task"], include_path=str(own)), tmp_path / "work")
    with pytest.raises(GraftError, match="remote_task: cannot load its data offline .*never downloads"):
        harness.check()


def test_bad_local_task_files_name_file_and_line(tmp_path):
    from graftlm.evaluate.harness import Harness

    bad = write_lines(tmp_path / "x.jsonl", ['{"premise": "A.", "choice1": "b", "choice2": "c", "question": "why", '
                                             '"label": 0}'])
    with pytest.raises(DataError, match=r"x.jsonl:1: question must be 'cause' or 'effect'"):
        Harness(HarnessConfig(tasks=[f"xcopa:vi={bad}"]), tmp_path / "work")
    tsv = tmp_path / "s.tsv"
    tsv.write_text("index_id\tcategory\ttext\n1\tsports\tOne.\n2\tsports\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s.tsv:3: expected 3 tab-separated columns"):
        Harness(HarnessConfig(tasks=[f"sib200:vi={tsv}"]), tmp_path / "work")


# ---- generations ---------------------------------------------------------------------------------------


def test_prompts_are_the_first_words_and_no_space_scripts_are_cut_by_characters():
    from graftlm.evaluate.generate import prompt_of

    assert prompt_of("Hà Nội là thủ đô của Việt Nam và là thành phố lớn.", 8) == "Hà Nội là thủ đô của"
    assert prompt_of("Hà Nội là thủ đô của Việt Nam và là một thành phố lớn thứ hai.", 8) == "Hà Nội là thủ đô của Việt Nam"
    assert prompt_of("今天天气很好我们去公园散步吧", 4) == "今天天气"


@pytest.mark.parametrize("content, message", [
    ("Một câu đủ dài để làm lời nhắc.\nMột\n", r"p.txt:2: 'Một' is too short to cut a prompt from"),
    ("A sentence.\n" + "word " * 600 + "\n", r"p.txt:2: 3,000 characters: not one sentence"),
    (b"A fine sentence here.\nBad \xff byte here.\n", r"p.txt:2: not valid UTF-8"),
])
def test_prompt_file_with_bad_lines_names_file_and_line(tmp_path, tiny, content, message):
    from graftlm.evaluate.generate import load_prompts

    path = tmp_path / "p.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError, match=message):
        load_prompts("vi", str(path), tiny[1], GenerateConfig())


def test_graft_eval_names_a_bad_prompt_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    path = write_lines(tmp_path / "p.tsv", ["text", "Một câu đủ dài để làm lời nhắc.", "x\ty"])
    code, _, err = run_graft(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--generate", f"vi={path}")
    assert code == 2 and "p.tsv:3: expected 1 tab-separated columns, got 2" in err


def generation_results(tiny, seed):
    from graftlm.evaluate.suite import Evaluator

    model, tokenizer = tiny
    config = EvalConfig(generate=GenerateConfig(prompts={"vi": SIB_VI, "en": SIB_EN}, n=3, max_new_tokens=6,
                                                seed=seed))
    return Evaluator.from_config(config, tokenizer)(model, boundary=True)["generate"]


def test_generation_is_deterministic_for_a_seed(tiny):
    first, again, other = generation_results(tiny, 0), generation_results(tiny, 0), generation_results(tiny, 1)
    assert first == again
    assert [s["line"] for s in first["vi"]["samples"]] != [s["line"] for s in other["vi"]["samples"]]
    for lang in ("vi", "en"):
        result = first[lang]
        assert set(result) >= {"same_language", "mixed", "distinct_1", "distinct_2", "languages", "samples"}
        assert result["n"] == 3 and 0 <= result["same_language"] <= 1 and 0 <= result["mixed"] <= 1
        assert all(s["prompt"] and isinstance(s["continuation"], str) for s in result["samples"])
    # the vi and en files are parallel: the same seed samples the same lines of each
    assert [s["line"] for s in first["vi"]["samples"]] == [s["line"] for s in first["en"]["samples"]]


def test_language_rates_find_mixing_per_sentence(tiny):
    from graftlm.curate.config import LanguageIdConfig
    from graftlm.curate.langid import make_identifier
    from graftlm.evaluate.generate import Prompt, PromptSet, language_rates

    tokenizer = tiny[1]
    texts = [" và chúng tôi đã đi đến chợ để mua rau. Sau đó chúng tôi về nhà nấu cơm.",
             " và chúng tôi đã đi đến chợ để mua rau. Then we went back home and cooked dinner together.",
             " a a a a a a a a"]
    prompts = PromptSet("vi", "p.txt", [Prompt(i + 1, "Hôm qua", []) for i in range(3)])
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rates = language_rates(prompts, ids, tokenizer, make_identifier(LanguageIdConfig()))
    assert [s["language"] for s in rates["samples"][:2]] == ["vi", "vi"]
    assert rates["samples"][1]["sentence_languages"] == ["vi", "en"]
    assert rates["mixed"] == pytest.approx(1 / 3) and rates["same_language"] == pytest.approx(2 / 3)
    assert rates["samples"][2]["language"] == "und"  # too few letters to tell
    assert rates["distinct_1"] < 1


# ---- the logit lens ------------------------------------------------------------------------------------


def test_token_languages_from_counts():
    from graftlm.evaluate.lens import TokenLanguages

    counts = {"vi": np.array([10, 10, 1, 0, 50, 6]), "en": np.array([0, 10, 0, 8, 50, 2])}
    languages = TokenLanguages.from_counts(counts, vocab_size=7, exclude=[5])
    # token 0: vi only; 1: shared; 2: once is not enough; 3: en; 4: shared; 5: excluded (special); 6: unseen
    assert languages.owner.tolist() == [0, -1, -1, 1, -1, -1, -1]
    assert languages.share_counts(torch.tensor([0, 0, 3, 4, 9])).tolist() == [2, 1]  # 9: a padded head row


def test_token_languages_from_packed_data(tmp_path, smol_tokenizer_dir, tiny):
    from graftlm.data.config import SourceConfig
    from graftlm.data.pack import pack_source
    from graftlm.evaluate.lens import TokenLanguages

    tokenizer = tiny[1]
    for lang, path in (("vi", SIB_VI), ("en", SIB_EN)):
        pack_source(lang, SourceConfig(paths=[path], max_documents=200), smol_tokenizer_dir, tmp_path / lang)
    packed = TokenLanguages.from_packed({"vi": [tmp_path / "vi"], "en": [tmp_path / "en"]}, len(tokenizer),
                                        tokenizer.all_special_ids)
    owner = dict(zip(packed.languages, range(2)))
    assert packed.owner[tokenizer.convert_tokens_to_ids("Ãł")] == owner["vi"]  # the "à" of " và", " là"
    assert packed.owner[tokenizer.convert_tokens_to_ids("Ġthe")] == owner["en"]
    assert packed.owner[tokenizer.eos_token_id] == -1
    assert packed.origin == "the packed training data"


@pytest.fixture(scope="module")
def lens_evaluator(tiny):
    from graftlm.evaluate.suite import Evaluator

    config = EvalConfig(text={"vi": SIB_VI}, max_documents=5,
                        lens={"text": {"vi": SIB_VI, "en": SIB_EN}, "max_documents": 5})
    return Evaluator.from_config(config, tiny[1])


def test_lens_last_layer_is_the_models_own_bits_per_byte(tiny, lens_evaluator):
    model = tiny[0]
    results = lens_evaluator(model, boundary=True)
    lens = results["lens"]["vi"]
    assert lens["layers"] == list(range(model.config.num_hidden_layers + 1))
    assert lens["bpb"][-1] == pytest.approx(results["text"]["vi"]["bpb"], rel=1e-6)
    assert lens["target"] == "vi" and lens["target_share"] == lens["shares"]["vi"]
    assert lens["english_share"] == lens["shares"]["en"]
    assert all(0 <= a + b <= 1 for a, b in zip(lens["target_share"], lens["english_share"]))
    assert lens["token_languages"] == "the lens texts"


def test_lens_in_bfloat16_is_close_to_float32(tiny, lens_evaluator):
    from graftlm.evaluate.lens import logit_lens

    model, tokenizer = tiny
    text_set = lens_evaluator.lens_text["en"]
    settings = dict(start_id=tokenizer.bos_token_id, pad_id=0, max_length=256)
    full = logit_lens(model, text_set, lens_evaluator.token_languages, **settings)
    half = logit_lens(model, text_set, lens_evaluator.token_languages, **settings, dtype="bfloat16")
    assert half["bpb"] == pytest.approx(full["bpb"], rel=0.02)


def test_lens_under_a_lora_adapter(tiny, lens_evaluator):
    """peft's LoRA starts as the identity (B = 0): the lens of the adapted model equals the plain one's."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = tiny[0]
    plain = lens_evaluator(model, boundary=True)["lens"]["en"]
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lens = lens_evaluator(adapted, boundary=True)["lens"]["en"]
    assert lens["bpb"] == pytest.approx(plain["bpb"], rel=1e-6) and lens["shares"] == plain["shares"]


def test_final_norm_is_found_or_the_error_says_what_was_looked_for():
    from graftlm.evaluate.lens import final_norm_and_head

    class Decoder(torch.nn.Module):
        pass

    class Odd(torch.nn.Module):
        base_model_prefix = "model"

        def __init__(self):
            super().__init__()
            self.model = Decoder()

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(GraftError, match="cannot find the final norm of Odd .*looked for norm, final_layernorm"):
        final_norm_and_head(Odd())


# ---- the evaluator's schedule and `graft eval` ----------------------------------------------------------


def test_extras_run_only_at_the_boundaries(tiny, lens_evaluator):
    model = tiny[0]
    assert set(lens_evaluator(model)) == {"text", "choice", "seconds"}
    assert set(lens_evaluator(model, step=12)) == {"text", "choice", "seconds"}
    assert set(lens_evaluator(model, step=12, boundary=True)) == {"text", "choice", "lens", "seconds"}


def test_harness_every_n_steps(tiny, tmp_path, monkeypatch):
    from graftlm.evaluate.harness import Harness
    from graftlm.evaluate.suite import Evaluator

    calls = []
    monkeypatch.setattr(Harness, "__call__", lambda self, model, tokenizer, on_task=None: calls.append(1) or {})
    config = EvalConfig(harness={"tasks": [f"bpb:vi={SIB_VI}"], "every": 4})
    evaluator = Evaluator.from_config(config, tiny[1], work_dir=tmp_path)
    ran = ["harness" in evaluator(tiny[0], step=step) for step in (3, 4, 6, 8)]
    assert ran == [False, True, False, True] and len(calls) == 2
    assert "harness" in evaluator(tiny[0], step=5, boundary=True)


def test_graft_eval_json_has_every_part(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code, out, err = run_graft(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--json",
                               "--harness", f"bpb:id={SIB_ID}", "--limit", "3",
                               "--generate", f"id={SIB_ID}", "--n", "2", "--max-new-tokens", "4",
                               "--lens", f"id={SIB_ID}", "--lens", f"en={SIB_EN}", "--max-documents", "3")
    assert code == 0, err
    results = json.loads(out)
    assert set(results) == {"text", "choice", "harness", "generate", "lens", "seconds"}
    assert {"harness", "generate id", "lens id"} <= set(results["seconds"])  # what each part took
    assert results["harness"]["graft_bpb_id"]["n"] == 3
    assert set(results["generate"]["id"]) >= {"same_language", "mixed", "distinct_2", "samples"}
    assert len(results["generate"]["id"]["samples"]) == 2
    lens = results["lens"]["id"]
    assert set(lens) >= {"layers", "bpb", "target_share", "english_share"} and lens["target"] == "id"


@pytest.mark.parametrize("args, message", [
    (["--generate", "vi"], "--generate vi: expected LANG=PATH"),
    (["--lens", "vi=a.txt", "--lens", "vi=b.txt"], "--lens: language 'vi' given twice"),
    (["--harness", "xcopa:zz=a.jsonl"], "--harness xcopa:zz=a.jsonl: xcopa: no connectives for language 'zz'"),
])
def test_graft_eval_bad_options_are_one_line(tiny_model_dir, monkeypatch, capsys, args, message):
    code, _, err = run_graft(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), *args)
    assert code == 2 and message in err


# ---- the report ----------------------------------------------------------------------------------------

REPORT_RECIPE = """
name: rep
sources:
  vi: {{paths: [a.jsonl], lang: vi}}
  en: {{paths: [b.jsonl], lang: en}}
mixture: {{vi: 0.75, en: 0.25}}
eval:
  choice: {{xcopa_vi: {{path: {xcopa}, lang: vi}}}}
"""


def report_record(step, acc, same, continuation, target_share):
    sample = {"line": 2, "prompt": "Hà Nội", "continuation": continuation, "language": "vi",
              "sentence_languages": ["vi"]}
    lens = {"layers": [0, 1, 2], "bpb": [9.0, 5.0, 2.5], "shares": {"vi": target_share, "en": [0.1, 0.2, 0.1]},
            "target": "vi", "target_share": target_share, "english_share": [0.1, 0.2, 0.1],
            "token_languages": "the packed training data"}
    return {"step": step, "tokens": step * 100, "eval": {
        "text": {}, "choice": {"xcopa_vi": {"accuracy": acc, "accuracy_norm": acc, "ci95": [0.4, 0.6], "n": 100}},
        "harness": {"graft_xcopa_vi": {"acc": acc + 0.01, "acc_stderr": 0.022, "n": 500, "task": "xcopa",
                                       "lang": "vi", "path": XCOPA_VI}},
        "generate": {"vi": {"same_language": same, "mixed": 0.1, "distinct_1": 0.9, "distinct_2": 0.95,
                            "languages": {"vi": 3, "en": 1}, "n": 4, "samples": [sample]}},
        "lens": {"vi": lens, "en": lens}}}


def test_report_shows_harness_generations_and_lens(tmp_path):
    from graftlm.recipe import load_recipe
    from graftlm.report.page import build_report
    from graftlm.runs import RunDir

    (tmp_path / "recipe.yaml").write_text(REPORT_RECIPE.format(xcopa=XCOPA_VI))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    run = RunDir(tmp_path / "runs/rep")
    run.write_recipe(recipe)
    run.append_metrics(report_record(0, 0.48, 0.5, "thủ đô <b>cũ</b>", [0.3, 0.2, 0.4]))
    run.append_metrics(report_record(12, 0.52, 0.75, "là thủ đô & lớn", [0.3, 0.5, 0.7]))
    build_report(recipe, run)
    page = run.report.read_text(encoding="utf-8")
    assert "lm-evaluation-harness" in page and "0.4900 ± 0.0220" in page and "0.5300 ± 0.0220" in page
    assert "xcopa_vi: 0.4800 → 0.5200" in page  # graftlm's own number on the same file, beside lm-eval's
    assert "same language" in page and "75%" in page
    assert "thủ đô &lt;b&gt;cũ&lt;/b&gt; [vi]" in page and "là thủ đô &amp; lớn [vi]" in page
    assert "<b>cũ</b>" not in page
    assert "Logit lens" in page and "counted in the packed training data" in page
    assert page.count("data:image/png;base64,") >= 2


def test_the_trained_model_gets_the_boundary_evaluation_when_the_last_step_is_an_eval_step():
    """eval.every dividing the run's length: the last step's evaluation is the end's (generations, lens), not a
    plain one that the end then skips."""
    import contextlib
    from types import SimpleNamespace

    from graftlm.train.callbacks import Evaluation

    calls, logged = [], []

    def evaluator(model, progress=None, step=0, boundary=False):
        calls.append((step, boundary))
        return {}

    state = SimpleNamespace(step=0, tokens=0)
    module = SimpleNamespace(gathered=lambda *a: contextlib.nullcontext(SimpleNamespace(model=None)))
    trainer = SimpleNamespace(state=state, total_steps=4, module=module, log=logged.append, progress=None,
                              group=SimpleNamespace(wait_for_everyone=lambda: None))
    callback = Evaluation(evaluator, [2], [])
    callback.on_fit_start(trainer)
    for step in range(1, 5):
        state.step = step
        callback.on_step_end(trainer, {})
    callback.on_fit_end(trainer)
    assert calls == [(0, True), (2, False), (4, True)]
    assert [r["step"] for r in logged] == [0, 2, 4]


def test_a_continuation_cut_inside_a_character_drops_the_piece(tiny):
    from graftlm.curate.config import LanguageIdConfig
    from graftlm.curate.langid import make_identifier
    from graftlm.evaluate.generate import Prompt, PromptSet, language_rates

    tokenizer = tiny[1]
    ids = tokenizer(" chúng tôi được", add_special_tokens=False)["input_ids"]
    cut = ids[:-2]  # byte-level pieces: the budget ended inside "ợ"
    assert tokenizer.decode(cut).endswith("\ufffd")
    rates = language_rates(PromptSet("vi", "p.txt", [Prompt(1, "Hôm qua", [])]), [cut], tokenizer,
                           make_identifier(LanguageIdConfig()))
    assert rates["samples"][0]["continuation"] == " chúng tôi đư"
