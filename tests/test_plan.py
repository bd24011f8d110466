"""`graft plan`: the laws recover known parameters from noisy synthetic curves, the plan refuses what it cannot
decide, and its outputs (plan.json, the planned recipe, the page) have the promised shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graftlm.errors import GraftError, RecipeError
from graftlm.plan import pilots as P
from graftlm.plan.choose import make_plan
from graftlm.plan.laws import (CMR_SOURCE, CMR_TARGET, PlanError, Point, fit_cmr, fit_curve, fit_dcpt, fit_mixing)
from graftlm.plan.report import write_plan
from graftlm.plan.run import run_plan
from graftlm.recipe import load_recipe, validate_recipe
from graftlm.train.schedule import lr_multiplier

BASE = {"vi": 2.2, "en": 1.0}
TARGET = dict(E=1.3, B=0.25, eta=-0.3, beta=0.3, C=0.15, gamma=0.5, epsilon=0.05)
SOURCE = dict(E=1.0, B=-0.01, eta=0.5, beta=0.3, C=0.004, gamma=1.0, epsilon=0.1)
"""A D-CPT world: the target's bpb falls with tokens and share; English rises with tokens, more without replay."""


def dcpt(tokens, x, p, shifted, scale):
    data_share = x + p["epsilon"] if shifted else x
    return p["E"] + p["B"] * data_share ** p["eta"] / (tokens / scale) ** p["beta"] + p["C"] / (x + p["epsilon"]) ** p["gamma"]


def dcpt_world(ratio: float, tokens: int, scale: float = 30_000) -> dict[str, float]:
    return {"vi": dcpt(tokens, ratio, TARGET, False, scale), "en": dcpt(tokens, 1 - ratio, SOURCE, True, scale)}


def measure(world, ratios, tokens, noise: float, seed: int = 0) -> list[Point]:
    """Each pilot: the start model at 0 tokens, then `world` with Gaussian noise at each token count."""
    rng = np.random.default_rng(seed)
    points = []
    for ratio in ratios:
        points.append(Point(ratio, 0, dict(BASE)))
        for t in tokens:
            points.append(Point(ratio, int(t), {k: v + rng.normal(0, noise) for k, v in world(ratio, int(t)).items()}))
    return points


def demo(*overrides: str):
    return load_recipe(None, list(overrides))


def pilot_points(recipe, world, noise=5e-4, seed=0) -> tuple[list[Point], list[Point]]:
    """What the recipe's pilots would measure in `world`: at their evaluation steps, the validation pilot apart."""
    fitted, validation = [], []
    for pilot in P.pilot_variants(recipe):
        steps = P.pilot_steps(recipe, pilot.tokens)
        every = steps if pilot.validation else P.eval_every(recipe)
        tokens = [s * recipe.train.batch_tokens for s in range(every, steps + 1, every)]
        (validation if pilot.validation else fitted).extend(measure(world, [pilot.ratio], tokens, noise, seed))
    return fitted, validation


# ---- the fits recover known parameters -----------------------------------------------------------------

def test_dcpt_fit_recovers_the_parameters_of_both_surfaces():
    scale = 1e5
    ratios = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0]
    points = measure(lambda r, t: dcpt_world(r, t, scale), ratios, np.geomspace(1e3, 1e5, 16), noise=2e-4)
    law = fit_dcpt(points, "vi")
    for name, true in (("vi", TARGET), ("en", SOURCE)):
        got = law.curves[name].values()  # coefficients in the fit's units (tokens / 1e5), like `true`
        for key in ("eta", "beta", "gamma"):
            assert got[key] == pytest.approx(true[key], abs=0.03), (name, key)
        for key in ("E", "B", "C", "epsilon"):  # English's terms are a few hundredths of a bpb: 10%, not 2%
            assert got[key] == pytest.approx(true[key], rel=0.02 if name == "vi" else 0.1), (name, key)
        assert law.quality[name].r2 > 0.999
    # params() reports B for tokens as counted: B_tokens / D^β == B / (D/scale)^β
    fitted = law.curves["vi"].values()
    assert law.params()["vi"]["B"] == pytest.approx(fitted["B"] * scale ** fitted["beta"])


