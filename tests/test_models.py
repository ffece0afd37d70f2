"""FashionMTL's LeNet models (paper A, Appendix A): `lenet` (PyTorch's ops) and `lenet_fused` (the same network with
its conv blocks on the fused CPU kernels of `mtlcore/settings/fashion_mtl/fused.py`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlcore import settings
from mtlcore.settings.fashion_mtl import fused
from mtlcore.settings.fashion_mtl.model import LeNetEncoder, lenet, lenet_fused
from mtlcore.training import RunConfig


def test_lenet_shapes_and_parameter_count():
    model = lenet(["a", "b"])
    z = model.encoder(torch.zeros(7, 1, 28, 28))
    assert z.shape == (7, 50)
    assert model(torch.zeros(7, 1, 28, 28), "b").shape == (7, 10)
    # conv1 10·25+10, conv2 20·10·25+20, fc 320·50+50  (the flatten is 20·4·4 = 320)
    assert sum(p.numel() for p in model.shared_parameters()) == 260 + 5020 + 16050
    assert sum(p.numel() for p in model.task_parameters("a")) == 50 * 10 + 10
    assert [p.shape for p in model.last_shared_layer()] == [torch.Size([50, 320]), torch.Size([50])]
    assert model.tasks == ["a", "b"] and not model.encoder.fused and model.encoder.dropout.p == 0.5
    assert lenet(["a"], dropout=0.2).encoder.dropout.p == 0.2


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid models: \['lenet', 'lenet_fused'\]"):
        settings.get("fashion_mtl").build_model("resnet999", ["fashion1"])


def test_runs_of_lenet_and_lenet_fused_have_different_content_hashes():
    """They compute the same function with other float32 rounding, so their runs are not interchangeable; the
    default model spelled out is the same run."""
    base = {"setting": "fashion_mtl", "tasks": ["fashion1", "fashion2"]}
    default, plain, fused_run = (RunConfig.from_dict({**base, **model}).content_hash()
                                 for model in ({}, {"model": "lenet"}, {"model": "lenet_fused"}))
    assert default == plain != fused_run
    assert RunConfig.from_dict({**base, "model": "lenet_fused", "model_options": {"dropout": 0.5}}).content_hash() \
        == fused_run


# --- the fused CPU kernels of LeNet's conv blocks (mtlcore/settings/fashion_mtl/fused.py) ----------------------
@pytest.fixture
def kernel():
    if fused.extension() is None:
        pytest.skip("the fused LeNet kernel cannot be built here (no C++ compiler or no AVX2)")
    return fused


def switch_off_kernel(monkeypatch) -> None:
    """The compiled extension reads as unavailable: the encoder takes PyTorch's path."""
    monkeypatch.setitem(fused.modules, fused.EXTENSION, None)


def _reference(x, conv):
    return F.relu(F.max_pool2d(F.conv2d(x, conv.weight, conv.bias), 2))


