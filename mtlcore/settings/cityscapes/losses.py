"""Cityscapes's dense losses and scores (paper A, Appendix A): per-pixel cross-entropy and mIoU / pixel accuracy for
segmentation, L1 and absolute / relative error for (inverse) depth.

Outputs are N×C×H×W (segmentation logits) and N×1×H×W (depth); targets N×H×W labels, IGNORE (−1) where a pixel is
unlabelled, and N×1×H×W inverse depths, INVALID_DEPTH (0) where a pixel has no depth.

Per-example losses (`__call__`, what the trajectory factors differentiate per example) are the mean over that example's
valid pixels, V_i of them (0 for an example without any); a batch's loss (`mean`) is the mean of its examples' losses.

The Fisher (paper A, Eq. 5) of a dense task takes the pixels of an image as independent given the image and averages
their log-likelihoods as the loss averages the pixels:

    tr F = E_x E_{ŷ∼p_θ(·|x)} ‖∇_w (1/V) Σ_p −log p_θ(ŷ_p | x)‖²,

V the pixels drawn. The factor calls `sample_like(outputs, targets)`, which keeps the pixels that the true targets
leave out (ignored / invalid) out of the draw (V = V_i); `sample(outputs)` without targets draws every pixel (V = H·W). For a constant V this is 1/V² times the Fisher of the image's
summed log-likelihood.

- Segmentation: ŷ_p ∼ softmax(f_p(x)) and the loss is −(1/V) Σ_p log p_θ(ŷ_p|x) exactly: fisher_scale = 1.
- Depth: ŷ_p ∼ N(f_p(x), σ²), −log p_θ(ŷ_p|x) = (f_p − ŷ_p)²/(2σ²) + const, whose gradient is
  (1/V) Σ_p (f_p − ŷ_p)/σ² ∇f_p; the L1 loss's is (1/V) Σ_p sign(f_p − ŷ_p) ∇f_p. The pixels' residuals are independent
  and symmetric, so the expected squared norms differ only by E[(f_p − ŷ_p)²/σ⁴] = 1/σ² against E[sign²] = 1: both
  are (c/V²) Σ_p ‖∇f_p‖² (c = 1/σ² and 1), and fisher_scale = 1/σ² turns the L1 loss's expected squared gradient into
  the Gaussian's exactly (each draw differs; the expectation over ŷ, which tr F is, does not). σ = 1 (SIGMA): the
  L1 loss is then also exactly −log of a Laplace likelihood of scale 1, whose Fisher is the same.
"""
from __future__ import annotations

import math

import torch

from mtlcore.settings.base import Loss, Score

IGNORE = -1
INVALID_DEPTH = 0.0
SIGMA = 1.0


