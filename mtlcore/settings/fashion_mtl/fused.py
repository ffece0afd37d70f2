"""The `lenet_fused` model's kernels: LeNet's two conv blocks on the CPU in C++/AVX2 (lenet_cpu.cpp), with
PyTorch's ops as the fallback.

Block 1, ReLU(max-pool₂(conv₅ₓ₅(x))) on 1-channel 28×28 images, runs as one kernel, forward and backward. Block 2,
ReLU(max-pool₂(Dropout2d(conv₅ₓ₅(h)))) on 12×12 maps, keeps PyTorch's forward and gets a backward that uses the
sparsity of its gradient. With PyTorch's kernels these blocks take most of a training step on the CPU (block 1's
weight gradient runs on one thread); the kernels compute the same functions with other float32 rounding, the same
dropout masks, and weight gradients that do not depend on the thread count.

They are compiled on first use with the machine's C++ compiler and ninja (torch.utils.cpp_extension, cached under
~/.cache/torch_extensions, one build per CPU model). Where that fails (no compiler, no AVX2) the encoder uses PyTorch's ops and says so
once. They are used only where they apply: on the CPU, float32, plain 5×5
convolutions (stride 1, no padding, dilation or groups), outside autocast, torch.func transforms and forward-mode
AD (vmap'd per-example gradients take PyTorch's path), block 1 only for inputs that need no gradient, block 2
only while gradients are recorded (evaluation has nothing to gain). Under create_graph (second derivatives) the
backward recomputes the block with PyTorch's ops, so it is differentiable. With a NaN or inf input the weight
gradients have NaN in other entries than PyTorch's dense backward gives (the run has diverged either way).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch
from torch.autograd import forward_ad

log = logging.getLogger(__name__)

EXTENSION = "mtlcore_lenet_cpu"
_SOURCE = Path(__file__).with_name("lenet_cpu.cpp")
modules: dict[str, object] = {}  # built once per process: the compiled module, or None where it could not be built


def extension():
    """The compiled kernel module, or None where it cannot be built (logged once)."""
    if EXTENSION not in modules:
        modules[EXTENSION] = _compile(EXTENSION, _SOURCE)
    return modules[EXTENSION]


def kernel_name() -> str:
    """What computes LeNet's conv blocks on the CPU: recorded with every run of `lenet_fused` (the rounding of the
    kernel and of PyTorch's fallback differ)."""
    return "fused-avx2" if extension() is not None else "pytorch"


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


def _compile(name: str, source: Path):
    try:
        # importing it warns that no CUDA runtime was found, which does not matter for a CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        # torch runs ninja from PATH: the one installed beside this interpreter counts even in a venv not activated
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return load(f"{name}_{cpu_id()}", [str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)  # torch's libgomp: one thread pool
    except Exception as error:
        log.warning("the fused LeNet CPU kernel could not be built (%s); using PyTorch's kernels (slower training on "
                    "the CPU, other rounding)", str(error).splitlines()[0][:200])
        return None


def _plain(*tensors: torch.Tensor) -> bool:
    """No torch.func transform (vmap, grad, jacrev) and no forward-mode AD on these: the kernels have neither."""
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) or forward_ad.unpack_dual(t).tangent is not None
                   for t in tensors)


def _plain_conv(conv: torch.nn.Conv2d) -> bool:
    """A 5×5 convolution with stride 1, no padding, no dilation, one group and a bias, in float32."""
    return (tuple(conv.weight.shape[2:]) == (5, 5) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.bias is not None and conv.weight.dtype == torch.float32)


def _cpu_float32(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _block1_ops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.max_pool2d(torch.nn.functional.conv2d(x, weight, bias), 2))


