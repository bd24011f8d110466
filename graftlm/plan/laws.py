"""Scaling laws of continued pre-training, fitted to the bits per byte the pilots measured.

A pilot is a short run at one target share r (the target language's fraction of the mixture); every
evaluation along it is a `Point`: (r, tokens trained, bpb per `eval.text` set). The start model is the point at
0 tokens, the same in every pilot. Three laws:

D-CPT Law (Que et al. 2024), the model size fixed: one surface per evaluation set, over every pilot's points,
    L(D, x) = E + B·x^η / D^β + C / (x + ε)^γ          D: tokens trained
  For the target language's set x is the target share r. For a source language's set x is the replay share
  1 − r: D-CPT fits the general-corpus loss with r replaced by the general corpus's share, so that in both fits
  a larger x means more data of that set's language. The replay share is 0 in a pilot without replay (r = 1),
  where x^η is 0 or infinite and the law could not follow the source set's bpb along D (forgetting is fastest
  there), so the source fit also shifts the data term by the same ε: B·(1 − r + ε)^η / D^β. B and C are free in
  sign: a target set's B comes out positive (its bpb falls with D), a source set's negative when it forgets.

CMR (Gu et al. 2024): one curve per pilot and set, of the change from the start model over tokens T,
    target set:  ΔL_t(T) = α₁·T^s₁ + β₁
    source set:  ΔL_s(T) = α₂·T^s₂ + α₃·T^s₃ + β₂      (it can rise, then fall back)
  Between pilots a prediction is interpolated linearly in r between the two neighbouring pilots' curves (and
  extrapolated linearly from the two nearest outside them, flagged as such).

Data Mixing Laws (Ye et al. 2024), when several shares r_j vary: at the pilots' length (their last points),
    L_i(r) = c_i + k_i·exp(Σ_j t_ij·r_j)
  It predicts a mixture's bpb at the pilots' length only: it knows nothing of how the curves continue.

How every fit is made (`fit_curve`). Each law is linear in some coefficients (E, B, C; α, β; c, k) once its
exponents are fixed (η, β, γ, ε; s; t). So:
  1. a fixed grid of exponents (each form's `grid`, its product) is scored with the linear coefficients solved
     by ordinary least squares: a good start whatever the signs;
  2. restarts: the `restarts` best grid points, each refined by plain least squares over the exponents, the
     linear coefficients solved exactly at every step (variable projection: a problem of 1 to 4 unknowns;
     scipy.optimize.least_squares, method "trf", bounds on the exponents);
  3. the Huber scale: f_scale = 1.345·σ̂, the classic tuning constant (95% of least squares' efficiency under
     Gaussian noise, while a spike — a loss spike, the first evaluation after warmup — weighs linearly, not
     quadratically), where σ̂ = 1.4826·median|residual| of the best plain refinement; floored at 1e-4 bpb (below
     what an evaluation of a few thousand bytes resolves), so that a near-perfect fit does not treat every point
     as an outlier;
  4. each plain refinement with a residual past f_scale is refined again over all parameters with loss="huber"
     and that f_scale (a Huber fit started far away, where every residual is past f_scale, stalls: hence the
     plain step first; where no residual is past it, the Huber loss is the squared loss and the plain optimum
     is already the Huber one); the lowest Huber cost wins.
The grid is fixed (no random numbers), so the same pilots always give the same fit. Token counts are divided by
the largest fitted one inside the fit (conditioning); `params()` reports the coefficients for tokens as counted.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.optimize import least_squares

from graftlm.errors import GraftError

HUBER_K = 1.345
"""f_scale = HUBER_K · σ̂ (Huber's tuning constant for 95% Gaussian efficiency)."""
MIN_F_SCALE = 1e-4
"""The smallest Huber scale, in bits per byte."""
BOUND_SLACK = 1e-3
"""An exponent within this share of its range from a bound is on the bound."""
MAX_HUBER_STEPS = 100
"""Function evaluations of a Huber refinement (it starts at a least-squares optimum: near, unless a flat valley of
nearly interchangeable parameters lets it crawl)."""


class PlanError(GraftError):
    """The plan cannot be made: too few pilots or points, a poor fit, no share within the tolerance."""


@dataclass(frozen=True)
class Point:
    """One evaluation of a pilot."""

    ratio: float
    """The target language's share of the pilot's mixture."""
    tokens: int
    """Tokens trained when it was measured (0: the start model)."""
    bpb: dict[str, float]
    """Bits per byte per `eval.text` set."""
    shares: dict[str, float] = field(default_factory=dict)
    """The varied sources' shares, when several vary (`plan.vary`; `ratio` is then the target language's share,
    for information); empty otherwise (`ratio` is the varied share)."""


@dataclass(frozen=True)
class Quality:
    r2: float
    huber: float
    """The mean Huber loss per point, scipy's convention: ½·f²·ρ((residual/f)²), in bpb² (f: the Huber scale)."""
    rmse: float
    points: int

    def to_json(self) -> dict:
        return {"r2": self.r2, "huber": self.huber, "rmse": self.rmse, "points": self.points}


def quality_of(y: np.ndarray, fitted: np.ndarray, huber_cost: float) -> Quality:
    residual = fitted - y
    total = float(np.sum((y - y.mean()) ** 2))
    unexplained = float(residual @ residual)
    r2 = 1.0 - unexplained / total if total > 0 else (1.0 if unexplained == 0 else 0.0)
    return Quality(r2, huber_cost / len(y), math.sqrt(unexplained / len(y)), len(y))


# ---- robust separable least squares ---------------------------------------------------------------------

@dataclass(frozen=True)
class Form:
    """A law as `y ≈ basis(x, θ) @ c`: linear coefficients c, exponents θ within bounds."""

    linear: tuple[str, ...]
    exponents: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...]
    grid: tuple[tuple[float, ...], ...]
    """Starting values of each exponent; the grid is their product."""
    basis: Callable[[np.ndarray, np.ndarray], np.ndarray]

    @property
    def parameters(self) -> int:
        return len(self.linear) + len(self.exponents)


