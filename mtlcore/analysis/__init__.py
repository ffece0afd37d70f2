"""Analysing runs: the paper's §3, §4 and §5 comparisons of trajectories, and its Appendix C.

- `trajectories`: loss bins, one number per trajectory, Δ with ±2 std significance, %Δ, correlations
  (numbers and arrays, or DataArrays along `epoch`).
- `comparisons`: the same over run datasets: configuration labels, the direction of a task's score,
  Δ tables (Table 1), factors at comparable training loss (Appendix B.4), gaps at common training loss
  (Figure 1), SMTO changes (Figure 4).
- `conflict_study`: §5's random auxiliary sets, each run's mean gradient conflict, its correlations with the factors
  and generalization (Figures 5 and 6).
- `appendix`: Appendix C's per-task tables with every score of the task.
- `sections`: the verdicts the chapters print, computed from those tables.
- `plots`: the figures (imports matplotlib).
"""
from mtlcore.analysis import appendix, comparisons, conflict_study, sections, trajectories

__all__ = ["appendix", "comparisons", "conflict_study", "sections", "trajectories"]
