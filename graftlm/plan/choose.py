"""The plan: from the pilots' measured points to the fitted law, the chosen mixture and the budget's predictions.

Everything here is a pure function of the points (graftlm/plan/laws.py's `Point`), so that a plan can be
recomputed, tested and compared without training anything.

The rule (CMR's and D-CPT's): the chosen target share is the largest one, between the smallest and the largest
pilot share, whose predicted rise of every source set's bits per byte over the start model stays within the
tolerance at every token count from the first evaluation up to the budget (searched on a grid of 0.001). Under
CMR this is the critical mixture ratio: each pilot's fitted curves give its predicted rise, and between two pilots
the prediction is the linear interpolation of theirs (laws.py), so the crossing of the tolerance is located
between the two pilots that bracket it. With
several varied shares (Data Mixing Laws) the chosen mixture is, among those within the tolerance at the pilots'
length, the one with the lowest predicted target bpb (searched on a grid over the pilots' range of each share).

`law: both` fits D-CPT and CMR and keeps the one with the lower leave-one-pilot-out error: each pilot that lies
between two others is left out in turn, the law refitted on the rest predicts its points, and the error is the
mean absolute difference in bpb over those points and every set. The validation pilot is kept out of this choice,
so that it stays an independent check of the law finally used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graftlm.plan.config import PlanConfig
from graftlm.plan.laws import (Law, PlanError, Point, base_bpb, eval_sets, fit_cmr, fit_dcpt, fit_mixing)

RATIO_STEP = 0.001
"""The resolution of the chosen target share."""
TOKEN_GRID = 64
"""Token counts (log-spaced from the first evaluation to the budget) at which the tolerance is checked."""
MIXTURE_GRID = 41
"""Values of each varied share tried between its smallest and largest pilot value (Data Mixing Laws)."""
MAX_RMSE_SHARE = 0.2
"""The default `plan.max_rmse_bpb`: this share of the tolerance. A fit this close decides the share within a fifth
of the tolerance. Each pilot reads the data in its own order (`plan.seeds`), so its batches' bumps are residuals
of the fit rather than a bend shared by every curve: about 0.002 bpb in English in the demo's pilots, which a
tenth of the tolerance (0.002) refused at R² 0.895, although that fit met the validation pilot within 0.8 %."""


@dataclass(frozen=True)
class Choice:
    ratio: float | dict[str, float]
    budget_tokens: int
    predicted_at_tokens: int
    """The token count of the predictions: the budget, or the pilots' length for Data Mixing Laws."""
    target_bpb: float
    source_bpb: dict[str, float]
    max_rise: dict[str, float]
    """Each source set's largest predicted rise over the start model up to `predicted_at_tokens`."""
    extrapolated: bool


@dataclass
class Plan:
    law: Law
    target: str
    sources: list[str]
    base: dict[str, float]
    allowed: dict[str, float]
    """The largest allowed rise of each set's bpb (the tolerance, in bpb)."""
    chosen: Choice
    budget_tokens: int
    laws: dict[str, Law] = field(default_factory=dict)
    """Every law fitted (two with `law: both`)."""
    held_out: dict | None = None
    validation: dict | None = None
    decision: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    """(share, each source set's largest predicted rise up to the budget) along the search grid."""
    pilots: list[dict] = field(default_factory=list)

    def predict(self, ratio, tokens) -> dict[str, np.ndarray]:
        return self.law.predict(ratio, tokens)

    def predictions(self, validation_ratio=None, validation_tokens: int | None = None) -> list[dict]:
        """The law's predictions at every pilot share, the chosen one and the validation pilot's, at the pilots'
        longest length, the validation pilot's and the budget (Data Mixing Laws: at the pilots' length)."""
        span = self.law.span
        if self.law.name == "mixing":
            mixtures = [*span.ratios, self.chosen.ratio] + ([validation_ratio] if validation_ratio else [])
            return [self._prediction(m, span.max_tokens) for m in _distinct(mixtures)]  # it knows one length
        ratios = sorted({*span.ratios, self.chosen.ratio, *([validation_ratio] if validation_ratio else [])})
        tokens = sorted({span.max_tokens, self.budget_tokens, *([validation_tokens] if validation_tokens else [])})
        return [self._prediction(r, t) for r in ratios for t in tokens]

    def _prediction(self, ratio, tokens: int) -> dict:
        values = {name: float(v[0]) for name, v in self.predict(ratio, [tokens]).items()}
        return {"ratio": ratio, "tokens": tokens, "target_bpb": values[self.target],
                "source_bpb": {s: values[s] for s in self.sources},
                "extrapolated": tokens > self.law.span.max_tokens, "outside_ratios": _outside(self.law, ratio)}

    def to_json(self) -> dict:
        """plan.json."""
        validation = self.validation
        out = {
            "law": self.law.name, "params": self.law.params(), "fit": _fit_json(self.law),
            "at_bounds": {name: {p: {"value": v, "bound": b} for p, (v, b) in bounds.items()}
                          for name, bounds in self.law.at_bounds().items()},
            "predictions": self.predictions(validation and validation["ratio"], validation and validation["tokens"]),
            "chosen": {"ratio": self.chosen.ratio, "budget_tokens": self.chosen.budget_tokens,
                       "predicted_target_bpb": self.chosen.target_bpb,
                       "predicted_source_bpb": self.chosen.source_bpb,
                       "predicted_at_tokens": self.chosen.predicted_at_tokens,
                       "max_source_rise": self.chosen.max_rise, "extrapolated": self.chosen.extrapolated},
            "validation": validation,
            "target": self.target, "sources": self.sources, "base_bpb": self.base, "allowed_rise": self.allowed,
            "pilots": self.pilots,
        }
        if len(self.laws) > 1:
            out["laws"] = {name: {"params": law.params(), "fit": _fit_json(law)} for name, law in self.laws.items()}
            out["held_out"] = self.held_out
        return _finite(out)