def test_dcpt_predicts_far_past_the_pilots_of_the_default_plan():
    """The issue's plan: 4 shares, 8 points over one decade; the prediction 60x past the pilots within 1%."""
    points = measure(dcpt_world, [0.5, 0.7, 0.85, 1.0], [3750 * j for j in range(1, 9)], noise=5e-4)
    law = fit_dcpt(points, "vi")
    for ratio in (0.6, 0.9):
        predicted = law.predict(ratio, [2_000_000])
        for name, true in dcpt_world(ratio, 2_000_000).items():
            assert predicted[name][0] == pytest.approx(true, rel=0.01)


def test_exponents_on_their_bounds_are_reported():
    """Curves that are straight lines in log tokens and in log shares: D-CPT turns power laws into logarithms by
    taking exponents to their bounds (C/(r + ε)^γ with γ → 0 is C − C·γ·ln(r + ε), E cancelling C), and says so."""
    def world(ratio, tokens):
        return {"vi": 2.0 - 0.1 * ratio * np.log(tokens / 1000), "en": 1.0 + 0.001 * (1 - ratio) * np.log(tokens)}

    points = measure(world, [0.5, 0.7, 0.85, 1.0], [3750 * j for j in range(2, 9)], noise=1e-4)
    law = fit_dcpt(points, "vi")
    assert law.at_bounds()["vi"]["gamma"][1] == 0.0
    # in a D-CPT world the token exponents stay free (four shares leave ε, the share offset, at its bound)
    bounded = fit_dcpt(measure(dcpt_world, [0.5, 0.7, 0.85, 1.0], [3750 * j for j in range(1, 9)], noise=5e-4),
                       "vi").at_bounds()
    assert not any("beta" in b or "gamma" in b for b in bounded.values())


def test_cmr_fit_recovers_each_pilots_curves():
    true = {0.5: ((-0.3, 0.4, -0.1), (-0.004, -0.5, -0.03, 0.5, 0.04)),
            0.8: ((-0.35, 0.35, -0.15), (-0.006, -0.5, -0.02, 0.6, 0.05))}

    def world(ratio, tokens):
        u = tokens / 1e5
        (a1, s1, b1), (a2, s2, a3, s3, b2) = true[ratio]
        return {"vi": BASE["vi"] + a1 * u ** s1 + b1, "en": BASE["en"] + a2 * u ** s2 + a3 * u ** s3 + b2}

    points = measure(world, list(true), np.geomspace(1e3, 1e5, 16), noise=1e-4)
    law = fit_cmr(points, "vi")
    params = law.params()
    for ratio, ((a1, s1, b1), (a2, s2, a3, s3, b2)) in true.items():
        t = law.curves["vi"][ratio].values()
        assert (t["alpha1"], t["s1"], t["beta1"]) == pytest.approx((a1, s1, b1), abs=0.005)
        s = params["en"][f"{ratio:g}"]
        assert (s["s2"], s["s3"]) == pytest.approx((s2, s3), abs=0.1)
        assert s["beta2"] == pytest.approx(b2, abs=0.006)
        assert law.curves["en"][ratio].values()["alpha3"] == pytest.approx(a3, rel=0.25)
        # what matters for the choice: the source curve, including its peak, within a few noise levels
        u = np.geomspace(1e-2, 1, 50)
        fitted = law.curves["en"][ratio](u)
        assert np.max(np.abs(fitted - (a2 * u ** s2 + a3 * u ** s3 + b2))) < 5e-4
    # between pilots the prediction is the linear interpolation of the neighbours
    mid = law.predict(0.65, [50_000])["vi"][0]
    ends = [law.predict(r, [50_000])["vi"][0] for r in (0.5, 0.8)]
    assert mid == pytest.approx(0.5 * ends[0] + 0.5 * ends[1])


def test_mixing_law_fit_recovers_its_parameters():
    true = {"vi": (1.5, 0.8, np.array([-2.0, 0.5])), "en": (0.9, 0.05, np.array([1.5, -1.0]))}
    rng = np.random.default_rng(1)
    points = []
    for vi in (0.3, 0.5, 0.7, 0.9):
        for code in (0.0, 0.05, 0.1):
            shares = {"vi": vi, "code": code}
            points.append(Point(vi, 0, dict(BASE), shares))
            r = np.array([vi, code])
            points.append(Point(vi, 30_000, {n: c + k * np.exp(r @ t) + rng.normal(0, 2e-4)
                                             for n, (c, k, t) in true.items()}, shares))
    law = fit_mixing(points)
    for name, (c, k, t) in true.items():
        got = law.params()[name]
        assert (got["c"], got["k"]) == pytest.approx((c, k), rel=0.05)
        assert [got["t"]["vi"], got["t"]["code"]] == pytest.approx(list(t), abs=0.06)


