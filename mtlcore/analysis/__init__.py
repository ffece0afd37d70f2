"""Analysing runs: the paper's §3 and §4 comparisons of trajectories.

- `trajectories`: loss bins, one number per trajectory, Δ with ±2 std significance, %Δ, correlations
  (numbers and arrays, or DataArrays along `epoch`).
- `comparisons`: the same over run datasets: configuration labels, the direction of a task's score,
  Δ tables (Table 1), gaps at common training loss (Figure 1), SMTO changes (Figure 4).
- `sections`: the verdicts the chapters print, computed from those tables.
- `plots`: the figures (imports matplotlib).
"""
from mtlcore.analysis import comparisons, sections, trajectories

__all__ = ["comparisons", "sections", "trajectories"]
