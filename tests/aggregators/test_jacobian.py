"""The task Jacobian J and writing an update back into `.grad` (mtlcore/aggregators/jacobian.py)."""
from __future__ import annotations

import pytest
import torch

from mtlcore.aggregators import set_grad, task_jacobian, unflatten_into_grads


def _losses_and_params():
    torch.manual_seed(0)
    layer, head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
    unused = torch.nn.Parameter(torch.ones(2))
    outputs = head(torch.tanh(layer(torch.randn(5, 4))))
    losses = torch.stack([outputs[:, k].square().mean() for k in range(3)])
    return losses, [*layer.parameters(), unused]


def _loop_jacobian(losses, params):
    rows = []
    for k in range(len(losses)):
        grads = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 10])
def test_task_jacobian_equals_loop(chunk_size):
    losses, params = _losses_and_params()
    expected = _loop_jacobian(losses, params)
    J = task_jacobian(losses, params, chunk_size=chunk_size)
    torch.testing.assert_close(J, expected)
    assert (J[:, -2:] == 0).all()  # the unused parameter


def test_task_jacobian_by_a_loop_of_backward_passes():
    losses, params = _losses_and_params()
    torch.testing.assert_close(task_jacobian(list(losses), params, method="loop"), _loop_jacobian(losses, params))
    with pytest.raises(ValueError, match="method='both'; use 'batched' or 'loop'"):
        task_jacobian(losses, params, method="both")


def test_task_jacobian_falls_back_to_loop(monkeypatch):
    losses, params = _losses_and_params()
    expected = _loop_jacobian(losses, params)
    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("batching rule not implemented")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    torch.testing.assert_close(task_jacobian(losses, params, chunk_size=2, retain_graph=False), expected)


def test_unflatten_into_grads_sets_and_accumulates():
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))]
    d = torch.arange(7.0)
    unflatten_into_grads(d, params)
    torch.testing.assert_close(params[0].grad, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    unflatten_into_grads(d, params, accumulate=True)
    torch.testing.assert_close(params[1].grad, torch.tensor([8.0, 10.0, 12.0]))
    unflatten_into_grads(d, params)
    torch.testing.assert_close(params[1].grad, torch.tensor([4.0, 5.0, 6.0]))
    with pytest.raises(ValueError, match="7 entries"):
        unflatten_into_grads(torch.ones(6), params)


def test_unflatten_into_grads_keeps_the_parameters_memory_layout():
    """A grad in another layout than its channels-last parameter: fused optimizers raise on CUDA and, on the CPU,
    apply it to the wrong entries (the last lines fail there without the layout copy)."""
    p = torch.nn.Parameter(torch.zeros(4, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    d = torch.arange(float(p.numel()))
    unflatten_into_grads(d, [p])
    assert p.grad.stride() == p.stride()
    torch.testing.assert_close(p.grad, d.view(4, 3, 5, 5))
    optimizer = torch.optim.SGD([p], lr=1.0, momentum=0.9, fused=True)
    optimizer.step()
    torch.testing.assert_close(p.detach(), -d.view(4, 3, 5, 5))


def test_set_grad_shares_the_tensor_only_when_the_layout_agrees_and_no_copy_is_asked():
    p = torch.nn.Parameter(torch.zeros(3))
    g = torch.ones(3)
    set_grad(p, g)
    assert p.grad is g
    set_grad(p, g, copy=True)
    assert p.grad is not g and torch.equal(p.grad, g)
    set_grad(p, g.double())
    assert p.grad.dtype == torch.float32