def test_a_spike_does_not_pull_the_robust_fit():
    u = np.geomspace(1e-2, 1, 16)
    clean = -0.3 * u ** 0.4 - 0.1
    spiked = clean + np.random.default_rng(0).normal(0, 2e-4, 16)
    spiked[5] += 0.05  # one bad evaluation
    values = fit_curve(CMR_TARGET, u, spiked, restarts=8, what="test").values()
    assert (values["alpha1"], values["s1"], values["beta1"]) == pytest.approx((-0.3, 0.4, -0.1), abs=0.01)


# ---- refusals ----------------------------------------------------------------------------------------------

def test_too_few_pilots_or_points_is_a_clear_error():
    with pytest.raises(RecipeError, match=r"^plan\.ratios: law d-cpt needs at least 3 pilot shares"):
        demo("plan={ratios: [0.5, 1.0]}")
    with pytest.raises(RecipeError, match=r"^plan\.ratios: law mixing needs at least 4"):
        demo("plan={law: mixing, ratios: [0.5, 0.7, 1.0]}")
    with pytest.raises(RecipeError, match=r"^plan\.eval_points"):
        demo("plan={eval_points: 4}")
    points = measure(dcpt_world, [0.5, 1.0], [3750 * j for j in range(1, 9)], noise=5e-4)
    with pytest.raises(PlanError, match="needs pilots at 3 or more target shares, got 2"):
        fit_dcpt(points, "vi")
    with pytest.raises(PlanError, match="5 points for 5 parameters"):
        fit_curve(CMR_SOURCE, np.linspace(0.2, 1, 5), np.zeros(5), restarts=2, what="CMR fit of en")
    assert issubclass(PlanError, GraftError) and PlanError.exit_code == 2


def test_a_poor_fit_is_refused():
    rng = np.random.default_rng(3)

    def noise_world(ratio, tokens):  # no law: bpb jumps around by far more than the tolerance
        return {"vi": 1.8 + rng.normal(0, 0.05), "en": 1.0 + rng.normal(0, 0.03)}

    recipe = demo("plan={}")
    points = measure(noise_world, recipe.plan.ratios, [3750 * j for j in range(1, 9)], noise=0)
    with pytest.raises(PlanError, match=r"the d-cpt fit of (vi|en)'s bits per byte is poor \(R² .* < plan.min_r2"):
        make_plan(recipe.plan, points, "vi")


def test_no_share_within_the_tolerance_is_refused():
    recipe = demo("plan={tolerance: {bpb: 0.0005}}")
    points, _ = pilot_points(recipe, dcpt_world)
    with pytest.raises(PlanError, match=r"no target share in \[0.5, 1\] keeps en's bits per byte within"):
        make_plan(recipe.plan, points, "vi")


def test_cross_key_problems_name_the_key():
    with pytest.raises(RecipeError, match=r"^plan.pilot_tokens: 3,000 tokens are 1 optimizer steps"):
        P.check_plan(demo("plan={pilot_tokens: 3000}"))
    with pytest.raises(RecipeError, match=r"^plan.vary: 'xx' is not a source"):
        P.check_plan(demo("plan={vary: [xx]}"))
    with pytest.raises(RecipeError, match=r"^eval.text: the plan needs a source-language set"):
        P.check_plan(validate_recipe({**demo().model_dump(mode="json"), "plan": {},
                                      "eval": {"text": {"vi": "x.txt"}}}))
    with pytest.raises(RecipeError, match=r"^plan.vary: law d-cpt fits the target language's share"):
        P.check_plan(demo("plan={vary: [en]}"))


# ---- the plan and its outputs ------------------------------------------------------------------------------

