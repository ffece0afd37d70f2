"""The scoreboard's verdicts, from hand-made findings and tables whose answers are known by construction."""
from __future__ import annotations

import pandas as pd
import pytest
import xarray as xr

from mtlcore.analysis import claims, sections

from test_sections import CHANGES, FACTORS_TABLE, GAPS, TABLE, _gaps, _transfer_table


@pytest.mark.parametrize("delta, significant, expected, verdict", [
    (0.05, True, 1, claims.REPRODUCED), (0.05, False, 1, claims.SAME_SIGN), (-0.05, False, 1, claims.OPPOSITE_SIGN),
    (-0.05, True, 1, claims.CONTRADICTED), (-0.05, True, -1, claims.REPRODUCED), (0.0, False, 1, claims.UNTESTABLE),
    (float("nan"), False, -1, claims.UNTESTABLE)])
def test_a_signed_effect_against_the_papers_sign(delta, significant, expected, verdict):
    assert claims.verdict_of(delta, significant, expected) == verdict


def test_section_3_claims_from_a_transfer_finding():
    finding = sections.transfer_finding(TABLE, GAPS, {"MTL: P": "positive", "MTL: N": "negative"})
    got = {r["claim"]: r for r in claims.transfer_claims(finding)}
    assert got["A3-positive"]["verdict"] == got["A3-negative"]["verdict"] == claims.REPRODUCED
    assert "MTL: P: Δ = +0.0500 (significant)" in got["A3-positive"]["evidence"]
    assert got["A3-early"]["verdict"] == claims.REPRODUCED  # both already significant above the final loss
    weak = sections.transfer_finding(TABLE, GAPS, {"MTL: weak": "positive", "MTL: E": "negative"})
    got = {r["claim"]: r["verdict"] for r in claims.transfer_claims(weak)}
    assert got == {"A3-positive": claims.SAME_SIGN, "A3-negative": claims.REPRODUCED, "A3-early": claims.CONTRADICTED}
    none = sections.transfer_finding(_transfer_table({"MTL: x": (0.01, False)}), _gaps([]), {"MTL: x": "either"})
    assert {r["verdict"] for r in claims.transfer_claims(none)} == {claims.UNTESTABLE}


def test_findings_with_an_agreement_decide_their_claim():
    class Finding:
        headline = "**No** factor explains both directions."

        def __init__(self, agrees):
            self.agrees_with_paper = agrees

    assert claims.finding_claim("A4.1-factors", Finding(True)) == {
        "claim": "A4.1-factors", "verdict": claims.REPRODUCED, "evidence": "No factor explains both directions."}
    assert claims.finding_claim("A4.2-smtos", Finding(False))["verdict"] == claims.CONTRADICTED
    assert claims.finding_claim("A4.2-smtos", Finding(None))["verdict"] == claims.UNTESTABLE


def test_the_chapters_findings_decide_their_claims():
    found = sections.factors_finding(FACTORS_TABLE, ["sharpness", "fisher_trace", "grad_cov_trace"])
    not_found = sections.factors_finding(FACTORS_TABLE, ["fisher_trace", "grad_cov_trace"])
    assert claims.finding_claim("A4.1-factors", found)["verdict"] == claims.CONTRADICTED  # the paper finds none
    assert claims.finding_claim("A4.1-factors", not_found)["verdict"] == claims.REPRODUCED
    quadrants = sections.quadrant_finding(CHANGES.assign(significant=False), ["a", "b"])
    assert claims.finding_claim("A4.2-smtos", quadrants)["verdict"] == claims.UNTESTABLE


def test_section_5_claims_from_a_conflict_finding():
    import numpy as np

    from mtlcore.analysis import conflict_study

    def table(rho_fisher, p_fisher, p_general):
        rows = [(target, quantity, rho, p) for target in ("a", "b") for quantity, rho, p in
                (("fisher_trace", rho_fisher, p_fisher), ("generalization", 0.3, p_general))]
        return pd.DataFrame([{"target": t, "quantity": q, "pearson_r": r, "pearson_p": p, "spearman_rho": r,
                              "spearman_p": p, "n": 8} for t, q, r, p in rows]).set_index(["target", "quantity"])

    def verdicts(t):
        return [r["verdict"] for r in claims.conflict_claims(conflict_study.finding(t, ["fisher_trace"]))]

    assert verdicts(table(-0.8, 0.01, 0.5)) == [claims.REPRODUCED, claims.REPRODUCED]  # the paper's picture
    assert verdicts(table(0.8, 0.01, 0.01)) == [claims.CONTRADICTED, claims.CONTRADICTED]
    assert verdicts(table(-0.3, 0.4, 0.5)) == [claims.NOT_SHOWN, claims.REPRODUCED]
    untested = claims.conflict_claims(conflict_study.finding(table(np.nan, np.nan, 0.5), ["fisher_trace"]), False)
    assert untested[1]["verdict"] == claims.UNTESTABLE


def test_bad_claims_and_verdicts_are_refused():
    with pytest.raises(ValueError, match=r"unknown claim 'A9'; claims: \['A3-positive'"):
        claims.record("A9", claims.REPRODUCED, "")
    with pytest.raises(ValueError, match=r"verdict 'yes' for A3-early; valid: \['reproduced'"):
        claims.record("A3-early", "yes", "")


def test_the_scoreboard_lists_every_claim_and_reads_the_chapters_datasets(tmp_path):
    records = [claims.record("A3-positive", claims.REPRODUCED, "Δ = +0.02"),
               claims.record("A3-negative", claims.OPPOSITE_SIGN, "Δ = +0.01 | n.s.")]
    xr.Dataset(attrs=claims.claims_attr(records)).to_netcdf(tmp_path / "sec3_transfer.nc", engine="h5netcdf")
    board = claims.scoreboard(tmp_path, ["sec3_transfer", "sec4_1_factors"])
    assert list(board["claim"]) == [c.text for c in claims.CLAIMS]
    verdicts = dict(zip([c.id for c in claims.CLAIMS], board["verdict"]))
    assert verdicts["A3-positive"] == claims.REPRODUCED and verdicts["A3-negative"] == claims.OPPOSITE_SIGN
    assert {verdicts[c.id] for c in claims.CLAIMS if c.chapter != "sec3_transfer"} == {claims.NOT_RUN}
    text = claims.scoreboard_markdown(board)
    assert "| A [§3](sec3_transfer.ipynb) |" in text and "Δ = +0.01 \\| n.s." in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == len(claims.CLAIMS) + 1 and "✓ reproduced: 1" in text  # the header and one row per claim


def test_yes_no_claims():
    assert claims.boolean_claim("B-fixed", True, "e")["verdict"] == claims.REPRODUCED
    assert claims.boolean_claim("B-fixed", False, "e")["verdict"] == claims.CONTRADICTED
    assert claims.boolean_claim("B-smtos", False, "e", otherwise=claims.NOT_SHOWN)["verdict"] == claims.NOT_SHOWN
    assert claims.boolean_claim("B-interference", None, "e")["verdict"] == claims.UNTESTABLE
