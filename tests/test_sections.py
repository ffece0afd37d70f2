"""The chapters' verdicts on hand-built tables whose answers are known by construction."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mtlcore.analysis import sections
from mtlcore.analysis.comparisons import GAP_COLUMNS

NAN = float("nan")


# --- §3 ----------------------------------------------------------------------------------------------------


def _transfer_table(rows: dict[str, tuple[float, bool]]) -> pd.DataFrame:
    """configuration -> (Δ, significant), after an STL row."""
    data = {"STL": (0.0, False), **rows}
    return pd.DataFrame({"mean": [0.8 + d for d, _ in data.values()], "std": 0.001,
                         "delta": [d for d, _ in data.values()], "significant": [s for _, s in data.values()]},
                        index=pd.Index(list(data), name="configuration"))


def _gaps(rows: list[tuple[str, float, float, bool]]) -> pd.DataFrame:
    """(configuration, x_final, Δ, significant) per loss level."""
    return pd.DataFrame([{"loss_level": 0.01 * x, "x_final": x, "configuration": c, "reference": 0.8, "mean": 0.8 + d,
                          "delta": d, "significant": s} for c, x, d, s in rows], columns=GAP_COLUMNS)


TABLE = _transfer_table({"MTL: P": (0.05, True), "MTL: N": (-0.04, True), "MTL: weak": (0.01, False),
                         "MTL: E": (-0.02, True), "MTL: nan": (NAN, False)})
GAPS = _gaps([
    ("MTL: P", 500.0, 0.01, False), ("MTL: P", 50.0, 0.03, True), ("MTL: P", 5.0, 0.04, True),
    ("MTL: N", 100.0, 0.02, True), ("MTL: N", 10.0, -0.01, False), ("MTL: N", 1.5, -0.03, True),
    ("MTL: weak", 50.0, 0.02, True), ("MTL: E", 50.0, -0.01, False),
])


def test_positive_significant_transfer_already_there_early():
    verdict = sections.transfer_verdict(TABLE, GAPS, "MTL: P", "positive")
    assert verdict.direction == "positive" and verdict.significant and verdict.as_expected is True
    assert verdict.same_sign_levels == 2 and verdict.earliest_x_final == 50.0  # 500× is not significant
    assert verdict.opposite_levels == ()
    assert "already significant at a training loss 50.0× above STL" in verdict.text and "Paper: positive." in verdict.text


def test_negative_transfer_with_an_opposite_sign_level():
    verdict = sections.transfer_verdict(TABLE, GAPS, "MTL: N", "negative")
    assert verdict.direction == "negative" and verdict.as_expected is True
    assert verdict.same_sign_levels == 1 and verdict.earliest_x_final == 1.5
    assert verdict.opposite_levels == ((0.02, 100.0),)
    assert "At 1 level the gap is significant with the opposite sign (+0.0200 at 100.0×)" in verdict.text


def test_not_significant_or_wrong_sign_is_not_as_expected():
    weak = sections.transfer_verdict(TABLE, GAPS, "MTL: weak", "positive")
    assert weak.direction == "positive" and not weak.significant and weak.as_expected is False
    assert weak.earliest_x_final == 50.0  # an early gap alone does not make the final transfer significant
    wrong = sections.transfer_verdict(TABLE, GAPS, "MTL: E", "positive")
    assert wrong.significant and wrong.direction == "negative" and wrong.as_expected is False
    assert wrong.earliest_x_final is None and "not significant at any of the common loss levels" in wrong.text


def test_either_sign_and_no_expectation_are_not_checked():
    either = sections.transfer_verdict(TABLE, GAPS, "MTL: E", "either")
    assert either.as_expected is None and "either sign possible" in either.text
    assert sections.transfer_verdict(TABLE, GAPS, "MTL: E").as_expected is None
    missing = sections.transfer_verdict(TABLE, GAPS, "MTL: nan", "positive")
    assert missing.direction == "none" and missing.as_expected is False and "no transfer measured" in missing.text


def test_runs_too_short_for_a_common_loss_range_say_so():
    verdict = sections.transfer_verdict(TABLE, GAPS.iloc[:0], "MTL: P", "positive")
    assert verdict.earliest_x_final is None and verdict.same_sign_levels == 0
    assert "not measured: the trajectories share no training-loss range after their first epoch" in verdict.text


def test_transfer_verdict_refuses_bad_input():
    with pytest.raises(ValueError, match="valid values"):
        sections.transfer_verdict(TABLE, GAPS, "MTL: P", "up")
    with pytest.raises(ValueError, match="no configuration 'MTL: X'"):
        sections.transfer_verdict(TABLE, GAPS, "MTL: X")


def test_transfer_finding_yes_not_fully_and_untestable():
    holds = sections.transfer_finding(TABLE, GAPS, {"MTL: P": "positive", "MTL: N": "negative", "MTL: E": "either"},
                                      context="in this test")
    assert holds.answer == "yes" and holds.holds and holds.tested
    assert holds.headline.startswith("**Yes** in this test: positive transfer with MTL: P and negative transfer with MTL: N")
    assert [v.configuration for v in holds.verdicts] == ["MTL: P", "MTL: N", "MTL: weak", "MTL: E", "MTL: nan"]
    assert holds.text.count("\n- ") == 5

    partly = sections.transfer_finding(TABLE, GAPS, {"MTL: weak": "positive", "MTL: N": "negative"})
    assert partly.answer == "not fully" and partly.tested and not partly.holds and "MTL: weak" in partly.headline

    one_sided = sections.transfer_finding(TABLE, GAPS, {"MTL: P": "positive", "MTL: E": "either"})
    assert one_sided.answer == "cannot be tested" and not one_sided.tested and not one_sided.holds

    with pytest.raises(ValueError, match="not in the table"):
        sections.transfer_finding(TABLE, GAPS, {"MTL: missing": "positive"})


def test_transfer_finding_without_gaps():
    finding = sections.transfer_finding(TABLE, _gaps([]), {"MTL: P": "positive", "MTL: N": "negative"})
    assert finding.holds and all(v.earliest_x_final is None for v in finding.verdicts)


# --- §4.1 --------------------------------------------------------------------------------------------------


def _table1(rows: dict[str, dict[str, tuple[float, bool]]]) -> pd.DataFrame:
    """configuration -> {quantity: (Δ, significant)}, after an STL row of zeros."""
    quantities = list(next(iter(rows.values())))
    data = {"STL": {q: (0.0, False) for q in quantities}, **rows}
    columns = {}
    for q in quantities:
        columns[f"delta_{q}"] = [r[q][0] for r in data.values()]
        columns[f"significant_{q}"] = [r[q][1] for r in data.values()]
    return pd.DataFrame(columns, index=pd.Index(list(data), name="configuration"))


# generalization up with P, down with N, not significantly changed with Q.
# sharpness: down with P and up with N, significantly (explains both directions).
# fisher_trace: down with P and with N (explains only the positive transfer).
# grad_cov_trace: the right directions, but not significant with N.
# min_train_loss: the right directions; with Q (no significant transfer) the wrong one, which does not count.
FACTORS_TABLE = _table1({
    "MTL: P": {"generalization": (0.05, True), "sharpness": (-1.0, True), "fisher_trace": (-5.0, True),
               "grad_cov_trace": (-2.0, True), "min_train_loss": (-0.1, True)},
    "MTL: N": {"generalization": (-0.04, True), "sharpness": (0.5, True), "fisher_trace": (-3.0, True),
               "grad_cov_trace": (1.0, False), "min_train_loss": (0.2, True)},
    "MTL: Q": {"generalization": (0.01, False), "sharpness": (3.0, True), "fisher_trace": (0.0, False),
               "grad_cov_trace": (0.0, False), "min_train_loss": (0.3, True)},
})


@pytest.mark.parametrize("factor, explains, consistent", [
    ("sharpness", True, {"MTL: P": True, "MTL: N": True}),
    ("fisher_trace", False, {"MTL: P": True, "MTL: N": False}),
    ("grad_cov_trace", False, {"MTL: P": True, "MTL: N": False}),
    ("min_train_loss", True, {"MTL: P": True, "MTL: N": True}),
])
def test_factor_explains_transfer_only_in_both_directions(factor, explains, consistent):
    verdict = sections.factor_explains_transfer(FACTORS_TABLE, factor)
    assert verdict.explains is explains and verdict.consistent == consistent
    assert verdict.text.startswith(f"**{factor}**: {'explains' if explains else 'does not explain'} both directions")


def test_one_direction_only_cannot_explain():
    only_positive = FACTORS_TABLE.drop(index="MTL: N")
    verdict = sections.factor_explains_transfer(only_positive, "sharpness")
    assert not verdict.explains and verdict.consistent == {"MTL: P": True}
    finding = sections.factors_finding(only_positive, ["sharpness"])
    assert finding.answer == "cannot be tested" and finding.agrees_with_paper is None
    assert finding.positive == ("MTL: P",) and finding.negative == ()
    assert "positive MTL: P; negative none" in finding.headline


def test_no_significant_transfer():
    none = FACTORS_TABLE.assign(significant_generalization=False)
    verdict = sections.factor_explains_transfer(none, "sharpness")
    assert not verdict.explains and verdict.consistent == {} and "no significant transfer to explain" in verdict.text
    assert sections.factors_finding(none, ["sharpness"]).answer == "cannot be tested"


def test_factors_finding_compares_with_the_paper():
    found = sections.factors_finding(FACTORS_TABLE, ["sharpness", "fisher_trace", "grad_cov_trace"], context="here")
    assert found.answer == "yes" and found.explaining == ("sharpness",)
    assert found.agrees_with_paper is False  # the paper finds no such factor
    assert found.headline.startswith("**Yes**: here sharpness moves with the transfer in both directions.")
    assert "The paper finds no factor that explains both directions (Table 1)." in found.headline
    assert found.text.count("\n- ") == 3
    not_found = sections.factors_finding(FACTORS_TABLE, ["fisher_trace", "grad_cov_trace"])
    assert not_found.answer == "no" and not_found.explaining == () and not_found.agrees_with_paper is True
    assert sections.factors_finding(FACTORS_TABLE, ["fisher_trace"], expected_explains=True).agrees_with_paper is False


def test_factor_verdict_names_missing_columns():
    with pytest.raises(ValueError, match=r"delta_conflict"):
        sections.factor_explains_transfer(FACTORS_TABLE, "conflict")


# --- §4.2 --------------------------------------------------------------------------------------------------


def _changes(points: list[tuple[float, float, float, bool]]) -> pd.DataFrame:
    """(%Δ factor a, %Δ factor b, %Δ generalization, significant) per point."""
    return pd.DataFrame([{"group": "g", "task": f"t{i}", "aggregator": "mgda", "significant": s, "a": a, "b": b,
                          "generalization": y} for i, (a, b, y, s) in enumerate(points)])


# Factor a: its significant points are top-left and bottom-right (agreeing); its one disagreeing point is
# not significant. Factor b: one significant point top-right (better generalization, worse optimisation).
CHANGES = _changes([
    (-10.0, -10.0, 1.0, True),  # top left: agrees for both
    (10.0, 10.0, -1.0, True),  # bottom right: agrees for both
    (-5.0, 5.0, 2.0, True),  # a: top left; b: top right (disagrees)
    (-5.0, -5.0, -1.0, False),  # bottom left: disagrees for both, not significant
    (0.0, 0.0, 1.0, False),  # on the axis: does not agree
    (NAN, NAN, 1.0, False),  # unmeasured
])


def test_quadrant_agreement_counts_each_quadrant():
    a = sections.quadrant_agreement(CHANGES, "a")
    assert a.agreeing == (True, True, True, False, False, False)
    assert (a.points, a.agreeing_points, a.significant_points, a.agreeing_significant) == (5, 3, 3, 3)
    assert a.solely_agreeing and a.measured
    assert a.text == "**a**: 3 of 5 points in the agreeing quadrants (3 of 3 significant ones)."
    b = sections.quadrant_agreement(CHANGES, "b")
    assert b.agreeing == (True, True, False, False, False, False)
    assert (b.agreeing_points, b.agreeing_significant) == (2, 2) and not b.solely_agreeing


def test_quadrant_agreement_of_an_unmeasured_factor():
    empty = sections.quadrant_agreement(CHANGES.assign(a=NAN), "a")
    assert not empty.measured and not empty.solely_agreeing and empty.text == "**a**: not measured."
    with pytest.raises(ValueError, match="no column 'c'"):
        sections.quadrant_agreement(CHANGES, "c")


def test_quadrant_finding():
    found = sections.quadrant_finding(CHANGES, ["a", "b"], context="here")
    assert found.answer == "some factor" and found.solely_agreeing == ("a",) and found.agrees_with_paper is False
    assert (found.significant_points, found.points) == (3, 6)
    assert found.headline.startswith("**Some factor** has its significant points only in the agreeing quadrants: a here; "
                                     "this rests on 3 significant points of 6.")
    only_b = sections.quadrant_finding(CHANGES, ["b"])
    assert only_b.answer == "no factor" and only_b.agrees_with_paper is True
    none = sections.quadrant_finding(CHANGES.assign(significant=False), ["a", "b"])
    assert none.answer == "cannot be tested" and none.agrees_with_paper is None and none.solely_agreeing == ()
    assert none.headline.startswith("**No SMTO changed generalization significantly**")


def test_quadrant_rule_matches_the_figure_shading():
    """The agreeing quadrants are the ones quadrant_plot shades: top-left (x < 0 < y) and bottom-right."""
    x = np.array([-1.0, 1.0, 1.0, -1.0])
    y = np.array([1.0, -1.0, 1.0, -1.0])
    changes = pd.DataFrame({"f": x, "generalization": y, "significant": True})
    agreement = sections.quadrant_agreement(changes, "f")
    assert agreement.agreeing == (True, True, False, False)
    assert math.isclose(agreement.agreeing_points / agreement.points, 0.5)