def test_plan_chooses_the_largest_share_within_the_tolerance_and_writes_its_outputs(tmp_path):
    recipe = demo("plan={validate: {ratio: 0.6, tokens: 80000}}")
    points, validation = pilot_points(recipe, dcpt_world)
    plan = make_plan(recipe.plan, points, "vi", validation)
    data = write_plan(tmp_path, recipe, plan, points, validation)

    # the choice: the rise at the chosen share is at the tolerance, a little more share would cross it
    chosen = data["chosen"]
    assert 0.5 < chosen["ratio"] < 1.0
    assert chosen["max_source_rise"]["en"] <= 0.02 < plan.law.predict(chosen["ratio"] + 0.01, [2_000_000])["en"][0] - 1.0
    true_rise = dcpt_world(chosen["ratio"], 2_000_000)["en"] - BASE["en"]
    assert true_rise == pytest.approx(0.02, abs=0.004)  # 60x past the pilots

    # plan.json: the shape, strict JSON
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written == json.loads(json.dumps(data, allow_nan=False))
    assert {"law", "params", "fit", "predictions", "chosen", "validation"} <= set(written)
    assert written["law"] == "d-cpt" and set(written["params"]) == {"vi", "en"}
    assert set(written["fit"]) >= {"r2", "huber"} and written["fit"]["r2"]["vi"] > 0.99
    assert set(chosen) >= {"ratio", "budget_tokens", "predicted_target_bpb", "predicted_source_bpb"}
    assert chosen["budget_tokens"] == 2_000_000 and chosen["extrapolated"] is True
    for p in written["predictions"]:
        assert set(p) >= {"ratio", "tokens", "target_bpb", "source_bpb"} and set(p["source_bpb"]) == {"en"}
        assert p["extrapolated"] == (p["tokens"] > 32_768)  # 8 steps of 4,096 tokens: the pilots' longest
    v = written["validation"]
    assert set(v) >= {"ratio", "tokens", "predicted", "measured", "error"}
    assert v["ratio"] == 0.6 and v["tokens"] == 81_920 and v["extrapolated"] and not v["outside_ratios"]
    assert abs(v["error"]["vi"]) < 0.01 and abs(v["error"]["en"]) < 0.01

    # the planned recipe: loads, the chosen mixture (en keeps the rest), the budget, WSD, no plan
    planned = load_recipe(tmp_path / "recipe.yaml")
    assert planned.mixture.weights == pytest.approx({"vi": chosen["ratio"], "en": 1 - chosen["ratio"]})
    assert planned.train.max_tokens == 2_000_000 and planned.train.max_steps is None
    assert planned.train.schedule.name == "wsd" and planned.train.lr == recipe.train.lr
    assert planned.plan is None and planned.name == recipe.name

    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Validation" in page and "tolerance" in page


def test_law_both_keeps_the_law_with_the_lower_held_out_error():
    recipe = demo("plan={law: both}")
    points, _ = pilot_points(recipe, dcpt_world)
    plan = make_plan(recipe.plan, points, "vi")
    data = plan.to_json()
    assert set(data["laws"]) == {"d-cpt", "cmr"}
    assert data["held_out"]["left_out"] == [0.7, 0.85]
    errors = data["held_out"]["error"]
    assert data["law"] == min(errors, key=errors.get) == "d-cpt"  # the world is a D-CPT one


def test_relative_tolerance_and_cmr_law():
    recipe = demo("plan={law: cmr, tolerance: {relative: 0.02}}")
    points, _ = pilot_points(recipe, dcpt_world)
    plan = make_plan(recipe.plan, points, "vi")
    assert plan.allowed["en"] == pytest.approx(0.02 * BASE["en"])
    assert plan.chosen.max_rise["en"] <= plan.allowed["en"]
    assert plan.law.name == "cmr" and set(plan.to_json()["params"]["en"]) == {"0.5", "0.7", "0.85", "1"}


