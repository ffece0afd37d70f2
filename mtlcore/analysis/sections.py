"""The verdicts the chapters print: does each finding of the paper hold in a set of runs?

Each function takes the tables of `mtlcore.analysis.comparisons` and returns plain data (dataclasses of
booleans, counts and labels) together with the sentences a chapter displays, so that every decision a
chapter states is made here and tested on hand-built tables.

- §3 (Figure 1): transfer is positive or negative, significantly, and the gap already shows at training
  losses well above the final one: `transfer_verdict`, `transfer_finding`.
- §4.1 (Table 1): a factor explains transfer only if MTL moves it the opposite way to generalization for
  every significant transfer, in both directions: `factor_explains_transfer`, `factors_finding`.
- §4.2 (Figure 4): a factor explains what SMTOs change only if its %Δ and the %Δ of generalization have
  opposite signs (the agreeing quadrants): `quadrant_agreement`, `quadrant_finding`.

Conventions: Δ and %Δ of generalization are oriented (positive: better); the factors are lower-is-better,
so "better optimisation" is a negative Δ of a factor. Significance is the ±2 std test over seeds.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

EXPECTED_SIGNS = ("positive", "negative", "either")


def _direction(value: float) -> str:
    """'positive', 'negative', or 'none' (zero or not measured)."""
    if not np.isfinite(value) or value == 0:
        return "none"
    return "positive" if value > 0 else "negative"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- §3: transfer and how early it shows -----------------------------------------------------------------


@dataclass(frozen=True)
class TransferVerdict:
    """§3 for one configuration: the final transfer and the gaps at common training-loss levels."""

    configuration: str
    delta: float  # the final transfer Δ (positive: better than the reference)
    significant: bool
    direction: str  # "positive", "negative" or "none"
    expected: str | None  # the paper's sign: "positive", "negative", "either", or None (no expectation)
    as_expected: bool | None  # significant with the expected sign; None when any sign is expected
    same_sign_levels: int  # loss levels where the gap has the final Δ's sign and is significant
    earliest_x_final: float | None  # the highest of those levels, in multiples of the reference's final loss
    opposite_levels: tuple[tuple[float, float], ...]  # (Δ, x_final) where the gap is significant the other way
    text: str


def transfer_verdict(table: pd.DataFrame, gaps: pd.DataFrame, configuration: str,
                     expected: str | None = None, *, reference: str = "STL") -> TransferVerdict:
    """§3's verdict on `configuration`.

    table: `comparisons.transfer_table` (index: configuration; columns `delta`, `significant`).
    gaps: `comparisons.gaps_at_loss` (columns `configuration`, `x_final`, `delta`, `significant`).
    expected: the paper's sign for this configuration ("positive", "negative", "either") or None.
    """
    if expected is not None and expected not in EXPECTED_SIGNS:
        raise ValueError(f"expected={expected!r} for {configuration!r}; valid values: {list(EXPECTED_SIGNS)} or None")
    if configuration not in table.index:
        raise ValueError(f"no configuration {configuration!r} in the table; configurations: {list(table.index)}")
    row = table.loc[configuration]
    delta, significant = float(row["delta"]), bool(row["significant"])
    direction = _direction(delta)
    mine = gaps[(gaps["configuration"] == configuration) & gaps["significant"].astype(bool)]
    signs = np.sign(mine["delta"].to_numpy(dtype=float))
    final_sign = {"positive": 1.0, "negative": -1.0}.get(direction, 0.0)
    same = mine[signs == final_sign] if final_sign else mine.iloc[:0]
    opposite = mine[signs == -final_sign] if final_sign else mine.iloc[:0]
    earliest = float(same["x_final"].max()) if len(same) else None
    as_expected = None if expected in (None, "either") else bool(significant and direction == expected)

    if direction == "none":
        text = f"**{configuration}**: Δ = {delta:+.4f} (no transfer measured)."
    else:
        compared = (gaps["configuration"] == configuration).any()
        when = (f"already significant at a training loss {earliest:.1f}× above {reference}'s final loss"
                if earliest is not None else "not significant at any of the common loss levels" if compared else
                "not measured: the trajectories share no training-loss range after their first epoch (train more "
                "epochs to compare them at equal loss)")
        text = (f"**{configuration}**: Δ = {delta:+.4f} ({direction}, {'significant' if significant else 'not significant'}); "
                f"the gap in the same direction is {when}.")
    if len(opposite):
        shown = ", ".join(f"{d:+.4f} at {x:.1f}×" for d, x in zip(opposite["delta"], opposite["x_final"]))
        text += f" At {_plural(len(opposite), 'level')} the gap is significant with the opposite sign ({shown})."
    if expected == "either":
        text += " Paper: in between (either sign possible)."
    elif expected is not None:
        text += f" Paper: {expected}."
    return TransferVerdict(configuration, delta, significant, direction, expected, as_expected, len(same), earliest,
                           tuple((float(d), float(x)) for d, x in zip(opposite["delta"], opposite["x_final"])), text)


@dataclass(frozen=True)
class TransferFinding:
    """§3's finding over all configurations: "yes", "not fully" or "cannot be tested"."""

    answer: str
    holds: bool  # every configuration with a signed expectation shows it, significantly, in both directions
    tested: bool  # the expectations include a positive and a negative transfer
    verdicts: tuple[TransferVerdict, ...]
    headline: str
    text: str  # Markdown: the headline and one line per configuration


