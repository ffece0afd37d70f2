"""The papers' claims and this build's verdict on each: the scoreboard on the book's first page.

A chapter decides its claims from its own results (`transfer_claims`, `finding_claim`, `correlation_claim`,
`verdict_of`) and stores them in its analysis dataset's ``claims`` attr (`claims_attr`); `scoreboard` reads the
datasets of a results folder, and a claim whose chapter did not run reads "not run on this profile".
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPRODUCED = "reproduced"
SAME_SIGN = "same sign, not significant"
OPPOSITE_SIGN = "opposite sign, not significant"
CONTRADICTED = "contradicted"
NOT_SHOWN = "not shown here"  # tested: the claimed effect is not significant, and nothing significant opposes it
UNTESTABLE = "cannot be tested here"
NOT_RUN = "not run on this profile"
VERDICTS = (REPRODUCED, SAME_SIGN, OPPOSITE_SIGN, CONTRADICTED, NOT_SHOWN, UNTESTABLE, NOT_RUN)


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str  # "A" or "B"
    section: str
    text: str
    chapter: str  # the notebook that decides it


CLAIMS = (
    Claim("A3-positive", "A", "§3", "Training with more in-distribution data (Fashion2) transfers positively to the "
          "target task", "sec3_transfer"),
    Claim("A3-negative", "A", "§3", "Training with label noise (NoisyFashion) transfers negatively to the target task",
          "sec3_transfer"),
    Claim("A3-early", "A", "§3", "Transfer shows early: a generalization gap at training losses far above the final "
          "one", "sec3_transfer"),
    Claim("A4.1-factors", "A", "§4.1", "No trajectory factor (sharpness, Fisher trace, gradient coherence) explains "
          "both positive and negative transfer", "sec4_1_factors"),
    Claim("A4.2-smtos", "A", "§4.2", "Where SMTOs change generalization, no factor's changes lie solely in the "
          "agreeing quadrants", "sec4_2_smtos"),
    Claim("A5-factors", "A", "§5", "More gradient conflict goes with worse optimization factors (positive "
          "correlation of conflict with sharpness, Fisher trace, gradient covariance)", "sec5_conflict"),
    Claim("A5-generalization", "A", "§5", "Gradient conflict has little to no correlation with the target's "
          "generalization", "sec5_conflict"),
    Claim("B-smtos", "B", "abstract", "SMTOs perform well compared to the uniform loss (some SMTO significantly "
          "better than the tuned uniform loss)", "paperb_uniform"),
    Claim("B-uniform", "B", "abstract", "The tuned uniform loss performs similarly to the SMTOs in some instances",
          "paperb_uniform"),
    Claim("B-fixed", "B", "abstract", "Fixed weights taken from an SMTO's trajectory are competitive with that SMTO",
          "paperb_uniform"),
    Claim("B-interference", "B", "abstract", "SMTOs help most where the tasks interfere (conflict) most",
          "paperb_uniform"),
)
BY_ID = {claim.id: claim for claim in CLAIMS}


def verdict_of(observed_sign: float, significant: bool, expected_sign: float) -> str:
    """A signed effect against the paper's sign: reproduced (significant, same sign), same sign but not significant,
    opposite sign not significant, contradicted (significant, opposite sign); a zero or NaN effect cannot be tested."""
    if not observed_sign == observed_sign or observed_sign == 0:  # NaN or exactly zero
        return UNTESTABLE
    same = (observed_sign > 0) == (expected_sign > 0)
    if significant:
        return REPRODUCED if same else CONTRADICTED
    return SAME_SIGN if same else OPPOSITE_SIGN


def record(claim_id: str, verdict: str, evidence: str) -> dict:
    if claim_id not in BY_ID:
        raise ValueError(f"unknown claim {claim_id!r}; claims: {list(BY_ID)}")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} for {claim_id}; valid: {list(VERDICTS)}")
    return {"claim": claim_id, "verdict": verdict, "evidence": evidence}


def claims_attr(records: Iterable[dict]) -> dict[str, str]:
    """The analysis dataset attr that carries a chapter's verdicts (netCDF attrs hold strings: JSON)."""
    return {"claims": json.dumps(list(records))}


def transfer_claims(finding) -> list[dict]:
    """§3's claims from `sections.transfer_finding`: each expected sign (positive, negative) from the verdict of the
    configuration the paper expects it of, and "early" from whether a reproduced transfer is already significant at
    a loss above the reference's final one."""
    out = []
    for sign, claim_id in (("positive", "A3-positive"), ("negative", "A3-negative")):
        verdicts = [v for v in finding.verdicts if v.expected == sign]
        if not verdicts:
            out.append(record(claim_id, UNTESTABLE, f"no configuration with a {sign} expectation ran"))
            continue
        v = verdicts[0]
        verdict = verdict_of(v.delta, v.significant, 1.0 if sign == "positive" else -1.0)
        out.append(record(claim_id, verdict, f"{v.configuration}: Δ = {v.delta:+.4f}"
                          f"{' (significant)' if v.significant else ' (not significant)'}"))
    reproduced = [v for v in finding.verdicts if v.expected in ("positive", "negative") and v.significant
                  and v.direction == v.expected]
    if not reproduced:
        out.append(record("A3-early", UNTESTABLE, "no expected transfer is significant at the end of training"))
    else:
        early = [v for v in reproduced if v.earliest_x_final is not None and v.earliest_x_final > 1]
        text = "; ".join(f"{v.configuration}: " + (f"significant already at {v.earliest_x_final:.1f}× the final loss"
                                                   if v.earliest_x_final else "not at the common loss levels")
                         for v in reproduced)
        out.append(record("A3-early", REPRODUCED if len(early) == len(reproduced) else
                          SAME_SIGN if early else CONTRADICTED, text))
    return out