def test_several_varied_shares_plan_with_the_mixing_law(tmp_path):
    recipe = demo("sources.code={paths: [x.jsonl]}", "mixture={vi: 0.6, en: 0.3, code: 0.1}",
                  "eval.text.code=x.txt",
                  "plan={vary: [vi, code], law: mixing, ratios: [{vi: 0.5, code: 0.1}, {vi: 0.7, code: 0.1}, "
                  "{vi: 0.9, code: 0.05}, {vi: 0.6, code: 0.2}, {vi: 0.8, code: 0.0}, {vi: 0.7, code: 0.25}]}")
    pilots = P.pilot_variants(recipe)
    assert pilots[0].weights == {"vi": 0.5, "code": 0.1, "en": 0.4} and pilots[0].name == "vi0.5-code0.1"

    def world(shares):  # more vi: better vi, worse en; more code: better code, worse vi, better en
        vi, code = shares["vi"], shares["code"]
        return {"vi": 1.5 + 0.8 * np.exp(-2 * vi + 1.0 * code), "en": 0.99 + 0.005 * np.exp(2.5 * vi - code),
                "code": 0.7 + 0.2 * np.exp(-3 * code)}

    points = []
    for pilot in pilots:
        points.append(Point(pilot.ratio, 0, {**BASE, "code": 0.9}, pilot.shares))
        points.append(Point(pilot.ratio, 32_768, world(pilot.shares), pilot.shares))
    plan = make_plan(recipe.plan, points, "vi")
    chosen = plan.chosen
    assert set(chosen.ratio) == {"vi", "code"} and chosen.predicted_at_tokens == 32_768
    assert all(chosen.max_rise[s] <= plan.allowed[s] + 1e-9 for s in ("en", "code"))
    # the optimum: code costs vi more than the vi its share allows (en's rise binds at 2.5·vi − code = ln 6)
    # (to the search grid's resolution: 0.01 of vi, 0.00625 of code)
    assert chosen.ratio["code"] < 0.02
    assert chosen.ratio["vi"] == pytest.approx(np.log(6) / 2.5, abs=0.011)
    write_plan(tmp_path, recipe, plan, points)
    planned = load_recipe(tmp_path / "recipe.yaml")
    left = 1 - chosen.ratio["vi"] - chosen.ratio["code"]
    assert planned.mixture.weights == pytest.approx({**chosen.ratio, "en": left}, abs=1e-6)


# ---- the pilots --------------------------------------------------------------------------------------------

def test_pilot_variants_keep_the_other_sources_relative_weights_and_evaluate_often_enough():
    recipe = demo("sources.code={paths: [x.jsonl]}", "mixture={vi: 0.5, en: 0.2, code: 0.1}",
                  "plan={pilot_tokens: 60000, validate: {ratio: 0.6, tokens: 120000}, warmup_steps: 2}")
    pilots = P.pilot_variants(recipe)
    assert [p.name for p in pilots] == ["r0.5", "r0.7", "r0.85", "r1", "validate-r0.6"]
    assert pilots[1].weights == pytest.approx({"vi": 0.7, "en": 0.2, "code": 0.1})  # en:code stays 2:1
    assert pilots[3].weights == {"vi": 1.0, "en": 0.0, "code": 0.0}
    fitted = P.pilot_recipe(recipe, pilots[0])
    steps = fitted.train.total_steps
    evaluations = steps // fitted.eval.every + (steps % fitted.eval.every > 0)
    assert steps == 15 and evaluations >= recipe.plan.eval_points
    assert fitted.plan is None and fitted.merge is None and fitted.train.ema is None
    validation = P.pilot_recipe(recipe, pilots[-1])
    assert validation.eval.every is None and validation.train.max_tokens == 120_000
    # warmup then constant: a prefix of the longer pilot's schedule is the shorter pilot's
    short = [lr_multiplier(s, steps, fitted.train.schedule) for s in range(steps)]
    long = [lr_multiplier(s, validation.train.total_steps, validation.train.schedule) for s in range(steps)]
    assert short == long == [0.5, 1.0] + [1.0] * (steps - 2)
    # each pilot reads the data in its own order, unless the plan shares the recipe's
    assert [P.pilot_recipe(recipe, p).train.seed for p in pilots] == [0, 1, 2, 3, 4]
    shared = demo("plan={seeds: shared}", "train.seed=7")
    assert {P.pilot_recipe(shared, p).train.seed for p in P.pilot_variants(shared)} == {7}