def _images(n: int, seed: int) -> torch.Tensor:
    """Random images with flat background (ties in every pooling window there) and some exact zeros after ReLU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 28, 28), -0.4)
    x[:, :, 6:22, 4:20] = torch.randn(n, 1, 16, 16, generator=g)
    return x


def _twins(dropout: float):
    """`lenet` and `lenet_fused` with the same weights, channels-last as the trainer puts them."""
    torch.manual_seed(0)
    plain = lenet(["a", "b"], dropout=dropout)
    twin = lenet_fused(["a", "b"], dropout=dropout)
    twin.load_state_dict(plain.state_dict())
    return [m.to(memory_format=m.memory_format) for m in (plain, twin)]


def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    calls = {"block1": 0, "block2": 0}
    for block, function in (("block1", fused.ConvPoolReLU), ("block2", fused.ConvDropoutPoolReLU)):
        def counted(*args, block=block, apply=function.apply):
            calls[block] += 1
            return apply(*args)

        monkeypatch.setattr(function, "apply", counted)
    return calls


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lenet_and_lenet_fused_compute_the_same_function(kernel, monkeypatch, mode):
    """Outputs and parameter gradients of both models agree up to float32 rounding, with both kernels in use (block 2's
    only under autograd); in training mode one seed gives both the same dropout masks."""
    plain, twin = _twins(dropout=0.5)
    assert not plain.encoder.fused and twin.encoder.fused
    x = _images(32, 6)
    calls = _count_kernel_calls(monkeypatch)
    results = []
    for model in (plain, twin):
        model.train(mode == "train")
        torch.manual_seed(1)
        outputs = {task: model(x, task) for task in model.tasks}
        loss = sum(out.square().sum() for out in outputs.values())
        results.append((outputs, torch.autograd.grad(loss, list(model.parameters()))))
        if model is plain:
            assert calls == {"block1": 0, "block2": 0}
    assert calls == {"block1": 2, "block2": 2}  # the fused model's two heads, one encoder pass each; none for lenet
    (ours_out, ours_grads), (theirs_out, theirs_grads) = results[1], results[0]
    for task in plain.tasks:
        torch.testing.assert_close(ours_out[task], theirs_out[task], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    with torch.no_grad():  # evaluation: block 1's kernel alone
        torch.testing.assert_close(twin.eval()(x, "a"), plain.eval()(x, "a"), rtol=1e-5, atol=1e-5)


def test_lenet_fused_records_what_computes_its_conv_blocks(kernel):
    model = lenet_fused(["a"])
    assert model.describe(torch.device("cpu")) == {"lenet_kernel": "fused-avx2"}
    assert model.describe(torch.device("cuda")) == {"lenet_kernel": "pytorch"}  # the kernel runs on the CPU only
    assert lenet(["a"]).describe(torch.device("cpu")) == {}
    assert not hasattr(lenet(["a"]), "info")


@pytest.mark.parametrize("n", [1, 17, 40])
def test_fused_block_equals_pytorchs_ops(kernel, n):
    """Forward and the weight/bias gradients against conv2d → max_pool2d → relu, with ties in the windows (the
    gradient must go to the first maximum, as PyTorch's max-pool sends it)."""
    torch.manual_seed(n)
    conv = torch.nn.Conv2d(1, 10, 5)
    x = _images(n, n)
    grad_out = torch.randn(n, 10, 12, 12)
    ours = kernel.ConvPoolReLU.apply(x, conv.weight, conv.bias)
    theirs = _reference(x, conv)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(torch.autograd.grad(ours, [conv.weight, conv.bias], grad_out),
                    torch.autograd.grad(theirs, [conv.weight, conv.bias], grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_fused_block_routes_ties_and_nan_as_pytorch(kernel):
    conv = torch.nn.Conv2d(1, 3, 5)
    x = torch.full((2, 1, 28, 28), 0.25)  # every window a four-way tie: the gradient goes to its top-left entry
    x[1, 0, 10, 10] = float("nan")
    grad_out = torch.randn(2, 3, 12, 12)
    ours, theirs = kernel.ConvPoolReLU.apply(x, conv.weight, conv.bias), _reference(x, conv)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs)) and torch.isnan(ours).any()
    finite = ~torch.isnan(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])
    a = torch.autograd.grad(kernel.ConvPoolReLU.apply(x[:1], conv.weight, conv.bias), [conv.weight], grad_out[:1])[0]
    b = torch.autograd.grad(_reference(x[:1], conv), [conv.weight], grad_out[:1])[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_weight_gradient_does_not_depend_on_the_thread_count(kernel):
    conv = torch.nn.Conv2d(1, 10, 5)
    x, grad_out = _images(70, 3), torch.randn(70, 10, 12, 12)
    threads, grads = torch.get_num_threads(), []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = kernel.ConvPoolReLU.apply(x, conv.weight, conv.bias)
            grads.append((out, *torch.autograd.grad(out, [conv.weight, conv.bias], grad_out)))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_the_encoder_takes_pytorchs_path_where_the_kernel_does_not_apply(kernel):
    """Inputs that need a gradient, and torch.func transforms (vmap'd per-example gradients), use PyTorch's ops."""
    torch.manual_seed(0)
    encoder = LeNetEncoder(dropout=0.0, fused=True)
    x = _images(4, 1)
    assert kernel._block1_applies(x, encoder.conv1) and not kernel._block1_applies(x.requires_grad_(), encoder.conv1)
    (input_grad,) = torch.autograd.grad(encoder(x).sum(), [x])  # PyTorch's path gives the input gradient
    assert input_grad.abs().sum() > 0
    params = dict(encoder.named_parameters())

    def loss(p, image):
        return torch.func.functional_call(encoder, p, (image[None],)).square().sum()

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.detach())
    for i in range(len(x)):
        single = torch.autograd.grad(loss(params, x[i].detach()), list(params.values()))
        for name, g in zip(params, single):
            torch.testing.assert_close(per_example[name][i], g, rtol=1e-4, atol=1e-6)


def test_without_the_kernel_the_encoder_falls_back_and_says_so(caplog, no_compiler):
    with caplog.at_level("WARNING", logger="mtlcore.settings.fashion_mtl.fused"):
        assert fused.kernel_name() == "pytorch"
    assert "could not be built (Error building extension: g++ not found); using PyTorch's kernels" in caplog.text
    conv = torch.nn.Conv2d(1, 10, 5)
    x = _images(3, 2)
    torch.testing.assert_close(fused.conv_pool_relu(x, conv), _reference(x, conv))
    # the model still builds, records the fallback with its runs, and computes lenet's function with PyTorch's ops
    torch.manual_seed(0)
    plain = lenet(["a"], dropout=0.0)
    twin = lenet_fused(["a"], dropout=0.0)
    assert twin.describe(torch.device("cpu")) == {"lenet_kernel": "pytorch"}
    twin.load_state_dict(plain.state_dict())
    assert torch.equal(twin(x, "a"), plain(x, "a"))


