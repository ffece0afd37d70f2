"""Trace of the Fisher information matrix (REFERENCE §1.3, Eq. 5).

tr F = E_x E_{ŷ∼p_θ(·|x)} ‖∇_w ℓ(f(x), ŷ)‖², w = the parameters the task's loss depends on.
Classification: ŷ sampled from softmax(f(x)) (true Fisher), or the true label (`empirical=True`).
Regression: Gaussian likelihood, ℓ = (f − ŷ)²/(2σ²) with ŷ ∼ N(f(x), σ²); its gradient is the
squared-error gradient divided by 2σ², so the trace is the squared-error one divided by 4σ⁴.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlcore.metrics.common import batched_outputs, check_examples, check_loss
from mtlcore.metrics.per_example import per_example_squared_norms

EXPECTATIONS = ("sample", "exact")


def sample_model_labels(
    outputs: torch.Tensor, loss: str, *, sigma: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One label per example drawn from the model's predictive distribution p_θ(·|x)."""
    sample_device = generator.device if generator is not None else outputs.device
    if check_loss(loss) == "mse":
        noise = torch.randn(outputs.shape, generator=generator, device=sample_device, dtype=outputs.dtype)
        return outputs + sigma * noise.to(outputs.device)
    # Classes are dim 1 (N×C or N×C×H×W): move them last so every row is one categorical distribution.
    logits = outputs.movedim(1, -1)
    probabilities = torch.softmax(logits.reshape(-1, logits.shape[-1]).to(sample_device), dim=-1)
    labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    return labels.reshape(logits.shape[:-1]).to(outputs.device)


def fisher_trace(
    model: nn.Module,
    task: str,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    empirical: bool = False,
    loss: str = "cross_entropy",
    sigma: float = 1.0,
    num_samples: int = 1,
    expectation: str = "sample",
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
    method: str = "auto",
    device: torch.device | str | None = None,
) -> float:
    """tr F averaged over the examples of (x, y); the model ends in its previous mode, parameters untouched.

    empirical: use the true labels `y` (empirical Fisher) instead of labels sampled from the model.
    num_samples: labels sampled per example (the expectation over ŷ is their average).
    expectation: "sample" (Monte Carlo, `num_samples` draws) or "exact" (classification with N×C
        outputs only: Σ_c p_c ‖∇ℓ(c)‖², costing C gradients per example).
    sigma: the Gaussian likelihood's standard deviation (regression only).
    """
    check_loss(loss)
    if expectation not in EXPECTATIONS:
        raise ValueError(f"unknown expectation {expectation!r}; valid: {list(EXPECTATIONS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    gradient_options = dict(loss=loss, chunk_size=chunk_size, method=method, device=device)
    # The squared-error loss (f − y)² has gradient 2σ² times that of the Gaussian log-likelihood.
    scale = 1.0 / (4 * sigma**4) if loss == "mse" else 1.0

    if empirical:
        if y is None:
            raise ValueError("empirical=True needs the true labels y; pass y or use empirical=False")
        check_examples(x, y)
        return scale * per_example_squared_norms(model, task, x, y, **gradient_options).mean().item()

    outputs = batched_outputs(model, task, x, device=device)
    if expectation == "exact":
        if loss != "cross_entropy" or outputs.dim() != 2:
            raise ValueError(
                f"expectation='exact' needs classification with N×C outputs, got loss {loss!r} and outputs of "
                f"shape {tuple(outputs.shape)}; use expectation='sample'"
            )
        num_classes = outputs.shape[1]
        every_class = torch.arange(num_classes, device=x.device).repeat(len(x))
        norms = per_example_squared_norms(
            model, task, x.repeat_interleave(num_classes, dim=0), every_class, **gradient_options
        ).reshape(len(x), num_classes)
        return (torch.softmax(outputs, dim=1).to(norms.device) * norms).sum(dim=1).mean().item()

    repeated_outputs = outputs.repeat_interleave(num_samples, dim=0)
    sampled = sample_model_labels(repeated_outputs, loss, sigma=sigma, generator=generator).to(x.device)
    norms = per_example_squared_norms(model, task, x.repeat_interleave(num_samples, dim=0), sampled, **gradient_options)
    return scale * norms.mean().item()
