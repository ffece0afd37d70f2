"""The set-up of every Dask worker that trains runs (imported only where a cluster starts: Dask is optional)."""
from __future__ import annotations

from distributed import WorkerPlugin


class WorkerSetup(WorkerPlugin):
    """Each worker (also one that joins later) takes its torch thread count and, on a machine with several GPUs, the
    GPU of its worker number."""

    idempotent = True

    def __init__(self, threads: int | None):
        self.threads = threads

    def setup(self, worker) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if torch.cuda.device_count() > 1 and isinstance(worker.name, int):
            torch.cuda.set_device(worker.name % torch.cuda.device_count())
