"""The Gramian G = J Jᵀ of the task Jacobian, the input of every weighting (TorchJD's `compute_gramian`)."""
from __future__ import annotations

import torch
from torch import Tensor

# Entries of J converted to float64 at a time (a float64 copy of a large J would double its memory): cache-sized
# blocks on the CPU, larger ones on a GPU, where every block costs kernel launches.
BLOCK_CPU = 1 << 18
BLOCK_GPU = 1 << 22


def gramian(J: Tensor) -> Tensor:
    """G = J Jᵀ (K×K, float64, on J's device), its entries accumulated in float64 over column blocks of J.

    A product of two float32 (or lower-precision) entries is exact in float64, so only the float64 sums round,
    and G stays finite up to |J| ~ 1e150. NaN or inf in J shows in G (on its diagonal at least): callers check
    G's K×K entries instead of scanning J's K×P.
    """
    J = J.detach()
    num_tasks, num_columns = J.shape
    columns = max(1, (BLOCK_CPU if J.device.type == "cpu" else BLOCK_GPU) // max(num_tasks, 1))
    if num_columns <= columns:
        block = J.to(torch.float64)
        return block @ block.T
    G = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=J.device)
    for start in range(0, num_columns, columns):
        block = J[:, start : start + columns].to(torch.float64)
        G.addmm_(block, block.T)
        del block  # else the next block is built while this one is still held
    return G
