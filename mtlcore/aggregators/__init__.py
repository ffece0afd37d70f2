"""Multi-task aggregators: gradient-level (act on the task Jacobian J or its Gramian) and loss-level.

``get(name, **options)`` builds one; ``available()`` lists the names; each method cites its paper below.

=================  ========  ============================================  ==========================  ===========================
name               kind      options (defaults)                            scale convention            reference
=================  ========  ============================================  ==========================  ===========================
uniform            gradient  reduction="sum" | "mean"                      d = Σ g (or (1/K) Σ g)      —
fixed              gradient  weights (required list)                       d = Σ w g as given          Paper B (EMA of SMTO weights)
mgda               gradient  normalization="none"|l2|loss|loss+,           α on the simplex (Σα = 1)   Sener & Koltun 2018
                             apply_to="normalized"|"raw"
mgda_ub            gradient  as mgda; J of the representation              as mgda                     Sener & Koltun 2018
pcgrad             gradient  reduction="sum"|"mean", generator             sum of projected g          Yu et al. 2020
cagrad             gradient  c=0.5, rescale=1 (0: none, 1: /(1+c²),        1/K + λw, then rescale      Liu et al. 2021
                             2: /(1+c))
nashmtl            gradient  max_norm=1.0, update_weights_every=1,         Gα = 1/α (‖d‖ = √K),        Navon et al. 2022
                             max_iter=100                                  clipped to max_norm
imtl_g             gradient  —                                             Σw = 1                      Liu et al. 2021
graddrop           gradient  leak=0.0, generator                           sum of masked g             Chen et al. 2020
gradvac            gradient  beta=0.5, generator                           sum of adjusted g           Wang et al. 2021
aligned_mtl        gradient  scale_mode="min"|median|rmse                  α = B·1 (p = 1)             Senushkin et al. 2023
upgrad             gradient  reg_eps=1e-4                                  mean of projections         Quinton & Rey 2024
dualproj           gradient  reg_eps=1e-4                                  projection of the mean      Quinton & Rey 2024
dbmtl              gradient  beta=0.9, beta_sigma=0.0, eps=1e-8            Σ (max‖ĝ‖/‖ĝ_k‖) ĝ_k        Lin et al. 2023
krum               gradient  n_byzantine=0, n_selected=1                   mean of the selected g      Blanchard et al. 2017
trimmed_mean       gradient  trim_number=1                                 coordinate-wise mean        Yin et al. 2018
config             gradient  —                                             ‖d‖ = Σ g_kᵀd̂               Liu et al. 2024 (ConFIG)
fairgrad           gradient  alpha=1.0, max_iter=100                       Gw = w^{−1/α}               Ban & Ji 2024
excess_mtl         gradient  robust_step_size=0.01                         Σw = K                      He et al. 2024
moco               gradient  beta=0.5, beta_sigma=0.5, gamma=0.1,          d = yᵀλ, Σλ = 1 (y: the     Fernando et al. 2023
                             gamma_sigma=0.5, rho=0.0                      tracked g rescaled to L_k)
cr_mogm            gradient  base="mgda", base_options={}, alpha=0.9       the base's (EMA of its w)   Zhou et al. 2022
modo               gradient  gamma=1e-3, rho=0.1 (3 batches a step)        d = J_ζᵀλ, Σλ = 1           Chen et al. 2023
sdmgrad            gradient  lamda=0.3, lr=10.0, momentum=0.5, n_iter=20   (w + λ/K)/(1 + λ), Σ = 1    Xiao et al. 2023
                             (3 batches a step)
gradnorm           loss      alpha=1.5, lr=0.025 (internal Adam)           Σw = K                      Chen et al. 2018
uncertainty        loss      init=0.0 (s = log σ²)                         ½e^{−s} L + ½s              Kendall et al. 2018
dwa                loss      temperature=2.0                               Σλ = K                      Liu et al. 2019
rlw                loss      generator                                     Σw = 1                      Lin et al. 2022
imtl_l             loss      init=0.0                                      e^{s} L − s                 Liu et al. 2021
famo               loss      gamma=1e-3, lr=0.025, eps=1e-8                Σ z log L / c (Σ eff. w=1)  Liu et al. 2023
scale_invariant    loss      eps=1e-8                                      Σ log(L + ε)                —
gls                loss      —                                             (Π L_k)^{1/K}               Chennupati et al. 2019
stch               loss      mu=1.0, warmup_epochs=4                       K μ logΣexp(log(L/n)/μ)     Lin et al. 2024
pbi                loss      preference=None (equal), theta=5.0            d₁ + θd₂ (Σ w L, w = ∇)     Zhang & Li 2007
=================  ========  ============================================  ==========================  ===========================

How a gradient-level method computes d (TorchJD's split)
--------------------------------------------------------
* ``WeightedAggregator`` (every gradient-level method but graddrop, dbmtl, trimmed_mean, excess_mtl, moco, modo
  and sdmgrad):
  ``G = gramian(J)`` from ``mtlcore.aggregators.gramian`` (K×K, float64 sums of J's entries, in column blocks on
  J's device), then ``w = agg.weighting(G, losses)`` (a float64 CPU tensor, computed on the K×K problem; the
  losses only where ``agg.needs_losses``), then ``d = Jᵀw`` by ``torch.mv`` in J's dtype on J's device.
  ``weighting`` is the method as a function of the Gramian: a Gramian obtained without forming J feeds the same
  code. uniform and fixed skip G: their w is known in advance.
* graddrop, dbmtl, trimmed_mean and moco act on J itself; their ``weights`` are NaN (no w with d = Jᵀw).
  excess_mtl reads J for its running sums of squared gradients and reports its w (d = Jᵀw).
* modo and sdmgrad need three independent batches a step (``agg.batches_per_step``):
  ``d = agg.aggregate_batches([J_ζ, J_ξ, J_ξ'], losses)`` learns w from J_ξ J_ξ'ᵀ and returns J_ζᵀw; ``agg(J)``
  alone is refused. ``JacobianUpdate`` draws the two extra batches from the batch source the trainer gives it.

How the trainer uses them
-------------------------
* Once: ``agg = get(name, **options)``; ``agg.reset(K, device)``; add ``agg.parameters()`` (learnable
  s of uncertainty / imtl_l, else empty) to the model's optimiser; ``agg.set_generator(g)`` for
  randomised methods (``agg.randomised``), with g on ``agg.generator_device(device)``: the CPU for
  pcgrad, gradvac and rlw, whose draws are used on the host, else the run's device.
* Gradient-level (``agg.kind == "gradient"``): ``J = task_jacobian(losses, params)`` with params the
  shared parameters (``agg.jacobian_of == "shared"``); ``d = agg(J, losses.detach())``; backpropagate
  ``losses.sum()`` for the heads and overwrite the shared gradients with
  ``unflatten_into_grads(d, shared_params)``. For ``jacobian_of == "representation"`` (mgda_ub) take J
  w.r.t. the shared representation z, ``w = agg.weights_from(J_repr, losses)`` (``weighting(gramian(J_repr),
  losses)``) and backpropagate ``(w * losses).sum()``.
* Loss-level (``agg.kind == "loss"``): ``agg.combine(losses, last_shared=model.last_shared_layer())``
  and backward on it (``last_shared`` is only used by gradnorm, ``agg.needs_last_shared``).
* Hooks: if ``agg.needs_losses_after`` (famo), after ``optimizer.step()`` recompute the same batch's
  losses under ``torch.no_grad()`` and call ``agg.after_step(losses_after)``. At the end of every
  epoch call ``agg.end_epoch(epoch_mean_train_losses)`` (dwa and stch use it; others ignore it).
  For modo and sdmgrad the update rule draws ``batches_per_step − 1`` more batches a step from the batch source
  the trainer gives it once (``Update.set_batch_source``, see ``mtlcore.training.updates``).
* ``agg.weights``: the K effective task weights of the last step (d = Jᵀw, or the weights on the
  loss gradients), float64 on the CPU; NaN where the method has none (graddrop, dbmtl,
  trimmed_mean, moco).
* NaN/inf in J raise ``NonFiniteGradientError`` (a FloatingPointError): stop the run as diverged. They are
  caught where they show: in G (a K×K check instead of K×P), in d for uniform and fixed, in J itself for
  graddrop, dbmtl, trimmed_mean, excess_mtl and moco. So do NaN/inf losses for the methods that read them
  (``agg.needs_losses``: dbmtl, moco, mgda with loss normalisation, every loss-level method); the others ignore
  the losses (the trainer checks them).
  A K×K solver that fails logs a warning on ``mtlcore.aggregators`` and uses the uniform mean weights
  1/K for that step (nashmtl keeps its previous α instead, as its authors' code does).
* ``agg.state_dict()`` / ``agg.load_state_dict(state)`` checkpoint the method's state (with a randomised
  method's generator state, so a resumed run continues its draws); ``agg.options``
  holds the resolved options.
"""
from __future__ import annotations

