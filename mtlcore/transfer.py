"""The §3 and §4 comparisons of run datasets, under their former module name.

They live in `mtlcore.analysis.comparisons`; this module re-exports them so that `from mtlcore import
transfer` keeps working.
"""
from mtlcore.analysis.comparisons import (  # noqa: F401
    FACTOR_SUMMARIES,
    TABLE1_VARIABLES,
    analysis_dataset,
    configuration_label,
    delta_table,
    gaps_at_loss,
    generalization,
    label_configurations,
    smto_changes,
    table_dataset,
    trajectory_summaries,
    transfer_table,
)
from mtlcore.analysis.trajectories import common_loss_levels, value_at_loss  # noqa: F401