def make_plan(config: PlanConfig, points: list[Point], target: str,
              validation: list[Point] | None = None) -> Plan:
    """Fit the recipe's law to the pilots' points (the start model's included), check the fit, choose the
    mixture, and set the validation pilot's last point against its prediction."""
    sets = eval_sets(points)
    if target not in sets:
        raise PlanError(f"plan: the pilots measured no '{target}' set (the target language): eval.text needs one "
                        f"(they measured {', '.join(sets) or 'none'})")
    sources = [s for s in sets if s != target]
    if not sources:
        raise PlanError("plan: the pilots measured no source-language set: eval.text needs one (e.g. en: ...) to "
                        "hold its bits per byte within the tolerance")
    base = base_bpb(points)
    allowed = {s: config.tolerance.allowed(base[s]) for s in sets}
    max_rmse = {s: config.max_rmse_bpb or allowed[s] * MAX_RMSE_SHARE for s in sets}
    names = ["d-cpt", "cmr"] if config.law == "both" else [config.law]
    laws, refusals = {}, []
    for name in names:
        law = fit_law(name, points, target, config.restarts)
        problem = _poor_fit(law, config, max_rmse)
        if problem:
            refusals.append(problem)
        else:
            laws[name] = law
    if not laws:
        raise PlanError(refusals[0])
    held_out = None
    if config.law == "both":
        held_out = _leave_one_pilot_out(points, names, target, sets, config.restarts)
        held_out["refused"] = refusals
        law = min(laws.values(), key=lambda law: held_out["error"][law.name])
    else:
        law = laws[config.law]
    if law.name == "mixing":
        chosen, decision = _choose_mixture(law, target, sources, base, allowed, config), []
    else:
        chosen, decision = _choose_share(law, target, sources, base, allowed, config)
    plan = Plan(law, target, sources, base, allowed, chosen, config.budget_tokens, laws, held_out,
                decision=decision, pilots=_pilots(points))
    if validation:
        plan.validation = _validate(plan, validation)
    return plan


def fit_law(name: str, points: list[Point], target: str, restarts: int, left_out: bool = False) -> Law:
    """Fit law `name`; `left_out`: a refit without one pilot, whose fewer shares are no reason to refuse."""
    if name == "d-cpt":
        return fit_dcpt(points, target, restarts, min_ratios=2 if left_out else 3)
    if name == "cmr":
        return fit_cmr(points, target, restarts)
    return fit_mixing(points, restarts)


def _poor_fit(law: Law, config: PlanConfig, max_rmse: dict[str, float]) -> str | None:
    for name, q in law.quality.items():
        if q.r2 < config.min_r2 and q.rmse > max_rmse[name]:
            return (f"plan: the {law.name} fit of {name}'s bits per byte is poor (R² {q.r2:.3f} < plan.min_r2 "
                    f"{config.min_r2:g}, RMS error {q.rmse:.4f} > {max_rmse[name]:.4f} bpb): the pilots' curves do "
                    f"not follow the law; try another plan.law, more pilots or longer plan.pilot_tokens")
    return None


def _leave_one_pilot_out(points: list[Point], names: list[str], target: str, sets: list[str], restarts: int) -> dict:
    ratios = sorted({p.ratio for p in points if p.tokens > 0})
    inner = ratios[1:-1]
    if not inner:
        raise PlanError("plan: law both compares the laws on pilots left out between two others: give at least 3 "
                        "plan.ratios")
    errors = {}
    for name in names:
        diffs = []
        for ratio in inner:
            kept = [p for p in points if p.ratio != ratio]
            held = [p for p in points if p.ratio == ratio and p.tokens > 0]
            try:
                law = fit_law(name, kept, target, restarts, left_out=True)
            except PlanError:
                diffs = [math.inf]
                break
            for p in held:
                predicted = law.predict(ratio, [p.tokens])
                diffs += [abs(float(predicted[s][0]) - p.bpb[s]) for s in sets]
        errors[name] = float(np.mean(diffs))
    return {"method": "leave-one-pilot-out", "left_out": inner, "error": errors,
            "measure": "mean absolute error in bits per byte over the left-out pilots' points and every set"}