def _block2_reference(h, conv, scale):
    return F.relu(F.max_pool2d(F.conv2d(h, conv.weight, conv.bias) * scale[:, :, None, None], 2))


@pytest.mark.parametrize("n", [1, 17, 40])
def test_sparse_second_block_equals_pytorchs_ops(kernel, n):
    """conv(10→20) → dropout2d → max-pool → ReLU: output and all three gradients (input included) against autograd
    through PyTorch's ops with the same dropout mask (dropped maps, kept maps scaled by 2)."""
    torch.manual_seed(n)
    conv = torch.nn.Conv2d(10, 20, 5).to(memory_format=torch.channels_last)
    h = torch.relu(torch.randn(n, 10, 12, 12)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    scale = (torch.rand(n, 20) > 0.5).float() * 2.0
    grad_out = torch.randn(n, 20, 4, 4)
    ours = kernel.ConvDropoutPoolReLU.apply(h, conv.weight, conv.bias, scale)
    theirs = _block2_reference(h, conv, scale)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, [h, conv.weight, conv.bias], grad_out),
                    torch.autograd.grad(theirs, [h, conv.weight, conv.bias], grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
        assert a.stride() == b.stride()


def test_sparse_second_block_gradients_do_not_depend_on_the_thread_count(kernel):
    conv = torch.nn.Conv2d(10, 20, 5).to(memory_format=torch.channels_last)
    h = torch.relu(torch.randn(70, 10, 12, 12)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    scale, grad_out = (torch.rand(70, 20) > 0.5).float() * 2.0, torch.randn(70, 20, 4, 4)
    threads, grads = torch.get_num_threads(), []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = kernel.ConvDropoutPoolReLU.apply(h, conv.weight, conv.bias, scale)
            grads.append(torch.autograd.grad(out, [h, conv.weight, conv.bias], grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_the_encoders_kernels_draw_the_same_dropout_masks_as_pytorchs(kernel, monkeypatch):
    """Training mode: the fused encoder draws Dropout2d's mask from the same generator in the same shape, so one seed
    gives the same masks (and outputs up to rounding) whichever path runs: the fallback without the kernel, or the
    plain encoder."""
    torch.manual_seed(0)
    encoder = LeNetEncoder(dropout=0.5, fused=True).to(memory_format=torch.channels_last).train()
    x = _images(64, 5)

    def forward():
        torch.manual_seed(1)
        out = encoder(x)
        return out, torch.autograd.grad(out.square().sum(), list(encoder.parameters()))

    ours, ours_grads = forward()
    encoder.fused = False
    plain, plain_grads = forward()
    encoder.fused = True
    switch_off_kernel(monkeypatch)
    theirs, theirs_grads = forward()
    assert torch.equal(plain, theirs) and all(torch.equal(a, b) for a, b in zip(plain_grads, theirs_grads))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch
def test_the_kernels_refuse_what_they_do_not_compute(kernel):
    """Second derivatives (create_graph) go through PyTorch's ops and equal theirs; other convolution
    hyper-parameters, autocast and forward-mode AD take PyTorch's path (same results as PyTorch's ops)."""
    torch.manual_seed(0)
    encoder = LeNetEncoder(dropout=0.5, fused=True).to(memory_format=torch.channels_last).train()
    x = _images(8, 4)
    params = list(encoder.parameters())

    def penalty_gradient():  # the gradient of a gradient penalty: second derivatives through both blocks
        torch.manual_seed(3)  # the same dropout masks on both paths
        grads = torch.autograd.grad(encoder(x).square().sum(), params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    ours = penalty_gradient()
    with pytest.MonkeyPatch.context() as patch:
        switch_off_kernel(patch)
        theirs = penalty_gradient()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    for options in ({"padding": 2}, {"stride": 2}, {"dilation": 2}):
        conv = torch.nn.Conv2d(1, 10, 5, **options)
        assert not kernel._block1_applies(x, conv)
        torch.testing.assert_close(kernel.conv_pool_relu(x, conv), F.relu(F.max_pool2d(conv(x), 2)))
        second = torch.nn.Conv2d(10, 20, 5, **options)
        h = torch.randn(2, 10, 12, 12)
        torch.testing.assert_close(kernel.conv_dropout_pool_relu(h, second, torch.nn.Dropout2d(0.0)),
                                   F.relu(F.max_pool2d(second(h), 2)))
    conv = torch.nn.Conv2d(1, 10, 5)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(conv.weight.detach(), torch.ones_like(conv.weight))
        assert not kernel._plain(x, dual)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernel._block1_applies(x, conv)
