"""Where runs train: one choice for `mtlcore sweep`, `mtlcore batch` and the notebooks it executes.

==========================  =========================================================================================
spec                        where the runs train
==========================  =========================================================================================
``sequential``              in this process, one after another (the default)
``processes:N``             a Dask ``LocalCluster`` of N worker processes on this machine, one run at a time each, with
                            ``cores // N`` torch threads (2 workers on 2 cores: 1 thread each)
``tcp://HOST:PORT``         a running Dask scheduler and its workers (started by you, sharing the results folder)
``slurm:FILE`` / ``pbs:FILE``  a ``dask-jobqueue`` cluster described by a YAML file (see `JOBQUEUE_KEYS`): one job per
                            worker, each with its cores, memory, GPUs and walltime
==========================  =========================================================================================

`mtlcore batch --executor SPEC` starts the cluster once and hands its scheduler address to every notebook through
``$MTLCORE_EXECUTOR``; a notebook's `load_runs` reads that variable, so no notebook names an executor.

What changes the numbers, and what the run's identity (its content hash) holds:

* **Thread count.** CPU kernels split sums across threads, so a run trained with 1 thread and with 2 threads differ
  in the last bits (relative ~1e-7). The count is recorded in every run file (``torch_threads``) and is *not* part of
  the identity: a run trained on a cluster is reused by a book built on a laptop. With the same thread count a run is
  identical bit for bit wherever it trains (tested with a 2-worker cluster against a sequential run).
* **Device and kernels.** ``device`` is recorded and not hashed, like the thread count; CUDA runs use deterministic
  cuDNN kernels (recorded as ``cudnn_deterministic``), and the CPU's vector instruction set (``cpu_capability``) is
  recorded, since it selects different kernels too.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mtlcore.training.config import ConfigError, load_yaml

log = logging.getLogger(__name__)

ENV_VAR = "MTLCORE_EXECUTOR"
FORMS = ("sequential", "processes:N", "tcp://HOST:PORT", "slurm:FILE.yaml", "pbs:FILE.yaml")
# The keys of a jobqueue file; the values a cluster job gets when a key is left out.
JOBQUEUE_KEYS = {
    "jobs": 1,             # workers, one batch job each
    "cores": 4,            # CPU cores per job: the worker's torch threads
    "memory": "16GB",      # memory per job
    "gpus": 0,             # GPUs per job (SLURM --gres=gpu:N, PBS ngpus=N); a worker uses one run at a time
    "walltime": "04:00:00",
    "queue": None,         # partition (SLURM) or queue (PBS)
    "account": None,
    "python": None,        # the interpreter with mtlcore on the compute nodes (default: this one)
    "prologue": [],        # shell lines before the worker starts (module load ..., source venv/bin/activate)
    "extra_directives": [],  # more #SBATCH / #PBS lines, e.g. ["--constraint=a100"]
    "local_directory": None,  # worker scratch space on the node
}
CONNECT_TIMEOUT = 10  # seconds to reach a scheduler before giving up with an error


@dataclass(frozen=True)
class Executor:
    kind: str  # sequential | processes | scheduler | slurm | pbs
    workers: int = 1
    address: str = ""
    config_file: str = ""

    @classmethod
    def parse(cls, spec: "str | Executor | None" = None) -> "Executor":
        """`spec` (see the module table); None or "": ``$MTLCORE_EXECUTOR``, else sequential. The older names
        ``local`` (sequential) and ``dask`` (a local cluster, one worker per core) are still read."""
        if isinstance(spec, Executor):
            return spec
        text = (spec or os.environ.get(ENV_VAR) or "sequential").strip()
        if text in ("sequential", "local"):
            return cls("sequential")
        if text == "dask":
            return cls("processes", workers=os.cpu_count() or 1)
        match = re.fullmatch(r"processes:(\d+)", text)
        if match and int(match.group(1)) >= 1:
            return cls("processes", workers=int(match.group(1)))
        if re.fullmatch(r"(tcp|tls|ws|wss|inproc|ucx)://\S+", text):
            return cls("scheduler", address=text)
        match = re.fullmatch(r"(slurm|pbs):(.+)", text)
        if match:
            path = Path(match.group(2)).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"executor {text!r}: no cluster file {path}; write one with the keys "
                                  f"{sorted(JOBQUEUE_KEYS)} (see the README's GPU cluster section)")
            jobqueue_options(path)  # a bad file fails here, before anything runs
            return cls(match.group(1), config_file=str(path))
        raise ConfigError(f"executor {text!r} is not valid; use one of {list(FORMS)} "
                          "(N a number of worker processes, FILE a YAML file of cluster settings)")

    def __str__(self) -> str:
        return {"sequential": "sequential", "processes": f"processes:{self.workers}", "scheduler": self.address,
                }.get(self.kind, f"{self.kind}:{self.config_file}")

    @property
    def distributed(self) -> bool:
        return self.kind != "sequential"

    def torch_threads(self) -> int | None:
        """The torch threads of each worker (None: the workers keep theirs)."""
        if self.kind == "processes":
            return max(1, (os.cpu_count() or 1) // self.workers)
        if self.kind in ("slurm", "pbs"):
            return int(jobqueue_options(Path(self.config_file))["cores"])
        return None

    def client(self):
        """A `distributed.Client` on this executor's cluster, started once per process and closed at exit."""
        if not self.distributed:
            raise ValueError("the sequential executor has no Dask client")
        key = str(self)
        if key not in _CLIENTS:
            _CLIENTS[key] = _start(self)
        return _CLIENTS[key]