def _choose_share(law: Law, target: str, sources: list[str], base: dict[str, float], allowed: dict[str, float],
                  config: PlanConfig) -> tuple[Choice, list]:
    low, high = min(law.span.ratios), max(law.span.ratios)
    grid = np.round(np.linspace(low, high, int(round((high - low) / RATIO_STEP)) + 1), 6)
    budget = config.budget_tokens
    tokens = np.geomspace(min(law.span.min_tokens, budget), budget, TOKEN_GRID)
    decision = []
    for ratio in grid:
        predicted = law.predict(float(ratio), tokens)
        decision.append((float(ratio), {s: float(np.max(predicted[s] - base[s])) for s in sources}))
    feasible = [(r, rises) for r, rises in decision if all(rises[s] <= allowed[s] for s in sources)]
    if not feasible:
        least = min(decision, key=lambda d: max(d[1][s] - allowed[s] for s in sources))
        worst = max(sources, key=lambda s: least[1][s] - allowed[s])
        raise PlanError(f"plan: no target share in [{low:g}, {high:g}] keeps {worst}'s bits per byte within "
                        f"+{allowed[worst]:.4f} of the start model up to {budget:,} tokens (the least rise, "
                        f"{least[1][worst]:+.4f}, is at share {least[0]:g}): add pilots at lower plan.ratios, "
                        f"raise plan.tolerance or lower plan.budget_tokens")
    ratio, rises = feasible[-1]
    at_budget = {name: float(v[0]) for name, v in law.predict(ratio, [budget]).items()}
    return Choice(ratio, budget, budget, at_budget[target], {s: at_budget[s] for s in sources}, rises,
                  budget > law.span.max_tokens), decision


def _choose_mixture(law, target: str, sources: list[str], base: dict[str, float], allowed: dict[str, float],
                    config: PlanConfig) -> Choice:
    pilots = np.array([law.vector(ratio) for ratio in law.span.ratios])
    axes = [np.linspace(pilots[:, j].min(), pilots[:, j].max(), MIXTURE_GRID) for j in range(pilots.shape[1])]
    grid = np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T
    grid = grid[grid.sum(axis=1) <= 1 + 1e-9]
    predicted = {name: curve(grid) for name, curve in law.curves.items()}
    feasible = np.all([predicted[s] - base[s] <= allowed[s] for s in sources], axis=0)
    if not feasible.any():
        raise PlanError("plan: no mixture within the pilots' shares keeps every source set's bits per byte within "
                        "the tolerance at the pilots' length: widen plan.ratios or raise plan.tolerance")
    best = int(np.flatnonzero(feasible)[np.argmin(predicted[target][feasible])])
    values = [round(float(v), 6) for v in grid[best]]
    ratio = dict(zip(law.vary, values)) if law.vary else values[0]
    return Choice(ratio, config.budget_tokens, law.span.max_tokens, float(predicted[target][best]),
                  {s: float(predicted[s][best]) for s in sources},
                  {s: float(predicted[s][best] - base[s]) for s in sources}, False)


def _validate(plan: Plan, points: list[Point]) -> dict:
    """The validation pilot's last point against the law's prediction there; `error` is relative."""
    last = max((p for p in points if p.tokens > 0), key=lambda p: p.tokens, default=None)
    if last is None:
        raise PlanError("plan: the validation pilot has no evaluation after training")
    ratio = dict(last.shares) if last.shares else last.ratio
    predicted = {name: float(v[0]) for name, v in plan.predict(ratio, [last.tokens]).items()}
    sets = [plan.target, *plan.sources]
    return {"ratio": ratio, "tokens": last.tokens,
            "predicted": {s: predicted[s] for s in sets}, "measured": {s: last.bpb[s] for s in sets},
            "error": {s: (predicted[s] - last.bpb[s]) / last.bpb[s] for s in sets},
            "extrapolated": last.tokens > plan.law.span.max_tokens, "outside_ratios": _outside(plan.law, ratio)}


def _outside(law: Law, ratio) -> bool:
    """Whether a share (or a mixture) lies outside the pilots' range of each share."""
    vector = law.vector(ratio) if law.name == "mixing" else [ratio]
    pilots = np.array([law.vector(r) if law.name == "mixing" else [r] for r in law.span.ratios])
    return bool(np.any(vector < pilots.min(axis=0)) or np.any(vector > pilots.max(axis=0)))


def _pilots(points: list[Point]) -> list[dict]:
    by_ratio: dict = {}
    for p in points:
        key = tuple(sorted(p.shares.items())) or p.ratio
        by_ratio.setdefault(key, []).append(p)
    return [{"ratio": dict(key) if isinstance(key, tuple) else key, "points": len(pts),
             "max_tokens": max(p.tokens for p in pts)} for key, pts in by_ratio.items()]


def _fit_json(law: Law) -> dict:
    quality = law.quality
    return {key: {name: getattr(q, key) for name, q in quality.items()} for key in ("r2", "huber", "rmse", "points")}


def _distinct(items: list) -> list:
    seen, out = set(), []
    for item in items:
        key = tuple(sorted(item.items())) if isinstance(item, dict) else item
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _finite(obj):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