def transfer_finding(table: pd.DataFrame, gaps: pd.DataFrame, expected: Mapping[str, str], *,
                     reference: str = "STL", context: str = "in this run") -> TransferFinding:
    """§3: does the paper's transfer finding hold? `expected` maps configuration labels to the paper's
    sign; the configurations of `table` without one get a verdict without a comparison.

    The finding (Figure 1) pairs a positive with a negative transfer, so it is tested only when the
    expectations contain both signs; it holds when each is observed with significance.
    """
    unknown = [c for c in expected if c not in table.index]
    if unknown:
        raise ValueError(f"expected names configuration(s) {unknown} that are not in the table; "
                         f"configurations: {list(table.index)}")
    verdicts = tuple(transfer_verdict(table, gaps, c, expected.get(c), reference=reference)
                     for c in table.index if c != reference)
    signed = [v for v in verdicts if v.as_expected is not None]
    tested = {"positive", "negative"} <= {v.expected for v in signed}
    holds = tested and all(v.as_expected for v in signed)
    if holds:
        answer = "yes"
        parts = " and ".join(f"{v.direction} transfer with {v.configuration}" for v in signed)
        headline = f"**Yes** {context}: {parts}, each significant."
    elif tested:
        answer = "not fully"
        missed = ", ".join(f"{v.configuration} ({v.expected} expected)" for v in signed if not v.as_expected)
        headline = (f"**Not fully** {context}: the expected transfer is not significant for {missed} "
                    "(with few seeds or small data the ±2 std test is strict).")
    else:
        answer = "cannot be tested"
        headline = (f"**Cannot be tested** {context}: the paper's finding pairs a positive with a negative transfer, "
                    f"and the configurations here expect {', '.join(sorted({v.expected for v in signed})) or 'no sign'}.")
    text = headline + "\n\n" + "\n".join(f"- {v.text}" for v in verdicts)
    return TransferFinding(answer, holds, tested, verdicts, headline, text)


# --- §4.1: does a factor explain transfer? ----------------------------------------------------------------


def _significant_transfers(table: pd.DataFrame, reference: str) -> tuple[list[str], list[str]]:
    rows = table.drop(index=reference, errors="ignore")
    significant = rows[rows["significant_generalization"].astype(bool)]
    deltas = significant["delta_generalization"].astype(float)
    return list(significant.index[deltas > 0]), list(significant.index[deltas < 0])


@dataclass(frozen=True)
class FactorVerdict:
    """§4.1 for one factor: for each significant transfer, whether MTL moved the factor significantly
    the opposite way to generalization (lower factor with positive transfer, higher with negative)."""

    factor: str
    explains: bool  # consistent for every significant transfer, with a positive and a negative one among them
    consistent: dict[str, bool] = field(default_factory=dict)  # configuration -> consistent
    text: str = ""