def finding_claim(claim_id: str, finding) -> dict:
    """A claim decided by a finding with `agrees_with_paper` (True: as the paper, False: not, None: cannot be tested) and a
    `headline`, such as `sections.factors_finding` (§4.1) and `sections.quadrant_finding` (§4.2)."""
    verdict = {True: REPRODUCED, False: CONTRADICTED, None: UNTESTABLE}[finding.agrees_with_paper]
    return record(claim_id, verdict, _plain(finding.headline))


def boolean_claim(claim_id: str, holds: bool | None, evidence: str, *, otherwise: str = CONTRADICTED) -> dict:
    """A claim decided by a tested yes/no (None: cannot be judged here): reproduced when it holds, else `otherwise`
    (contradicted where "no" means a significant effect against the claim, `NOT_SHOWN` where it means no significant
    effect for it)."""
    verdict = UNTESTABLE if holds is None else REPRODUCED if holds else otherwise
    return record(claim_id, verdict, evidence)


def conflict_claims(finding, generalization_tested: bool = True) -> list[dict]:
    """§5's claims from `conflict_study.finding`: more conflict goes with larger factors (some factor grows with the
    conflict for every target: reproduced; none does and some shrinks with it: contradicted; neither: not shown), and
    generalization does not follow the conflict (no target's correlation is significant: reproduced)."""
    grows, shrinks = finding.factors_follow_conflict, finding.factors_opposite
    factors = record("A5-factors", REPRODUCED if grows else CONTRADICTED if shrinks else NOT_SHOWN,
                     f"grow with the conflict: {', '.join(grows) or 'none'}; "
                     f"shrink with it: {', '.join(shrinks) or 'none'}"
                     " (Spearman, p < 0.05, for every target)")
    follows = finding.generalization_follows
    general = record("A5-generalization", UNTESTABLE if not generalization_tested else
                     CONTRADICTED if follows else REPRODUCED,
                     f"generalization correlated with the conflict (p < 0.05) for {', '.join(map(str, follows))}"
                     if follows else "no target's generalization correlates with the conflict (p < 0.05)")
    return [factors, general]


def _plain(text: str) -> str:
    return text.replace("**", "").strip()


def scoreboard(results_dir: str | Path, chapters: Iterable[str]) -> pd.DataFrame:
    """Every claim with this build's verdict, read from the chapters' analysis datasets `<chapter>.nc` under
    `results_dir`; a claim whose chapter is not among `chapters` or left no verdict is "not run on this profile"."""
    import xarray as xr

    found: dict[str, dict] = {}
    for chapter in chapters:
        path = Path(results_dir) / f"{chapter}.nc"
        if not path.is_file():
            continue
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            items = json.loads(ds.attrs.get("claims", "[]"))
        for item in items if isinstance(items, list) else []:  # records of `record` (other shapes: not verdicts)
            if isinstance(item, dict) and item.get("claim") in BY_ID and item.get("verdict") in VERDICTS:
                found[item["claim"]] = item
    rows = []
    for claim in CLAIMS:
        item = found.get(claim.id, {"verdict": NOT_RUN, "evidence": ""})
        rows.append({"paper": claim.paper, "section": claim.section, "claim": claim.text, "verdict": item["verdict"],
                     "evidence": item["evidence"], "chapter": claim.chapter})
    return pd.DataFrame(rows)


MARKS = {REPRODUCED: "✓", SAME_SIGN: "◐", OPPOSITE_SIGN: "◑", CONTRADICTED: "✗", NOT_SHOWN: "○", UNTESTABLE: "–",
         NOT_RUN: "·"}


def scoreboard_markdown(board: pd.DataFrame, titles: Mapping[str, str] | None = None) -> str:
    """The scoreboard as a Markdown table, each claim linked to the chapter that decides it."""
    titles = titles or {}
    lines = ["| paper | claim | verdict in this build | evidence |", "|---|---|---|---|"]
    for row in board.itertuples():
        link = f"[{row.section}]({row.chapter}.ipynb)" if row.verdict != NOT_RUN else row.section
        evidence = str(row.evidence).replace("|", "\\|")
        lines.append(f"| {row.paper} {link} | {row.claim} | {MARKS[row.verdict]} {row.verdict} | {evidence} |")
    counts = board["verdict"].value_counts()
    lines += ["", "Verdicts: " + ", ".join(f"{MARKS[v]} {v}: {counts.get(v, 0)}" for v in VERDICTS) + "."]
    return "\n".join(lines)