_CLIENTS: dict = {}


@atexit.register
def close_all() -> None:
    """Close the clusters this process started (their workers would otherwise outlive it, with warnings)."""
    while _CLIENTS:
        _, client = _CLIENTS.popitem()
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


def _quiet() -> None:
    if not log.isEnabledFor(logging.INFO):  # distributed logs every worker start at INFO
        logging.getLogger("distributed").setLevel(logging.WARNING)


def worker_environment(threads: int) -> dict:
    """The environment a worker process starts with: `threads` for every math library, and without Dask's default
    ``MALLOC_TRIM_THRESHOLD_=65536``, which returns freed memory to the system at once and made PyTorch's steps 2.5×
    slower here (each step's tensors then fault their pages in again)."""
    return {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def _start(executor: Executor):
    import dask
    from distributed import Client, LocalCluster

    _quiet()
    if executor.kind == "scheduler":
        try:
            client = Client(executor.address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as error:
            raise ConfigError(f"no Dask scheduler answered at {executor.address} within {CONNECT_TIMEOUT} s "
                              f"({type(error).__name__}). Start one there (`dask scheduler`, then `dask worker "
                              f"{executor.address}` on each machine) or check the address") from None
    elif executor.kind == "processes":
        with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environment(executor.torch_threads())}):
            cluster = LocalCluster(n_workers=executor.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
        client = Client(cluster)
    else:
        cluster = jobqueue_cluster(executor.kind, Path(executor.config_file))
        cluster.scale(jobs=int(jobqueue_options(Path(executor.config_file))["jobs"]))
        client = Client(cluster)
    from mtlcore.training._worker import WorkerSetup

    client.register_plugin(WorkerSetup(executor.torch_threads()), name="mtlcore-worker-setup")
    log.info("executor %s: Dask scheduler %s", executor, client.scheduler.address)
    return client


def jobqueue_options(path: Path) -> dict:
    """The cluster file's values over `JOBQUEUE_KEYS`' defaults; an unknown key or a bad value names the file."""
    content = load_yaml(path) or {}
    if not isinstance(content, dict):
        raise ConfigError(f"cluster file {path}: expected a mapping of {sorted(JOBQUEUE_KEYS)}")
    unknown = sorted(set(content) - set(JOBQUEUE_KEYS))
    if unknown:
        raise ConfigError(f"cluster file {path}: unknown key(s) {unknown}; valid keys: {sorted(JOBQUEUE_KEYS)}")
    options = {**JOBQUEUE_KEYS, **content}
    for key in ("jobs", "cores", "gpus"):
        value = options[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key == "gpus" else 1)):
            raise ConfigError(f"cluster file {path}: {key}={value!r} must be an integer >= {0 if key == 'gpus' else 1}")
    for key in ("prologue", "extra_directives"):
        if not (isinstance(options[key], list) and all(isinstance(line, str) for line in options[key])):
            raise ConfigError(f"cluster file {path}: {key} must be a list of strings")
    return options


def jobqueue_cluster(kind: str, path: Path):
    """The dask-jobqueue cluster of a cluster file (no job is submitted until it is scaled)."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"the {kind} executor needs dask-jobqueue: pip install 'mtlcore[dask]'") from None
    o = jobqueue_options(path)
    cores = o["cores"]
    prologue = [*o["prologue"], *(f"export {k}={v}" for k, v in worker_environment(cores).items())]
    # One Dask thread per worker, so a worker trains one run at a time on all the job's cores (and its GPU).
    # No nanny: the worker is the job's own process, with the job's environment (no malloc trimming, see
    # `worker_environment`), and the job ends when it does.
    common = {"cores": 1, "processes": 1, "nanny": False, "memory": o["memory"], "walltime": o["walltime"],
              "queue": o["queue"],
              "account": o["account"], "python": o["python"] or sys.executable, "job_script_prologue": prologue,
              "local_directory": o["local_directory"], "scheduler_options": {"dashboard_address": None}}
    if kind == "slurm":
        gres = [f"--gres=gpu:{o['gpus']}"] if o["gpus"] else []
        return dask_jobqueue.SLURMCluster(job_cpu=cores, job_extra_directives=gres + o["extra_directives"], **common)
    gpus = f":ngpus={o['gpus']}" if o["gpus"] else ""
    return dask_jobqueue.PBSCluster(resource_spec=f"select=1:ncpus={cores}:mem={o['memory']}{gpus}",
                                    job_extra_directives=o["extra_directives"], **common)


def job_script(spec: str) -> str:
    """The batch script a `slurm:`/`pbs:` executor submits per worker (to check a cluster file before using it)."""
    executor = Executor.parse(spec)
    if executor.kind not in ("slurm", "pbs"):
        raise ConfigError(f"executor {spec!r} submits no job script; give slurm:FILE or pbs:FILE")
    cluster = jobqueue_cluster(executor.kind, Path(executor.config_file))
    try:
        return cluster.job_script()
    finally:
        cluster.close()