def factor_explains_transfer(table: pd.DataFrame, factor: str, reference: str = "STL") -> FactorVerdict:
    """§4.1: does `factor` explain transfer in both directions?

    table: `comparisons.delta_table` of generalization and the factor (columns `delta_generalization`,
    `significant_generalization`, `delta_<factor>`, `significant_<factor>`). A factor explains transfer
    if, for every significant transfer, MTL moves it significantly in the opposite direction to
    generalization, and there is at least one significant positive and one significant negative transfer.
    """
    missing = [c for c in (f"delta_{factor}", f"significant_{factor}", "delta_generalization",
                           "significant_generalization") if c not in table.columns]
    if missing:
        raise ValueError(f"the table lacks column(s) {missing}; pass comparisons.delta_table of generalization and {factor!r}")
    positive, negative = _significant_transfers(table, reference)
    consistent = {}
    for label in positive + negative:
        row = table.loc[label]
        opposite = np.sign(float(row[f"delta_{factor}"])) == -np.sign(float(row["delta_generalization"]))
        consistent[label] = bool(row[f"significant_{factor}"]) and bool(opposite)
    ordered = {label: consistent[label] for label in table.index if label in consistent}
    explains = bool(positive and negative and all(ordered.values()))
    detail = ", ".join(f"{label}: {'consistent' if ok else 'not consistent'}" for label, ok in ordered.items())
    text = (f"**{factor}**: {'explains' if explains else 'does not explain'} both directions "
            f"({detail or 'no significant transfer to explain'}).")
    return FactorVerdict(factor, explains, ordered, text)


@dataclass(frozen=True)
class FactorFinding:
    """§4.1's finding: "yes" (some factor explains both directions), "no", or "cannot be tested"."""

    answer: str
    explaining: tuple[str, ...]  # the factors that explain both directions
    positive: tuple[str, ...]  # configurations with a significant positive transfer
    negative: tuple[str, ...]
    verdicts: tuple[FactorVerdict, ...]
    agrees_with_paper: bool | None  # None when it cannot be tested
    headline: str
    text: str


def factors_finding(table: pd.DataFrame, factors: Sequence[str], *, expected_explains: bool = False,
                    reference: str = "STL", context: str = "in this run") -> FactorFinding:
    """§4.1: does any of `factors` explain both the positive and the negative transfer?

    expected_explains: the paper's answer (Table 1: no factor explains both directions, False).
    """
    verdicts = tuple(factor_explains_transfer(table, f, reference) for f in factors)
    positive, negative = _significant_transfers(table, reference)
    explaining = tuple(v.factor for v in verdicts if v.explains)
    paper = f"The paper finds {'a' if expected_explains else 'no'} factor that explains both directions (Table 1)"
    if positive and negative:
        answer = "yes" if explaining else "no"
        agrees = bool(explaining) == expected_explains
        moved = (f"{', '.join(explaining)} {'moves' if len(explaining) == 1 else 'move'} with the transfer in both directions"
                 if explaining else "no factor moves with the transfer in both directions")
        headline = f"**{answer.capitalize()}**: {context} {moved}. {paper}."
    else:
        answer, agrees = "cannot be tested", None
        headline = (f"**Cannot be tested** {context}: the question needs a significant positive and a significant "
                    f"negative transfer, and here the significant ones are: positive {', '.join(positive) or 'none'}; "
                    f"negative {', '.join(negative) or 'none'}. {paper}; this run neither confirms nor contradicts that.")
    text = headline + "\n\n" + "\n".join(f"- {v.text}" for v in verdicts)
    return FactorFinding(answer, explaining, tuple(positive), tuple(negative), verdicts, agrees, headline, text)


# --- §4.2: the quadrants of Figure 4 ----------------------------------------------------------------------


