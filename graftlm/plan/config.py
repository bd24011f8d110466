"""The `plan:` recipe section: which pilot runs to train, which law to fit to their curves, and the rule that
chooses the mixture for the full run.

Fields are declared in the order they are validated: a later field's check reads the earlier ones (`ratios`
reads `vary` and `law`; `validate` reads all three and `pilot_tokens`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from graftlm.config import Section

Law = Literal["d-cpt", "cmr", "both", "mixing"]

LAW_PARAMETERS = {"d-cpt": 7, "cmr": 5, "mixing": 2}
"""Parameters of one set's fit: D-CPT's E, B, η, β, C, γ, ε over every pilot; CMR's source curve α₂, s₂, α₃, s₃,
β₂ per pilot; Data Mixing Laws' c and k plus one t per varied share, over the pilots' last points."""

MIN_RATIOS = {"d-cpt": (3, "its share terms (η, γ, ε) cannot be told apart on fewer"),
              "cmr": (2, "it interpolates between neighbouring pilots"),
              "both": (3, "it compares the laws on left-out pilots that lie between two others")}
"""Distinct pilot shares each law needs, and why."""


class Tolerance(Section):
    """How far each source language's bits per byte may rise over the start model: `{bpb: 0.02}` (absolute) or
    `{relative: 0.01}` (a fraction of the start model's bpb on that set)."""

    bpb: float | None = Field(default=None, gt=0)
    relative: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self) -> "Tolerance":
        if (self.bpb is None) == (self.relative is None):
            raise ValueError("give exactly one of bpb (e.g. {bpb: 0.02}) or relative (e.g. {relative: 0.01})")
        return self

    def allowed(self, base_bpb: float) -> float:
        """The largest allowed rise, in bits per byte, on a set whose start model scores `base_bpb`."""
        return self.bpb if self.bpb is not None else self.relative * base_bpb


class ValidationPilot(Section):
    """One more pilot, left out of the fit, whose measured bits per byte are set against the law's prediction."""

    ratio: float | dict[str, float]
    """Its target share (or, with several `plan.vary` sources, its mapping of shares)."""
    tokens: int | None = Field(default=None, ge=1)
    """Its length in tokens (default: `plan.pilot_tokens`); longer than the pilots tests the extrapolation."""

    @field_validator("ratio")
    @classmethod
    def _a_share(cls, ratio: float | dict[str, float]) -> float | dict[str, float]:
        _check_value(ratio)
        return ratio