from typing import Any

from mtlcore.aggregators.aligned_mtl import AlignedMTL
from mtlcore.aggregators.base import (
    Aggregator,
    GradientAggregator,
    LossAggregator,
    NonFiniteGradientError,
    WeightedAggregator,
)
from mtlcore.aggregators.cagrad import CAGrad
from mtlcore.aggregators.conflict_free import ConFIG
from mtlcore.aggregators.cr_mogm import CRMOGM
from mtlcore.aggregators.dbmtl import DBMTL
from mtlcore.aggregators.dualproj import DualProj
from mtlcore.aggregators.dwa import DWA
from mtlcore.aggregators.excess_mtl import ExcessMTL
from mtlcore.aggregators.fairgrad import FairGrad
from mtlcore.aggregators.famo import FAMO
from mtlcore.aggregators.gls import GLS
from mtlcore.aggregators.graddrop import GradDrop
from mtlcore.aggregators.gradnorm import GradNorm
from mtlcore.aggregators.gradvac import GradVac
from mtlcore.aggregators.imtl_g import IMTLG
from mtlcore.aggregators.imtl_l import IMTLL
from mtlcore.aggregators.jacobian import set_grad, task_jacobian, unflatten_into_grads
from mtlcore.aggregators.krum import Krum
from mtlcore.aggregators.mgda import MGDA, MGDAUB
from mtlcore.aggregators.moco import MoCo
from mtlcore.aggregators.modo import MoDo
from mtlcore.aggregators.nashmtl import NashMTL
from mtlcore.aggregators.pbi import PBI
from mtlcore.aggregators.pcgrad import PCGrad
from mtlcore.aggregators.rlw import RLW
from mtlcore.aggregators.scale_invariant import ScaleInvariant
from mtlcore.aggregators.sdmgrad import SDMGrad
from mtlcore.aggregators.stch import STCH
from mtlcore.aggregators.trimmed_mean import TrimmedMean
from mtlcore.aggregators.uncertainty import Uncertainty
from mtlcore.aggregators.uniform import Fixed, Uniform
from mtlcore.aggregators.upgrad import UPGrad

_METHODS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (
        Uniform, Fixed, MGDA, MGDAUB, PCGrad, CAGrad, NashMTL, IMTLG, GradDrop, GradVac, AlignedMTL,
        UPGrad, DualProj, DBMTL, GradNorm, Uncertainty, DWA, RLW, IMTLL, FAMO, ScaleInvariant,
        Krum, TrimmedMean, ConFIG, FairGrad, ExcessMTL, MoCo, CRMOGM, MoDo, SDMGrad, GLS, STCH, PBI,
    )
}


def available() -> list[str]:
    """Names accepted by `get`, sorted."""
    return sorted(_METHODS)


def get(name: str, **options: Any) -> Aggregator:
    """A new aggregator `name` with `options` (unknown or bad options raise ValueError)."""
    if name not in _METHODS:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {', '.join(available())}")
    return _METHODS[name](**options)


__all__ = [
    "Aggregator", "GradientAggregator", "LossAggregator", "NonFiniteGradientError", "WeightedAggregator",
    "available", "get", "set_grad", "task_jacobian", "unflatten_into_grads",
]
