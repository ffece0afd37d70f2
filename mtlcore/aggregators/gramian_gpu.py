"""G = J Jᵀ in float64 for a J on a CUDA device, read once and never copied to float64: a Triton kernel.

Each program loads [K, 128]-column tiles of J, converts them to float64 in registers (a product of two float32
numbers is exact in float64) and accumulates its K×K share with a float64 dot; torch then sums the shares of the
fixed 8,192-column chunks. Like the rest of a CUDA run, G is the same bit for bit from run to run on one GPU model,
not across models (the order inside `tl.dot`, and torch's reduction, follow the hardware). For a 20 × 11.2 M J on
an H100 this took 0.53–0.56 ms, against 3.3–4.3 ms for torch's 32 MB float64 blocks and 1.5–1.6 ms for a float32
J @ Jᵀ (benchmarks/README.md).

Triton compiles the kernel on first use (cached under ~/.triton). Where Triton is missing, the kernel fails, J is
not float32 or float64 (Triton 3.6 failed to compile bfloat16's conversion on an H100), K is above MAX_TASKS (the
K×K float64 accumulator lives in registers) or MTLCORE_JACOBIAN_KERNELS=0, `gramian` returns None and the caller
takes torch's blocks.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from torch import Tensor

logger = logging.getLogger("mtlcore.aggregators")

MAX_TASKS = 64
CHUNK = 1 << 13  # columns per program: fixed, so the shares do not depend on the number of SMs
BLOCK = 128  # columns per tile (64 where K > 32, to keep the tile in registers)

DTYPES = (torch.float32, torch.float64)
_usable: bool | None = None  # None before the first check; False once Triton is missing, the kernel failed or is off


@functools.cache
def _kernel():
    """The jitted kernel, built once (raises ImportError without Triton)."""
    import triton
    import triton.language as tl

    # K and P only bound the masks: not specialised on, so the probe (jacobian_kernels) compiles the run's variant
    @triton.jit(do_not_specialize=["K", "P"])
    def gramian_kernel(J, shares, K, P, stride_k, stride_p,
                       KP: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        program = tl.program_id(0)
        rows = tl.arange(0, KP)
        row_offsets = rows.to(tl.int64)[:, None] * stride_k
        first = program.to(tl.int64) * (BLOCK * STEPS)
        acc = tl.zeros((KP, KP), dtype=tl.float64)
        for step in range(STEPS):
            columns = first + step * BLOCK + tl.arange(0, BLOCK)
            tile = tl.load(J + row_offsets + columns[None, :] * stride_p,
                           mask=(rows[:, None] < K) & (columns[None, :] < P), other=0.0)
            tile = tile.to(tl.float64)
            acc += tl.dot(tile, tl.trans(tile))
        tl.store(shares + program * KP * KP + rows[:, None] * KP + rows[None, :], acc)

    return gramian_kernel


def launch(J: Tensor) -> Tensor:
    """The float64 K×K Gramian on J's device (float32 or float64, any strides; K ≤ MAX_TASKS). Raises what Triton
    raises; `gramian` is the guarded entry point. Runs on a CPU tensor under TRITON_INTERPRET=1 (the tests)."""
    K, P = J.shape
    KP = max(16, 1 << (K - 1).bit_length())  # tl.dot needs power-of-two sides of at least 16
    block = BLOCK if KP <= 32 else BLOCK // 2
    programs = max(1, -(-P // CHUNK))
    shares = torch.empty(programs, KP, KP, dtype=torch.float64, device=J.device)
    # Triton launches on the current device: J's, also for a run on cuda:1
    with torch.cuda.device(J.device) if J.is_cuda else contextlib.nullcontext():
        _kernel()[(programs,)](J, shares, K, P, J.stride(0), J.stride(1), KP=KP, BLOCK=block, STEPS=CHUNK // block,
                               num_warps=4 if KP <= 32 else 8)
    return shares.sum(0)[:K, :K]


def probe(device: torch.device | str, num_tasks: int, num_columns: int) -> bool:
    """Whether the kernel compiles and runs for a run's J (num_tasks × num_columns, float32, contiguous): the probe
    has the same specialisation (row stride divisible by 16 or not; K and P are not specialised on)."""
    columns = 16 if num_columns % 16 == 0 else 17
    return gramian(torch.zeros(num_tasks, columns, device=device)) is not None


def available() -> bool:
    """Whether Triton can be imported and the kernel is not switched off (compiling it may still fail, on first
    use: `gramian` catches that)."""
    global _usable
    if _usable is None:
        _usable = os.environ.get("MTLCORE_JACOBIAN_KERNELS", "1") != "0"
        if _usable:
            try:
                _kernel()
            except Exception as error:  # ImportError, or a Triton without do_not_specialize
                logger.warning("the Triton Gramian kernel is unavailable (%s); using torch's float64 blocks", error)
                _usable = False
    return _usable


def gramian(J: Tensor) -> Tensor | None:
    """G = J Jᵀ (float64, on J's CUDA device), or None where the kernel does not apply (the caller's fallback)."""
    global _usable
    if not (J.device.type == "cuda" and J.dtype in DTYPES and 0 < J.shape[0] <= MAX_TASKS and J.shape[1] > 0
            and available()):
        return None
    try:
        return launch(J)
    except torch.OutOfMemoryError:  # transient, and torch's blocks need more memory than the shares
        raise
    except Exception as error:  # a compiler or driver failure: logged once, then torch's blocks for the run
        logger.warning("the Triton Gramian kernel failed (%s); using torch's float64 blocks",
                       str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        _usable = False
        return None
