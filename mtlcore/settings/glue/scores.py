"""GLUE's metrics (Wang et al. 2018) as summed statistics, and STS-B's regression loss.

CoLA: Matthews correlation; SST-2, MNLI, QNLI, RTE: accuracy; MRPC and QQP: F1 of the positive class, then
accuracy; STS-B: Pearson, then Spearman correlation. MCC and F1 come from the split's confusion counts, Pearson from
its summed moments. Spearman's correlation ranks the whole split, so its statistics carry every prediction: a
dense vector over the split's positions (the targets say where each example sits and how large the split is), zero
except at the batch's own examples, so that the batches' sum is exactly the split's predictions and targets.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mtlcore.settings.base import Loss, Score

F64 = torch.float64


# -- STS-B's loss: squared error, a Gaussian likelihood -------------------------------------------------
class SquaredError(Loss):
    """(f(x) − y)² per example (Hugging Face's regression loss for STS-B), outputs N×1, targets a mapping whose
    `score` holds y.

    Its likelihood is Gaussian, p_θ(y|x) = N(f(x), σ²), so −log p_θ = (f − y)²/(2σ²) + const: `sample` draws
    ŷ ∼ N(f(x), σ²) for the true Fisher (paper A, Eq. 5), and squared gradients of the loss times 1/(4σ⁴) are those
    of −log p_θ (`fisher_scale`). σ = 1 by default, in units of the 0–5 similarity score: the spread of a model's
    errors around a human rating, about that of the annotators' own disagreement.
    """

    def __init__(self, sigma: float = 1.0):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma={sigma!r} must be a positive number")
        self.sigma = float(sigma)
        self.fisher_scale = 1.0 / (4.0 * self.sigma**4)

    def __call__(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        return (outputs.squeeze(-1) - targets["score"].to(outputs.dtype)).pow(2)

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        device = generator.device if generator is not None else outputs.device
        mean = outputs.detach().squeeze(-1).to(device)
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        return {"score": (mean + self.sigma * noise).to(outputs.device)}


# -- classification: confusion counts -------------------------------------------------------------------
def _confusion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[true positives, false positives, false negatives, true negatives] of class 1 (binary tasks)."""
    predicted, actual = outputs.argmax(dim=1) == 1, targets == 1
    return torch.stack([(predicted & actual).sum(), (predicted & ~actual).sum(), (~predicted & actual).sum(),
                        (~predicted & ~actual).sum()]).to(F64)


def matthews(total: torch.Tensor) -> float:
    """(TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a factor is 0 (one class only, predicted or
    true: sklearn's convention)."""
    tp, fp, fn, tn = (float(v) for v in total)
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(denominator) if denominator else 0.0


def f1(total: torch.Tensor) -> float:
    """2TP / (2TP + FP + FN) of class 1; 0 when nothing is predicted or true positive (sklearn's zero_division=0)."""
    tp, fp, fn, _ = (float(v) for v in total)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _accuracy_of_confusion(total: torch.Tensor) -> float:
    tp, fp, fn, tn = (float(v) for v in total)
    return (tp + tn) / (tp + fp + fn + tn)


def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.stack([(outputs.argmax(dim=1) == targets).sum().to(F64),
                        torch.tensor(float(len(targets)), dtype=F64, device=outputs.device)])


# GLUE reports every score ×100 (correlations too): tables show them in points.
MCC = Score("mcc", higher_is_better=True, statistics=_confusion, value=matthews, percent=True)
F1 = Score("f1", higher_is_better=True, statistics=_confusion, value=f1, percent=True)
ACCURACY = Score("accuracy", higher_is_better=True, statistics=_correct, value=lambda t: float(t[0] / t[1]), percent=True)
BINARY_ACCURACY = Score("accuracy", higher_is_better=True, statistics=_confusion, value=_accuracy_of_confusion,
                        percent=True)


# -- regression: moments and ranks ----------------------------------------------------------------------
def _moments(outputs: torch.Tensor, targets) -> torch.Tensor:
    """[n, Σp, Σy, Σp², Σy², Σpy] in float64."""
    p, y = outputs.detach().squeeze(-1).to(F64), targets["score"].to(F64)
    return torch.stack([torch.tensor(float(len(y)), dtype=F64, device=p.device), p.sum(), y.sum(), (p * p).sum(),
                        (y * y).sum(), (p * y).sum()])


def pearson(total: torch.Tensor) -> float:
    """Pearson's r from the summed moments; 0 when the predictions or the targets are constant (no linear
    association is measurable)."""
    n, sp, sy, spp, syy, spy = (float(v) for v in total)
    var_p, var_y = n * spp - sp * sp, n * syy - sy * sy
    # Relative to the scale: constant values leave a rounding residue, not a variance.
    if var_p <= 1e-12 * n * spp or var_y <= 1e-12 * n * syy:
        return 0.0
    return max(-1.0, min(1.0, (n * spy - sp * sy) / math.sqrt(var_p * var_y)))


def _placed(outputs: torch.Tensor, targets) -> torch.Tensor:
    """3 × split size: [1 where an example is, its prediction, its target], zero elsewhere."""
    position, size = targets["position"], targets["size"]
    if len(size) and bool((size != size[0]).any()):
        raise ValueError("the batch mixes examples of splits of different sizes; Spearman's statistics place each "
                         "example in its own split")
    n = int(size[0]) if len(size) else 0
    placed = torch.zeros(3, n, dtype=F64, device=outputs.device)
    values = torch.stack([torch.ones_like(position, dtype=F64), outputs.detach().squeeze(-1).to(F64),
                          targets["score"].to(F64)])
    return placed.index_add_(1, position.to(outputs.device), values)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks


def spearman(total: torch.Tensor) -> float:
    """Spearman's ρ: Pearson's r of the average ranks of the split's predictions and targets (0 when either is
    constant)."""
    present, predictions, targets = (row.numpy() for row in total.cpu())
    if (present > 1).any():
        raise ValueError("an example was counted more than once in Spearman's statistics (positions repeat): evaluate "
                         "each split's examples once")
    chosen = present == 1
    rp, ry = average_ranks(predictions[chosen]), average_ranks(targets[chosen])
    n = float(chosen.sum())
    moments = torch.tensor([n, rp.sum(), ry.sum(), (rp * rp).sum(), (ry * ry).sum(), (rp * ry).sum()], dtype=F64)
    return pearson(moments)


PEARSON = Score("pearson", higher_is_better=True, statistics=_moments, value=pearson, percent=True)
SPEARMAN = Score("spearman", higher_is_better=True, statistics=_placed, value=spearman, percent=True)

# GLUE's metrics per task, the first (primary) as on GLUE's leaderboard.
SCORES = {"cola": (MCC,), "sst2": (ACCURACY,), "mrpc": (F1, BINARY_ACCURACY), "stsb": (PEARSON, SPEARMAN),
          "qqp": (F1, BINARY_ACCURACY), "mnli": (ACCURACY,), "qnli": (ACCURACY,), "rte": (ACCURACY,)}
