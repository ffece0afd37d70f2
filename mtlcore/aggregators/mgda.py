"""MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the task gradients."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlcore.aggregators._qp import min_norm_in_hull, solve_or_uniform
from mtlcore.aggregators.base import WeightedAggregator, require

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def gradient_normalizers(G: Tensor, losses: Tensor | None, normalization: str) -> Tensor:
    """n_k of Sener & Koltun's `gradient_normalizers`: ĝ_k = g_k / n_k (n_k ≤ 0 is replaced by 1)."""
    norms = G.diagonal().clamp(min=0.0).sqrt()
    normalizers = {
        "none": torch.ones_like(norms),
        "l2": norms,
        "loss": losses,
        "loss+": None if losses is None else losses * norms,
    }[normalization]
    return torch.where(normalizers > 0, normalizers, 1.0)


class MGDA(WeightedAggregator):
    """α* = argmin_{α∈Δ} ‖Ĵᵀα‖² on normalised gradients ĝ_k = g_k / n_k.

    `apply_to="normalized"` (LibMTL): d = Σ α_k ĝ_k, i.e. weights α_k / n_k on the raw J; this
    keeps d non-conflicting. `apply_to="raw"` (Sener & Koltun's training script): d = Σ α_k g_k.
    The two coincide for normalization="none".
    """

    name = "mgda"
    defaults = {"normalization": "none", "apply_to": "normalized"}

    def _check_options(self, options):
        require(
            options["normalization"] in NORMALIZATIONS,
            f"{self.name}: normalization must be one of {NORMALIZATIONS}, got {options['normalization']!r}",
        )
        require(
            options["apply_to"] in ("normalized", "raw"),
            f"{self.name}: apply_to must be 'normalized' or 'raw', got {options['apply_to']!r}",
        )

    @property
    def needs_losses(self) -> bool:
        return self.options["normalization"] in ("loss", "loss+")

    def _weights(self, G, losses):
        normalizers = gradient_normalizers(G, losses, self.options["normalization"])
        G_hat = G / torch.outer(normalizers, normalizers)
        alpha = solve_or_uniform(self.name, lambda: min_norm_in_hull(G_hat), len(G))
        return alpha / normalizers if self.options["apply_to"] == "normalized" else alpha


class MGDAUB(MGDA):
    """MGDA-UB: the same weights computed from gradients w.r.t. the shared representation.

    The trainer passes J_repr (task gradients of the representation z, flattened over the batch)
    to `weights_from(J_repr, losses)` and applies Σ w_k g_k to the shared parameters, e.g. by
    backpropagating Σ w_k L_k. Called on a J of the shared parameters it behaves like MGDA.
    """

    name = "mgda_ub"
    jacobian_of = "representation"
