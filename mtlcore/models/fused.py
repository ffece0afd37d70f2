"""LeNet's first block, ReLU(max-pool₂(conv₅ₓ₅(x))) on 1-channel 28×28 images, as one CPU kernel (lenet_cpu.cpp).

PyTorch's CPU kernels for this block took ~35% of a LeNet training step, and the weight gradient of a
one-input-channel convolution ran on a single thread. The fused kernel computes the same function, with other
rounding (float32 sums in another order), and a weight gradient that does not depend on the thread count.

It is compiled on first use with the machine's C++ compiler (torch.utils.cpp_extension, ~50 s, cached under
~/.cache/torch_extensions). Where that fails (no compiler, no AVX2) the encoder uses PyTorch's kernels and says
so once. `MTLCORE_FUSED_LENET=0` turns it off. It is used only where it applies: on the CPU, float32,
inputs that need no gradient, and outside torch.func transforms (vmap'd per-example gradients take PyTorch's path).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_extension = None  # the compiled module, False once it failed, None before the first try


def extension():
    """The compiled kernel module, or None where it cannot be built (logged once)."""
    global _extension
    if _extension is None:
        if os.environ.get("MTLCORE_FUSED_LENET", "1") == "0":
            _extension = False
        else:
            try:
                # importing it warns that no CUDA runtime was found, which does not matter for a CPU kernel
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
                from torch.utils.cpp_extension import load

                _extension = load("mtlcore_lenet_cpu", [str(Path(__file__).with_name("lenet_cpu.cpp"))],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)  # torch's libgomp: one thread pool
            except Exception as error:  # no compiler, no AVX2/FMA, no ninja: PyTorch's kernels do the same
                log.warning("the fused LeNet CPU kernel could not be built (%s); using PyTorch's kernels "
                            "(about 1.3x slower training on the CPU, other rounding)", str(error).splitlines()[0][:200])
                _extension = False
    return _extension or None


def kernel_name() -> str:
    """What computes LeNet's first block on the CPU: recorded with every run (the rounding differs)."""
    return "fused-avx2" if extension() is not None else "pytorch"


def applies(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and tuple(x.shape[1:]) == (1, 28, 28) and tuple(conv.weight.shape[1:]) == (1, 5, 5)
            and conv.bias is not None and not x.requires_grad
            and not wrapped(x) and not wrapped(conv.weight) and not wrapped(conv.bias)
            and extension() is not None)


class ConvPoolReLU(torch.autograd.Function):
    """ReLU(max_pool2d(conv2d(x, weight, bias), 2)) with gradients for weight and bias (not for x)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        images = x.reshape(x.shape[0], 28, 28).contiguous()
        out, where = extension().forward(images, weight.detach().contiguous(), bias.detach().contiguous())
        ctx.save_for_backward(images, out, where, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        images, out, where, weight = ctx.saved_tensors
        weight_grad, bias_grad = extension().backward(grad, images, out, where, weight.shape[0])
        # in the parameter's own memory layout (channels-last in the trainer): fused optimizers assume it
        return None, torch.empty_like(weight).copy_(weight_grad), bias_grad


def _block2_applies(h: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return (h.device.type == "cpu" and h.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and tuple(h.shape[2:]) == (12, 12) and tuple(conv.weight.shape[2:]) == (5, 5) and conv.bias is not None
            and not wrapped(h) and not wrapped(conv.weight) and not wrapped(conv.bias) and extension() is not None)


class ConvDropoutPoolReLU(torch.autograd.Function):
    """ReLU(max_pool2d(dropout2d(conv2d(h, weight, bias)), 2)) whose backward uses the sparsity of its gradient.

    The forward is PyTorch's convolution; `scale` (N×C: 0 for a dropped map, 1/(1-p) for a kept one, 1 in eval
    mode) is Dropout2d's mask. The backward gets the gradient at the conv output from the max-pool's indices and
    the mask, and adds one patch per non-zero entry (lenet_cpu.cpp: block2_backward)."""

    @staticmethod
    def forward(ctx, h, weight, bias, scale):
        with torch.no_grad():
            conv = torch.nn.functional.conv2d(h, weight, bias) * scale[:, :, None, None]
            pooled, where = torch.nn.functional.max_pool2d(conv, 2, return_indices=True)
            out = torch.relu(pooled)
        ctx.save_for_backward(h, weight, scale, out, where)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, scale, out, where = ctx.saved_tensors
        grad_h, grad_w, grad_b = extension().block2_backward(grad, out, where, scale, h, weight)
        return (grad_h if ctx.needs_input_grad[0] else None, torch.empty_like(weight).copy_(grad_w), grad_b, None)


def conv_dropout_pool_relu(h: torch.Tensor, conv: torch.nn.Conv2d, dropout: torch.nn.Dropout2d) -> torch.Tensor:
    """LeNet's second block, ReLU(max-pool₂(Dropout2d(conv(h)))): the sparse-backward kernel where it applies."""
    if not _block2_applies(h, conv):
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
    if applies(x, conv):
        return ConvPoolReLU.apply(x, conv.weight, conv.bias)
    return torch.relu(torch.max_pool2d(conv(x), 2))