@dataclass(frozen=True)
class Curve:
    """A fitted form: its coefficients, exponents, fit quality, and the data it was fitted on."""

    form: Form
    coef: np.ndarray
    theta: np.ndarray
    quality: Quality
    y: np.ndarray
    fitted: np.ndarray
    cost: float
    f_scale: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.form.basis(x, self.theta) @ self.coef

    def values(self) -> dict[str, float]:
        return {**dict(zip(self.form.linear, map(float, self.coef))),
                **dict(zip(self.form.exponents, map(float, self.theta)))}

    def at_bounds(self) -> dict[str, tuple[float, float]]:
        """The exponents that ended on a bound of theirs ({name: (value, bound)}): there the law's form is not
        what the data decided. A D-CPT β at 0, say, makes B/D^β ≈ B − B·β·ln D: the curve is a straight line in
        log tokens, its floor E is not identified, and it keeps falling past the pilots."""
        out = {}
        for name, value, (low, high) in zip(self.form.exponents, self.theta, self.form.bounds):
            for bound in (low, high):
                if abs(value - bound) <= BOUND_SLACK * (high - low):
                    out[name] = (float(value), bound)
        return out


def fit_curve(form: Form, x: np.ndarray, y: np.ndarray, restarts: int, what: str) -> Curve:
    """Fit `form` to (x, y) robustly (see the module's docstring); `what` names the fit in errors."""
    n = len(y)
    if n <= form.parameters:
        raise PlanError(f"plan: {what}: {n} points for {form.parameters} parameters; give more pilots or more "
                        f"evaluations along each (plan.eval_points)")
    k = len(form.linear)

    def residuals(params: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            r = form.basis(x, params[k:]) @ params[:k] - y
        return np.nan_to_num(r, nan=1e3, posinf=1e3, neginf=-1e3)

    lower = np.array([-np.inf] * k + [lo for lo, _ in form.bounds])
    upper = np.array([np.inf] * k + [hi for _, hi in form.bounds])

    def jacobian(params: np.ndarray) -> np.ndarray:
        """Exact in the linear coefficients (the basis itself), forward differences in the exponents."""
        coef, theta = params[:k], params[k:]
        with np.errstate(all="ignore"):
            design = form.basis(x, theta)
            columns = [design]
            for j in range(len(theta)):
                step = 1e-7 * max(1.0, abs(theta[j]))
                step = step if theta[j] + step <= upper[k + j] else -step
                moved = theta.copy()
                moved[j] += step
                columns.append(((form.basis(x, moved) - design) @ coef / step)[:, None])
        return np.nan_to_num(np.hstack(columns), nan=0.0, posinf=0.0, neginf=0.0)

    scored = []
    for theta in itertools.product(*form.grid):
        with np.errstate(all="ignore"):
            design = form.basis(x, np.array(theta))
        if not np.all(np.isfinite(design)):
            continue
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        r = design @ coef - y
        scored.append((float(r @ r), np.concatenate([coef, theta])))
    if not scored:
        raise PlanError(f"plan: {what}: no starting point of the grid gives finite values")
    scored.sort(key=lambda s: s[0])
    def solved(theta: np.ndarray) -> np.ndarray:
        """The linear coefficients that fit best at these exponents (ordinary least squares)."""
        with np.errstate(all="ignore"):
            design = np.nan_to_num(form.basis(x, theta), nan=0.0, posinf=1e300, neginf=-1e300)
        return np.linalg.lstsq(design, y, rcond=None)[0]

    # plain least squares over the exponents alone, the coefficients solved at each (variable projection)
    plain = []
    for _, start in scored[:restarts]:
        result = least_squares(lambda theta: residuals(np.concatenate([solved(theta), theta])), start[k:],
                               bounds=(lower[k:], upper[k:]), method="trf")
        if not any(np.allclose(result.x, p[k:], atol=1e-4) for p in plain):  # restarts that met count once
            plain.append(np.concatenate([solved(result.x), result.x]))
    sigma = 1.4826 * float(np.median(np.abs(min((residuals(p) for p in plain), key=lambda r: r @ r))))
    f_scale = max(HUBER_K * sigma, MIN_F_SCALE)
    best, best_cost = None, math.inf
    for start in plain:
        r = residuals(start)
        if np.max(np.abs(r)) <= f_scale:  # no residual past f_scale: the Huber loss is the squared one here
            params, cost = start, 0.5 * float(r @ r)
        else:
            result = least_squares(residuals, start, jac=jacobian, bounds=(lower, upper), method="trf",
                                   loss="huber", f_scale=f_scale, max_nfev=MAX_HUBER_STEPS)
            params, cost = result.x, float(result.cost)
        if cost < best_cost:
            best, best_cost = params, cost
    coef, theta = best[:k], best[k:]
    fitted = form.basis(x, theta) @ coef
    return Curve(form, coef, theta, quality_of(y, fitted, best_cost), y, fitted, best_cost, f_scale)


def pooled_quality(curves: list[Curve]) -> Quality:
    """The fit quality of several curves of one set taken together (CMR: one curve per pilot)."""
    y = np.concatenate([c.y for c in curves])
    fitted = np.concatenate([c.fitted for c in curves])
    return quality_of(y, fitted, sum(c.cost for c in curves))


# ---- the forms ------------------------------------------------------------------------------------------

def _dcpt_basis(shifted: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def basis(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        u, share = x[:, 0], x[:, 1]
        eta, beta, gamma, eps = theta
        data_share = share + eps if shifted else share
        return np.column_stack([np.ones_like(u), data_share ** eta / u ** beta, (share + eps) ** -gamma])
    return basis


def dcpt_form(shifted: bool) -> Form:
    """D-CPT: E + B·x^η/D^β + C/(x + ε)^γ; `shifted`: the data term reads (x + ε)^η (a source set's fit)."""
    return Form(linear=("E", "B", "C"), exponents=("eta", "beta", "gamma", "epsilon"),
                bounds=((-3.0, 3.0), (0.0, 3.0), (0.0, 4.0), (1e-3, 2.0)),
                grid=((-1.0, -0.5, 0.0, 0.5, 1.0), (0.1, 0.3, 0.6, 1.0), (0.1, 0.5, 1.0, 2.0), (0.01, 0.1, 0.5)),
                basis=_dcpt_basis(shifted))


MIN_EXPONENT_GAP = 0.2
EXPONENT_STARTS = (-1.5, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5)
"""CMR's starting exponents: rising (s > 0) and saturating (s < 0) power laws of the tokens."""

CMR_TARGET = Form(linear=("beta1", "alpha1"), exponents=("s1",), bounds=((-3.0, 3.0),), grid=(EXPONENT_STARTS,),
                  basis=lambda u, th: np.column_stack([np.ones_like(u), u ** th[0]]))
CMR_SOURCE = Form(linear=("beta2", "alpha2", "alpha3"), exponents=("s2", "s3_minus_s2"),
                  bounds=((-3.0, 3.0), (MIN_EXPONENT_GAP, 4.0)), grid=(EXPONENT_STARTS, (0.25, 0.5, 1.0, 2.0)),
                  basis=lambda u, th: np.column_stack([np.ones_like(u), u ** th[0], u ** (th[0] + th[1])]))
"""The source curve's exponents are s₂ and s₃ = s₂ + d with d ≥ MIN_EXPONENT_GAP: two terms with nearly equal
exponents cancel each other with huge coefficients, fit the noise and extrapolate wildly."""


def mixing_form(shares: int) -> Form:
    """Data Mixing Laws: c + k·exp(Σ_j t_j·r_j) over `shares` varied shares."""
    return Form(linear=("c", "k"), exponents=tuple(f"t{j}" for j in range(shares)), bounds=((-30.0, 30.0),) * shares,
                grid=((-8.0, -4.0, -2.0, -1.0, 1.0, 2.0, 4.0, 8.0),) * shares,
                basis=lambda r, th: np.column_stack([np.ones(len(r)), np.exp(r @ th)]))


# ---- the pilots' points ---------------------------------------------------------------------------------

def eval_sets(points: list[Point]) -> list[str]:
    """The evaluation sets every point measured."""
    sets = set(points[0].bpb) if points else set()
    for p in points:
        sets &= set(p.bpb)
    return sorted(sets)


def base_bpb(points: list[Point]) -> dict[str, float]:
    """The start model's bits per byte per set (the points at 0 tokens; every pilot starts from it)."""
    start = [p for p in points if p.tokens == 0]
    if not start:
        raise PlanError("plan: no pilot has an evaluation of the start model (0 tokens): the rise over it, which "
                        "the tolerance bounds, cannot be measured")
    return {s: float(np.mean([p.bpb[s] for p in start])) for s in eval_sets(start)}


def _trained(points: list[Point]) -> list[Point]:
    return [p for p in points if p.tokens > 0]


def _ratios(points: list[Point]) -> list[float]:
    return sorted({p.ratio for p in points})


@dataclass(frozen=True)
class Span:
    """What a law was fitted on: predictions past it are extrapolations."""

    ratios: list
    min_tokens: int
    max_tokens: int


def _span(points: list[Point]) -> Span:
    trained = _trained(points)
    return Span(_ratios(trained), min(p.tokens for p in trained), max(p.tokens for p in trained))


# ---- the laws -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DcptLaw:
    name = "d-cpt"
    curves: dict[str, Curve]
    target: str
    scale: float
    """Token counts are divided by this inside the fit (the largest fitted one)."""
    span: Span

    def predict(self, ratio: float, tokens) -> dict[str, np.ndarray]:
        u = np.atleast_1d(np.asarray(tokens, dtype=float)) / self.scale
        out = {}
        for name, curve in self.curves.items():
            share = ratio if name == self.target else 1.0 - ratio
            out[name] = curve(np.column_stack([u, np.full_like(u, share)]))
        return out

    @property
    def quality(self) -> dict[str, Quality]:
        return {name: c.quality for name, c in self.curves.items()}

    def at_bounds(self) -> dict[str, dict[str, tuple[float, float]]]:
        return {name: bounds for name, c in self.curves.items() if (bounds := c.at_bounds())}

    def params(self) -> dict:
        out = {}
        for name, curve in self.curves.items():
            v = curve.values()
            v["B"] *= self.scale ** v["beta"]  # B/(D/S)^β = (B·S^β)/D^β
            out[name] = {**v, "x": "r" if name == self.target else "1 - r"}
        return out


@dataclass(frozen=True)
class CmrLaw:
    name = "cmr"
    curves: dict[str, dict[float, Curve]]
    """set -> pilot share -> the curve of the change from the start model."""
    base: dict[str, float]
    target: str
    scale: float
    span: Span

    def predict(self, ratio: float, tokens) -> dict[str, np.ndarray]:
        u = np.atleast_1d(np.asarray(tokens, dtype=float)) / self.scale
        ratios = self.span.ratios
        i = int(np.clip(np.searchsorted(ratios, ratio), 1, len(ratios) - 1))
        low, high = ratios[i - 1], ratios[i]
        w = (ratio - low) / (high - low)
        return {name: self.base[name] + (1 - w) * by_ratio[low](u) + w * by_ratio[high](u)
                for name, by_ratio in self.curves.items()}

    @property
    def quality(self) -> dict[str, Quality]:
        return {name: pooled_quality(list(by_ratio.values())) for name, by_ratio in self.curves.items()}

    def at_bounds(self) -> dict[str, dict[str, tuple[float, float]]]:
        return {f"{name} at share {ratio:g}": bounds for name, by_ratio in self.curves.items()
                for ratio, c in by_ratio.items() if (bounds := c.at_bounds())}

    def params(self) -> dict:
        out = {}
        for name, by_ratio in self.curves.items():
            out[name] = {}
            for ratio, curve in by_ratio.items():
                v = curve.values()
                if "s3_minus_s2" in v:
                    v["s3"] = v["s2"] + v.pop("s3_minus_s2")
                for alpha, s in (("alpha1", "s1"), ("alpha2", "s2"), ("alpha3", "s3")):
                    if alpha in v:
                        v[alpha] *= self.scale ** -v[s]  # α·(T/S)^s = (α·S^-s)·T^s
                out[name][f"{ratio:g}"] = v
        return out


@dataclass(frozen=True)
class MixingLaw:
    name = "mixing"
    curves: dict[str, Curve]
    vary: list[str]
    """The varied shares' names; empty: one share, the points' `ratio`."""
    span: Span

    def vector(self, ratio: float | dict[str, float]) -> list[float]:
        return [ratio[v] for v in self.vary] if self.vary else [ratio]

    def predict(self, ratio: float | dict[str, float], tokens) -> dict[str, np.ndarray]:
        """The bpb at the pilots' length, whatever `tokens` (broadcast to its shape)."""
        n = len(np.atleast_1d(tokens))
        r = np.array([self.vector(ratio)])
        return {name: np.repeat(curve(r), n) for name, curve in self.curves.items()}

    @property
    def quality(self) -> dict[str, Quality]:
        return {name: c.quality for name, c in self.curves.items()}

    def at_bounds(self) -> dict[str, dict[str, tuple[float, float]]]:
        return {name: bounds for name, c in self.curves.items() if (bounds := c.at_bounds())}

    def params(self) -> dict:
        out = {}
        for name, curve in self.curves.items():
            v = curve.values()
            out[name] = {"c": v["c"], "k": v["k"],
                         "t": {s: v[f"t{j}"] for j, s in enumerate(self.vary or ["ratio"])}}
        return out


Law = DcptLaw | CmrLaw | MixingLaw


def fit_dcpt(points: list[Point], target: str, restarts: int = 8, min_ratios: int = 3) -> DcptLaw:
    """One D-CPT surface per set over every trained point of every pilot."""
    trained = _trained(points)
    ratios = _ratios(trained)
    if len(ratios) < min_ratios:
        raise PlanError(f"plan: the D-CPT law needs pilots at {min_ratios} or more target shares, got "
                        f"{len(ratios)} ({', '.join(f'{r:g}' for r in ratios)}): add plan.ratios")
    scale = float(max(p.tokens for p in trained))
    u = np.array([p.tokens for p in trained], dtype=float) / scale
    r = np.array([p.ratio for p in trained])
    curves = {}
    for name in eval_sets(trained):
        is_target = name == target
        x = np.column_stack([u, r if is_target else 1.0 - r])
        y = np.array([p.bpb[name] for p in trained])
        curves[name] = fit_curve(dcpt_form(shifted=not is_target), x, y, restarts, f"D-CPT fit of {name}")
    return DcptLaw(curves, target, scale, _span(points))


def fit_cmr(points: list[Point], target: str, restarts: int = 8) -> CmrLaw:
    """Per pilot and set, the CMR curve of the change from the start model."""
    base = base_bpb(points)
    trained = _trained(points)
    ratios = _ratios(trained)
    if len(ratios) < 2:
        raise PlanError(f"plan: the CMR law interpolates between pilots and needs 2 or more target shares, got "
                        f"{len(ratios)}: add plan.ratios")
    scale = float(max(p.tokens for p in trained))
    curves: dict[str, dict[float, Curve]] = {}
    for name in eval_sets(trained):
        form = CMR_TARGET if name == target else CMR_SOURCE
        curves[name] = {}
        for ratio in ratios:
            pilot = [p for p in trained if p.ratio == ratio]
            u = np.array([p.tokens for p in pilot], dtype=float) / scale
            y = np.array([p.bpb[name] - base[name] for p in pilot])
            curves[name][ratio] = fit_curve(form, u, y, restarts, f"CMR fit of {name} at share {ratio:g}")
    return CmrLaw(curves, base, target, scale, _span(points))


def fit_mixing(points: list[Point], restarts: int = 8) -> MixingLaw:
    """Per set, the Data Mixing Law over each pilot's last point (the pilots' length). The shares are the points'
    `shares` when several vary, else their `ratio`."""
    vary = list(points[0].shares) if points and points[0].shares else []
    last: dict[tuple, Point] = {}
    for p in _trained(points):
        key = tuple(p.shares[v] for v in vary) if vary else (p.ratio,)
        if key not in last or p.tokens > last[key].tokens:
            last[key] = p
    finals = list(last.values())
    ratios = [dict(p.shares) if vary else p.ratio for p in finals]
    law = MixingLaw({}, vary, Span(ratios, min(p.tokens for p in finals), max(p.tokens for p in finals)))
    r = np.array([law.vector(ratio) for ratio in ratios])
    for name in eval_sets(finals):
        law.curves[name] = fit_curve(mixing_form(r.shape[1]), r, np.array([p.bpb[name] for p in finals]), restarts,
                                     f"Data Mixing Law fit of {name}")
    return law