def _mean_over_valid(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per example, the mean of `per_pixel` over its valid pixels (0 where none is valid)."""
    total = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).flatten(1).sum(1)
    return total / valid.flatten(1).sum(1).clamp(min=1).to(per_pixel.dtype)


def _device(outputs: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else outputs.device


class _MaskedLikelihood(Loss):
    def sample_like(self, outputs, targets, generator=None):
        return self.sample(outputs, generator, targets)


class PixelCrossEntropy(_MaskedLikelihood):
    """−log softmax(f_p(x))[y_p] averaged over the example's labelled pixels (y_p ≠ −1)."""

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels = targets.long()
        valid = labels != IGNORE
        log_p = torch.log_softmax(outputs, dim=1)
        picked = log_p.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        return _mean_over_valid(-picked, valid)

    def mean(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        classes, largest = outputs.shape[1], int(targets.max()) if targets.numel() else IGNORE
        if largest >= classes:  # gather would fail with an index error that does not say why
            raise ValueError(f"segmentation label {largest} but the model predicts {classes} classes: set model "
                             "option segmentation_classes to the setting option `classes` (7 or 19)")
        return self(outputs, targets).mean()

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """A label per pixel from the model's softmax (int64, N×H×W); pixels ignored in `targets` stay ignored."""
        n, classes, height, width = outputs.shape
        probabilities = torch.softmax(outputs.detach().to(_device(outputs, generator)).float(), dim=1)
        flat = probabilities.permute(0, 2, 3, 1).reshape(-1, classes)
        labels = torch.multinomial(flat, 1, generator=generator).view(n, height, width).to(outputs.device)
        if targets is not None:
            labels = torch.where(targets.to(outputs.device).long() == IGNORE, torch.full_like(labels, IGNORE), labels)
        return labels


class DepthL1(_MaskedLikelihood):
    """|f_p(x) − y_p| averaged over the example's pixels with a depth (y_p ≠ 0); the Fisher of the Gaussian likelihood
    ŷ_p ∼ N(f_p(x), σ²) through `fisher_scale` = 1/σ² (the module docstring shows why that is exact)."""

    def __init__(self, sigma: float = SIGMA):
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma={sigma!r} must be a positive number")
        self.sigma = sigma
        self.fisher_scale = 1.0 / sigma**2

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != INVALID_DEPTH
        return _mean_over_valid((outputs - targets).abs(), valid)

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """ŷ = f(x) + σ·N(0, 1) per pixel; pixels invalid in `targets` stay invalid. A draw of exactly 0 (probability
        0 in exact arithmetic, 2⁻¹⁴⁹ or so in float32) would read as invalid: it is moved to the smallest positive
        float."""
        noise = torch.randn(outputs.shape, generator=generator, device=_device(outputs, generator),
                            dtype=outputs.dtype).to(outputs.device)
        drawn = outputs.detach() + self.sigma * noise
        drawn = torch.where(drawn == INVALID_DEPTH, torch.full_like(drawn, torch.finfo(drawn.dtype).tiny), drawn)
        if targets is not None:
            drawn = torch.where(targets.to(outputs.device) == INVALID_DEPTH, torch.zeros_like(drawn), drawn)
        return drawn


# -- scores over a split ---------------------------------------------------------------------------------------------
def confusion_matrix(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """C×C counts (float64) of labelled pixels, row the true class, column the predicted (argmax) one; flattened."""
    classes = outputs.shape[1]
    labels = targets.long().reshape(-1)
    predicted = outputs.argmax(dim=1).reshape(-1)
    valid = labels != IGNORE
    index = labels[valid] * classes + predicted[valid]
    return torch.bincount(index, minlength=classes * classes).double()


def _square(total: torch.Tensor) -> torch.Tensor:
    classes = math.isqrt(total.numel())
    return total.reshape(classes, classes).double()


def mean_iou(total: torch.Tensor) -> float:
    """Mean over classes of TP / (TP + FP + FN) from the split's confusion matrix; a class neither present nor
    predicted anywhere in the split (union 0) is left out of the mean; NaN when no pixel is labelled."""
    matrix = _square(total)
    true_positive = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    present = union > 0
    return float((true_positive[present] / union[present]).mean()) if present.any() else math.nan


def pixel_accuracy(total: torch.Tensor) -> float:
    """Correctly predicted labelled pixels over all labelled pixels of the split."""
    matrix = _square(total)
    pixels = float(matrix.sum())
    return float(matrix.diagonal().sum()) / pixels if pixels else math.nan


def depth_errors(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Σ |f − y|, Σ |f − y| / |y|, number of pixels] over the pixels with a depth (float64)."""
    valid = targets != INVALID_DEPTH
    error = (outputs.double() - targets.double()).abs()[valid]
    return torch.stack([error.sum(), (error / targets.double().abs()[valid]).sum(),
                        valid.sum().double()])


def _ratio(index: int):
    def value(total: torch.Tensor) -> float:
        return float(total[index] / total[2]) if float(total[2]) else math.nan
    return value


MIOU = Score("miou", higher_is_better=True, statistics=confusion_matrix, value=mean_iou, percent=True)
PIXEL_ACCURACY = Score("pixel_accuracy", higher_is_better=True, statistics=confusion_matrix, value=pixel_accuracy,
                       percent=True)
ABS_ERR = Score("abs_err", higher_is_better=False, statistics=depth_errors, value=_ratio(0))
REL_ERR = Score("rel_err", higher_is_better=False, statistics=depth_errors, value=_ratio(1))