def _block2_ops(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Block 2 with Dropout2d's mask given as `scale` (N×C: 0 for a dropped map, 1/(1-p) for a kept one)."""
    return torch.relu(torch.max_pool2d(torch.nn.functional.conv2d(h, weight, bias) * scale[:, :, None, None], 2))


def _block1_applies(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    return (_cpu_float32(x) and _plain_conv(conv) and tuple(x.shape[1:]) == (1, 28, 28) and conv.in_channels == 1
            and not x.requires_grad and _plain(x, conv.weight, conv.bias) and extension() is not None)


class ConvPoolReLU(torch.autograd.Function):
    """ReLU(max_pool2d(conv2d(x, weight, bias), 2)) with gradients for weight and bias (not for x)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        images = x.reshape(x.shape[0], 28, 28).contiguous()
        out, where = extension().forward(images, weight.detach().contiguous(), bias.detach().contiguous())
        ctx.save_for_backward(images, out, where, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        images, out, where, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through PyTorch's ops
            with torch.enable_grad():
                again = _block1_ops(images[:, None], weight, bias)
                return None, *torch.autograd.grad(again, [weight, bias], grad, create_graph=True)
        weight_grad, bias_grad = extension().backward(grad, images, out, where)
        # in the parameter's own memory layout (channels-last in the trainer): fused optimizers assume it
        return None, torch.empty_like(weight).copy_(weight_grad), bias_grad


def _block2_applies(h: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    return (_cpu_float32(h) and _plain_conv(conv) and tuple(h.shape[2:]) == (12, 12)
            and _plain(h, conv.weight, conv.bias) and extension() is not None)


class ConvDropoutPoolReLU(torch.autograd.Function):
    """ReLU(max_pool2d(dropout2d(conv2d(h, weight, bias)), 2)) whose backward uses the sparsity of its gradient.

    The forward is PyTorch's (`_block2_ops`, `scale` as there, 1 in eval mode). The backward gets the gradient at
    the conv output from the max-pool's indices and the mask, and adds one patch per non-zero entry
    (lenet_cpu.cpp: block2_backward)."""

    @staticmethod
    def forward(ctx, h, weight, bias, scale):
        with torch.no_grad():
            conv = torch.nn.functional.conv2d(h, weight, bias) * scale[:, :, None, None]
            pooled, where = torch.nn.functional.max_pool2d(conv, 2, return_indices=True)
            out = torch.relu(pooled)
        ctx.save_for_backward(h, weight, bias, scale, out, where)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, scale, out, where = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through PyTorch's ops
            with torch.enable_grad():
                inputs = [h, weight, bias] if ctx.needs_input_grad[0] else [weight, bias]
                grads = torch.autograd.grad(_block2_ops(h, weight, bias, scale), inputs, grad, create_graph=True)
            return (*grads, None) if ctx.needs_input_grad[0] else (None, *grads, None)
        grad_h, grad_w, grad_b = extension().block2_backward(grad, out, where, scale, h, weight)
        return (grad_h if ctx.needs_input_grad[0] else None, torch.empty_like(weight).copy_(grad_w), grad_b, None)


def conv_dropout_pool_relu(h: torch.Tensor, conv: torch.nn.Conv2d, dropout: torch.nn.Dropout2d) -> torch.Tensor:
    """LeNet's second block, ReLU(max-pool₂(Dropout2d(conv(h)))): the sparse-backward kernel where it applies."""
    if not torch.is_grad_enabled() or not _block2_applies(h, conv):  # only its backward is the kernel's
        return torch.relu(torch.max_pool2d(dropout(conv(h)), 2))
    N, C = h.shape[0], conv.weight.shape[0]
    if dropout.training and dropout.p > 0:
        # Dropout2d's own draw: one Bernoulli(1 - p) per map, scaled by 1/(1 - p)
        scale = torch.empty(N, C, dtype=h.dtype).bernoulli_(1 - dropout.p).div_(1 - dropout.p) if dropout.p < 1 \
            else torch.zeros(N, C, dtype=h.dtype)
    else:
        scale = torch.ones(N, C, dtype=h.dtype)
    return ConvDropoutPoolReLU.apply(h, conv.weight, conv.bias, scale)


def conv_pool_relu(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """LeNet's first block: the fused kernel where it applies, else PyTorch's three ops."""
    if _block1_applies(x, conv):
        return ConvPoolReLU.apply(x, conv.weight, conv.bias)
    return torch.relu(torch.max_pool2d(conv(x), 2))
