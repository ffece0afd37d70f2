"""mtlcore's C++/AVX2 CPU kernels, built on first use with the machine's compiler (torch.utils.cpp_extension,
~50 s each, cached under ~/.cache/torch_extensions). Where one cannot be built (no compiler, no AVX2/FMA, no
ninja) its caller runs PyTorch's or numpy's ops instead and says so once."""
from __future__ import annotations

import logging
import os
from pathlib import Path

modules: dict[str, object] = {}  # name → the compiled module, or None once it could not be built (or is off)


def build(name: str, source: Path, switch: str, what: str, fallback: str, log: logging.Logger):
    """The compiled module `name` from `source`, built once per process; None where it cannot be built or the
    environment variable `switch` is 0. A failure is logged as "<what> could not be built (<error>); <fallback>"."""
    if name not in modules:
        modules[name] = None if os.environ.get(switch, "1") == "0" else _compile(name, source, what, fallback, log)
    return modules[name]


def _compile(name: str, source: Path, what: str, fallback: str, log: logging.Logger):
    try:
        # importing it warns that no CUDA runtime was found, which does not matter for a CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        return load(name, [str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)  # torch's libgomp: one thread pool
    except Exception as error:
        log.warning("%s could not be built (%s); %s", what, str(error).splitlines()[0][:200], fallback)
        return None