class PlanConfig(Section):
    """`graft plan`: short pilot runs of the recipe at several target shares, a law fitted to their bits-per-byte
    curves, and from it the mixture and token budget of the full run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    vary: list[str] = []
    """The sources whose shares the pilots set. Empty: one share, the target language's (split among its sources by
    their relative weights). The other sources share what is left by their relative weights. Several sources
    (`[vi, code]`) need `law: mixing` and each of `ratios` a mapping of shares (`{vi: 0.6, code: 0.1}`)."""
    law: Law = Field(default="d-cpt", validate_default=True)
    """`d-cpt`: one surface L(D, r) per evaluation set over every pilot (Que et al. 2024); `cmr`: one curve per
    pilot and set, interpolated between pilots (Gu et al. 2024); `both`: fit both, keep the one with the lower
    leave-one-pilot-out error; `mixing`: Data Mixing Laws (Ye et al. 2024) at the pilots' budget, for several
    varied shares."""
    ratios: list[float | dict[str, float]] = Field(default=[0.5, 0.7, 0.85, 1.0], validate_default=True)
    """The pilots' target shares, each in (0, 1]."""
    pilot_tokens: int = Field(default=30_000, ge=1)
    """Each pilot's length in tokens (rounded up to whole optimizer steps)."""
    budget_tokens: int = Field(default=2_000_000, ge=1)
    """The length of the full run being planned, in tokens."""
    tolerance: Tolerance = Tolerance(bpb=0.02)
    """The largest allowed rise of each source language's bpb over the start model, at any point up to the budget:
    the chosen share is the largest one predicted to stay within it (the rule of CMR and D-CPT)."""
    validation: ValidationPilot | None = Field(default=None, alias="validate")
    """`validate: {ratio: 0.6, tokens: 80000}`: one more pilot, not fitted, measured against the prediction;
    absent (null): none."""
    apply: bool = False
    """After planning, train the planned recipe (true), or stop and print the command that trains it (false)."""
    eval_points: int = Field(default=8, ge=8)
    """Evaluations along each pilot (besides the start model): the pilots evaluate every
    `steps // eval_points` optimizer steps."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """The pilots' linear warmup before the constant learning rate; the same in every pilot, so that a prefix of a
    longer pilot is what a shorter one gives. Default: `train.schedule`'s warmup over a pilot's steps."""
    fit_after_tokens: int | None = Field(default=None, ge=0)
    """Only the points measured after more than this many tokens are fitted (the start model's still gives the
    base bpb). Default: the pilots' warmup, while the learning rate still rises: the laws describe training at a
    constant rate, and the first steps of continued pre-training (an instruct model meeting plain text, the
    stability gap) jump and bounce in ways no power law of the tokens follows."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Steps between a pilot's checkpoints, from which an interrupted pilot resumes. Default: a quarter of a fitted
    pilot's steps."""
    seeds: Literal["per_pilot", "shared"] = "per_pilot"
    """`per_pilot`: pilot i trains with `train.seed + i`, so each reads the data in its own order and the bump a
    batch makes lands at another step in each, where the fit averages it out; `shared`: every pilot reads the
    recipe's order, and a bump that bends every curve at the same step bends the fitted law with them."""
    lr: float | None = Field(default=None, gt=0)
    """The pilots' constant learning rate, and the planned run's peak. Default: `train.lr`."""
    restarts: int = Field(default=8, ge=1)
    """Starts of each robust fit: the best this many points of a fixed grid of exponents."""
    min_r2: float = Field(default=0.9, gt=0, le=1)
    """A fit whose R² is below this, with errors above `max_rmse_bpb`, is refused: the plan is not made."""
    max_rmse_bpb: float | None = Field(default=None, gt=0)
    """The root-mean-square error, in bits per byte, below which a fit is accepted whatever its R² (a nearly flat
    curve has a low R² and still decides nothing wrongly). Default: a fifth of the tolerance."""

    @field_validator("vary")
    @classmethod
    def _distinct_sources(cls, vary: list[str]) -> list[str]:
        if len(set(vary)) != len(vary):
            raise ValueError(f"a source is named twice ({', '.join(vary)})")
        return vary

    @field_validator("law")
    @classmethod
    def _law_fits_the_shares(cls, law: str, info: ValidationInfo) -> str:
        vary = info.data.get("vary") or []
        if len(vary) > 1 and law != "mixing":
            raise ValueError(f"{len(vary)} shares vary (plan.vary: {', '.join(vary)}): only `mixing` (Data Mixing "
                             f"Laws) fits several shares; got {law!r}")
        return law

    @field_validator("ratios", mode="before")
    @classmethod
    def _numbers_or_mappings(cls, ratios: Any) -> Any:
        for item in ratios if isinstance(ratios, list) else []:
            if not isinstance(item, (int, float, dict)) or isinstance(item, bool):
                raise ValueError(f"each item is a target share (a number in (0, 1]) or, with several plan.vary "
                                 f"sources, a mapping of shares; got {item!r}")
        return ratios

    @field_validator("ratios")
    @classmethod
    def _shares_make_pilots(cls, ratios: list, info: ValidationInfo) -> list:
        vary, law = info.data.get("vary") or [], info.data.get("law", "d-cpt")
        for item in ratios:
            _check_share(item, vary)
        distinct = {_share_key(item) for item in ratios}
        if len(distinct) != len(ratios):
            raise ValueError("a share is given twice")
        shares = max(len(vary), 1)
        needed, why = MIN_RATIOS.get(law, (LAW_PARAMETERS["mixing"] + shares + 1, f"it fits "
                                           f"{LAW_PARAMETERS['mixing'] + shares} parameters per set on the pilots' "
                                           "last points"))
        if len(ratios) < needed:
            raise ValueError(f"law {law} needs at least {needed} pilot shares ({why}), got {len(ratios)}")
        return ratios

    @field_validator("validation")
    @classmethod
    def _validation_is_predictable(cls, validation: ValidationPilot | None, info: ValidationInfo):
        if validation is None:
            return validation
        _check_share(validation.ratio, info.data.get("vary") or [])
        pilot_tokens = info.data.get("pilot_tokens")
        if (info.data.get("law") == "mixing" and validation.tokens is not None and pilot_tokens is not None
                and validation.tokens != pilot_tokens):
            raise ValueError(f"tokens: the Data Mixing Law predicts at the pilots' length only (plan.pilot_tokens "
                             f"{pilot_tokens}), got {validation.tokens}")
        return validation


def _check_share(item: float | dict[str, float], vary: list[str]) -> None:
    """A share's kind matches `vary` (a number for one share, a mapping of every varied source for several), and
    its values are shares."""
    if len(vary) > 1 and (not isinstance(item, dict) or set(item) != set(vary)):
        raise ValueError(f"with several varied sources each share is a mapping of {', '.join(vary)} "
                         f"(e.g. {{{', '.join(f'{v}: 0.2' for v in vary)}}}), got {item!r}")
    if len(vary) <= 1 and isinstance(item, dict):
        raise ValueError(f"a mapping of shares needs several plan.vary sources; give a number, got {item!r}")
    _check_value(item)


def _check_value(item: float | dict[str, float]) -> None:
    if not isinstance(item, dict):
        if not 0 < item <= 1:
            raise ValueError(f"a target share must be in (0, 1], got {item}")
        return
    for name, share in item.items():
        if not 0 <= share <= 1:
            raise ValueError(f"the share of '{name}' must be in [0, 1], got {share}")
    if sum(item.values()) > 1 + 1e-9:
        raise ValueError(f"the shares {item} add up to more than 1")


def _share_key(item: float | dict[str, float]) -> tuple:
    return tuple(sorted(item.items())) if isinstance(item, dict) else (item,)