def test_read_points_keeps_the_trained_weights_evaluations(tmp_path):
    recipe = demo("plan={}")
    pilot = P.pilot_variants(recipe)[1]
    records = [{"step": 0, "tokens": 0, "eval": {"text": {"vi": {"bpb": 2.2}, "en": {"bpb": 1.0}}, "choice": {}}},
               {"step": 1, "tokens": 4096, "loss": 3.0, "lr": 3e-4},
               {"step": 1, "tokens": 4096, "eval": {"text": {"vi": {"bpb": 2.0}, "en": {"bpb": 1.01}}, "choice": {}}},
               {"step": 1, "tokens": 4096, "model": "ema",
                "eval": {"text": {"vi": {"bpb": 9.0}, "en": {"bpb": 9.0}}, "choice": {}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    points = P.read_points(tmp_path, pilot)
    assert points == [Point(0.7, 0, {"vi": 2.2, "en": 1.0}), Point(0.7, 4096, {"vi": 2.0, "en": 1.01})]
    with pytest.raises(PlanError, match="no evaluation records"):
        P.read_points(tmp_path / "missing", pilot)


def test_pilots_and_the_planned_recipe_replace_every_phase_schedule():
    recipe = demo("plan={pilot_tokens: 60000}",
                  "train.phases=[{train: embeddings, max_steps: 4, schedule: {name: cosine}}, {train: all}]")
    pilot = P.pilot_recipe(recipe, P.pilot_variants(recipe)[0])
    assert [p.schedule for p in pilot.train.phases] == [None, None]  # each phase follows the constant schedule
    assert pilot.train.schedule.name == "constant"


def test_run_plan_trains_every_pilot_reads_their_metrics_and_writes_the_plan(tmp_path):
    """The whole chain, with a trainer that writes what the real one would measure in the D-CPT world."""
    rng = np.random.default_rng(5)
    trained = []

    def train_pilot(pilot, run_dir):
        trained.append(run_dir.name)
        steps, every, share = pilot.train.total_steps, pilot.eval.every, pilot.mixture.weights["vi"]
        evaluated = [0, *(s for s in range(1, steps + 1) if every and s % every == 0)]
        evaluated += [] if evaluated[-1] == steps else [steps]
        run_dir.mkdir(parents=True)
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step in evaluated:
                tokens = step * pilot.train.batch_tokens
                bpb = BASE if step == 0 else {k: v + rng.normal(0, 5e-4) for k, v in dcpt_world(share, tokens).items()}
                f.write(json.dumps({"step": step, "tokens": tokens,
                                    "eval": {"text": {k: {"bpb": v} for k, v in bpb.items()}, "choice": {}}}) + "\n")

    recipe = demo("plan={validate: {ratio: 0.6, tokens: 80000}}")
    data = run_plan(recipe, tmp_path / "plan", train_pilot)
    assert trained == ["r0.5", "r0.7", "r0.85", "r1", "validate-r0.6"]
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["pilots", "plan.json", "recipe.yaml",
                                                                     "report.html"]
    assert [p["points"] for p in data["pilots"]] == [9] * 4  # the start model and 8 evaluations
    assert data["validation"]["tokens"] == 81_920 and abs(data["validation"]["error"]["en"]) < 0.01


def test_the_bundled_plan_recipe_plans_the_demo_within_its_time():
    """recipes/plan-vi.yaml: the demo's data and model, four fitted pilots of at least 8 evaluated steps and a
    validation pilot past them and between their shares; about 100k tokens and 38 evaluations of 100 FLORES
    sentences a language, what 2 quiet CPU cores (~200 tokens/s, a few seconds an evaluation) do in 30 minutes."""
    from conftest import REPO

    recipe = load_recipe(REPO / "recipes/plan-vi.yaml")
    demo_recipe = load_recipe(REPO / "recipes/demo-vi.yaml")
    assert (recipe.sources, recipe.base_model, recipe.curate) == (demo_recipe.sources, demo_recipe.base_model,
                                                                  demo_recipe.curate)
    pilots = P.pilot_variants(recipe)
    fitted = [p for p in pilots if not p.validation]
    (validation,) = [p for p in pilots if p.validation]
    assert [p.ratio for p in fitted] == [0.5, 0.7, 0.85, 1.0]
    assert validation.tokens > max(p.tokens for p in fitted) and 0.5 < validation.ratio < 1.0
    evaluations = 0
    for pilot in pilots:
        r = P.pilot_recipe(recipe, pilot)
        steps = r.train.total_steps
        evaluations += 1 + (steps // r.eval.every if r.eval.every else 1)
        assert r.eval.max_documents == 100 and r.eval.choice == {} and r.eval.dtype == "auto"
        assert pilot.validation or steps // r.eval.every >= 8
    tokens = sum(p.tokens for p in pilots)
    assert tokens / 200 + evaluations * 2 * 5 < 30 * 60
    assert recipe.plan.budget_tokens == demo_recipe.train.max_tokens
