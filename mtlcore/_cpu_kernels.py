"""mtlcore's C++/AVX2 CPU kernels, built on first use with the machine's compiler (torch.utils.cpp_extension,
~50 s each, cached under ~/.cache/torch_extensions, one build per CPU model). Where one cannot be built (no
compiler, no AVX2/FMA, no ninja) its caller runs PyTorch's or numpy's ops instead and says so once."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

modules: dict[str, object] = {}  # name → the compiled module, or None once it could not be built (or is off)


def build(name: str, source: Path, switch: str, what: str, fallback: str, log: logging.Logger):
    """The compiled module `name` from `source`, built once per process; None where it cannot be built or the
    environment variable `switch` is 0. A failure is logged as "<what> could not be built (<error>); <fallback>"."""
    if name not in modules:
        modules[name] = None if os.environ.get(switch, "1") == "0" else _compile(name, source, what, fallback, log)
    return modules[name]


def cpu_id(cpuinfo: str | None = None) -> str:
    """A digest of this CPU's model and instruction-set flags (from /proc/cpuinfo, else the platform's name).

    It ends the compiled module's name, so that each CPU gets its own build folder: a cache shared between machines
    (a home directory on NFS, a copied ~/.cache) would otherwise load -march=native code built for another CPU,
    which can die of SIGILL (torch's cache is keyed by name, source and flags, and the flag says "native")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = f"{platform.processor()} {platform.machine()}"
    lines = sorted({line.strip() for line in cpuinfo.splitlines() if line.startswith(("model name", "flags"))})
    return hashlib.sha256("\n".join(lines or [cpuinfo]).encode()).hexdigest()[:12]


def _compile(name: str, source: Path, what: str, fallback: str, log: logging.Logger):
    try:
        # importing it warns that no CUDA runtime was found, which does not matter for a CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        return load(f"{name}_{cpu_id()}", [str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)  # torch's libgomp: one thread pool
    except Exception as error:
        log.warning("%s could not be built (%s); %s", what, str(error).splitlines()[0][:200], fallback)
        return None
