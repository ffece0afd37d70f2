"""Trajectory factors (paper A, §4 and Eqs. 3–6) and task scores: functions of (model, task, examples, loss)."""
from mtlcore.metrics.coherence import (
    GradientCoherence,
    coherence_estimate,
    finite_population_correction,
    gradient_coherence,
    multitask_gradient_coherence,
)
from mtlcore.metrics.conflict import gradient_conflict, mean_cosine_to_mean_gradient, shared_jacobian
from mtlcore.metrics.fisher import fisher_trace
from mtlcore.metrics.per_example import per_example_gradient_chunks, per_example_gradients, per_example_squared_norms
from mtlcore.metrics.scores import Evaluation, evaluate, min_training_loss
from mtlcore.metrics.sharpness import WorstCasePerturbation, apgd_checkpoints, sharpness, worst_case_perturbation

__all__ = [
    "Evaluation",
    "GradientCoherence",
    "WorstCasePerturbation",
    "apgd_checkpoints",
    "coherence_estimate",
    "evaluate",
    "finite_population_correction",
    "fisher_trace",
    "gradient_coherence",
    "gradient_conflict",
    "mean_cosine_to_mean_gradient",
    "min_training_loss",
    "multitask_gradient_coherence",
    "per_example_gradient_chunks",
    "per_example_gradients",
    "per_example_squared_norms",
    "shared_jacobian",
    "sharpness",
    "worst_case_perturbation",
]