@dataclass(frozen=True)
class QuadrantAgreement:
    """§4.2 for one factor: which points of Figure 4 lie in the agreeing quadrants."""

    factor: str
    agreeing: tuple[bool, ...]  # per point (row of the changes table)
    points: int  # points with both %Δ measured
    agreeing_points: int
    significant_points: int  # points whose generalization change is significant
    agreeing_significant: int
    solely_agreeing: bool  # at least one significant point, and every significant point agrees
    text: str

    @property
    def measured(self) -> bool:
        return self.points > 0


def quadrant_agreement(changes: pd.DataFrame, factor: str) -> QuadrantAgreement:
    """§4.2, Figure 4: a point agrees when %Δ `factor` and %Δ generalization have opposite signs (the
    factor is lower-is-better: better optimisation with better generalization, or worse with worse);
    a zero or unmeasured %Δ does not agree.

    changes: `comparisons.smto_changes` (columns `generalization`, `significant`, and the factor).
    """
    if factor not in changes.columns:
        raise ValueError(f"no column {factor!r} in the changes; columns: {list(changes.columns)}")
    x = changes[factor].to_numpy(dtype=float)
    y = changes["generalization"].to_numpy(dtype=float)
    significant = changes["significant"].to_numpy(dtype=bool)
    measured = np.isfinite(x) & np.isfinite(y)
    agreeing = measured & (np.sign(x) * np.sign(y) < 0)
    n_significant = int((significant & measured).sum())
    n_agreeing_significant = int((agreeing & significant).sum())
    solely = n_significant > 0 and n_agreeing_significant == n_significant
    name = factor.replace("_", " ")
    if not measured.any():
        text = f"**{name}**: not measured."
    else:
        text = (f"**{name}**: {int(agreeing.sum())} of {_plural(int(measured.sum()), 'point')} in the agreeing quadrants "
                f"({n_agreeing_significant} of {n_significant} significant ones).")
    return QuadrantAgreement(factor, tuple(bool(a) for a in agreeing), int(measured.sum()), int(agreeing.sum()),
                             n_significant, n_agreeing_significant, solely, text)


@dataclass(frozen=True)
class QuadrantFinding:
    """§4.2's finding: "some factor" has its significant points only in the agreeing quadrants, "no factor"
    has, or "cannot be tested" (no SMTO changed generalization significantly)."""

    answer: str
    solely_agreeing: tuple[str, ...]
    significant_points: int
    points: int
    agreements: tuple[QuadrantAgreement, ...]
    agrees_with_paper: bool | None
    headline: str
    text: str


def quadrant_finding(changes: pd.DataFrame, factors: Sequence[str], *, expected_solely_agreeing: bool = False,
                     context: str = "in this run") -> QuadrantFinding:
    """§4.2: does any of `factors` have its significant points solely in the agreeing quadrants?

    expected_solely_agreeing: the paper's answer (Figure 4: no factor's points lie solely there, False).
    """
    agreements = tuple(quadrant_agreement(changes, f) for f in factors)
    significant = int(changes["significant"].astype(bool).sum())
    solely = tuple(a.factor for a in agreements if a.solely_agreeing)
    paper = (f"The paper finds {'a' if expected_solely_agreeing else 'no'} factor whose points lie solely in the "
             "agreeing quadrants (Figure 4)")
    if not significant:
        answer, agrees = "cannot be tested", None
        headline = (f"**No SMTO changed generalization significantly** {context}, so no factor can be tested "
                    f"against the quadrants. {paper}.")
    else:
        answer = "some factor" if solely else "no factor"
        agrees = bool(solely) == expected_solely_agreeing
        headline = (f"**{answer.capitalize()}** has its significant points only in the agreeing quadrants"
                    f"{': ' + ', '.join(solely) if solely else ''} {context}; this rests on "
                    f"{_plural(significant, 'significant point')} of {len(changes)}. {paper}.")
    text = headline + "\n\n" + "\n".join(f"- {a.text}" for a in agreements)
    return QuadrantFinding(answer, solely, significant, len(changes), agreements, agrees, headline, text)
