"""Smooth Tchebycheff scalarisation (STCH, Lin et al. 2024) as LibMTL and the authors' MTL code apply it."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator, check_finite, check_number, require

LOG_EPS = 1e-20  # the authors' shift inside every log


class STCH(LossAggregator):
    """Epochs 0 … warmup_epochs − 1 train Σ log(L_k + 1e-20); epoch `warmup_epochs` trains the same while averaging
    each task's batch losses into the nadir point n; every later epoch trains

        K · μ · log Σ_k exp(ℓ_k / μ),  ℓ_k = log(L_k / n_k + 1e-20),

    the smooth (log-sum-exp) Tchebycheff scalarisation of the normalised log losses with equal preferences,
    scaled by K as in LibMTL. As μ → 0 it tends to K · max_k ℓ_k (Tchebycheff). The epoch count advances in
    `end_epoch`; the count, the nadir sums and n are state. `weights` are ∂combine/∂L_k.
    """

    name = "stch"
    defaults = {"mu": 1.0, "warmup_epochs": 4}  # LibMTL's STCH_mu and STCH_warmup_epoch
    state_attributes = ("epoch", "nadir_sum", "nadir_count", "nadir")

    def _check_options(self, options):
        check_number(self.name, options, "mu", 1e-12)
        check_number(self.name, options, "warmup_epochs", 0, integer=True)

    def _reset_state(self, num_tasks, device):
        self.epoch = 0
        self.nadir_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.nadir_count = 0
        self.nadir: torch.Tensor | None = None

    def end_epoch(self, epoch_mean_losses):
        require(self.num_tasks is not None, "stch: call reset(num_tasks) or combine() before end_epoch()")
        self.epoch += 1

    def _combine(self, losses, last_shared):
        warmup = self.options["warmup_epochs"]
        if self.epoch <= warmup:
            if self.epoch == warmup:
                self.nadir_sum += losses.detach().to("cpu", torch.float64)
                self.nadir_count += 1
            return torch.log(losses + LOG_EPS).sum(), 1.0 / (losses.detach().double() + LOG_EPS)
        if self.nadir is None:
            self.nadir = self.nadir_sum / self.nadir_count
            check_finite(self.name, self.nadir, "the nadir point (mean losses of the warm-up's last epoch)")
        nadir = self.nadir.to(losses)
        mu, K = self.options["mu"], len(losses)
        normalised = torch.log(losses / nadir + LOG_EPS)
        total = K * mu * torch.logsumexp(normalised / mu, dim=0)
        softmax = torch.softmax(normalised.detach().double() / mu, dim=0)
        return total, K * softmax / (losses.detach().double() + LOG_EPS * self.nadir)
