"""The LeNet multi-task model (REFERENCE §1.1)."""
import torch

from mtlcore.models import build_model


def test_lenet_shapes_and_parameter_count():
    model = build_model("lenet", {"a": 10, "b": 4})
    z = model.encoder(torch.zeros(7, 1, 28, 28))
    assert z.shape == (7, 50)
    assert model(torch.zeros(7, 1, 28, 28), "b").shape == (7, 4)
    # conv1 10·25+10, conv2 20·10·25+20, fc 320·50+50  (the flatten is 20·4·4 = 320)
    assert sum(p.numel() for p in model.shared_parameters()) == 260 + 5020 + 16050
    assert sum(p.numel() for p in model.task_parameters("a")) == 50 * 10 + 10
    assert [p.shape for p in model.last_shared_layer()] == [torch.Size([50, 320]), torch.Size([50])]


def test_unknown_encoder_lists_valid_ones():
    import pytest

    with pytest.raises(ValueError, match=r"valid encoders: \['lenet'\]"):
        build_model("resnet999", {"a": 2})


# --- the fused CPU kernel of LeNet's first block (mtlcore/models/fused.py) ---------------------------------
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import switch_off_kernels  # noqa: E402
from mtlcore import _cpu_kernels  # noqa: E402
from mtlcore.models import fused  # noqa: E402


@pytest.fixture
def kernel():
    if fused.extension() is None:
        pytest.skip("the fused LeNet kernel cannot be built here (no C++ compiler or no AVX2)")
    return fused


def _reference(x, conv):
    return F.relu(F.max_pool2d(F.conv2d(x, conv.weight, conv.bias), 2))


def _images(n: int, seed: int) -> torch.Tensor:
    """Random images with flat background (ties in every pooling window there) and some exact zeros after ReLU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 28, 28), -0.4)
    x[:, :, 6:22, 4:20] = torch.randn(n, 1, 16, 16, generator=g)
    return x


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
    from mtlcore.models.lenet import LeNetEncoder

    torch.manual_seed(0)
    encoder = LeNetEncoder(dropout=0.0)
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


def test_without_the_kernel_the_encoder_falls_back_and_says_so(monkeypatch, caplog, no_compiler):
    with caplog.at_level("WARNING", logger="mtlcore.models.fused"):
        assert fused.kernel_name() == "pytorch"
    assert "could not be built (Error building extension: g++ not found); using PyTorch's kernels" in caplog.text
    conv = torch.nn.Conv2d(1, 10, 5)
    x = _images(3, 2)
    torch.testing.assert_close(fused.conv_pool_relu(x, conv), _reference(x, conv))
    monkeypatch.setenv("MTLCORE_FUSED_LENET", "0")
    _cpu_kernels.modules.clear()
    assert fused.kernel_name() == "pytorch"


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
    gives the same masks (and outputs up to rounding) whichever path runs."""
    from mtlcore.models.lenet import LeNetEncoder

    torch.manual_seed(0)
    encoder = LeNetEncoder(dropout=0.5).to(memory_format=torch.channels_last).train()
    x = _images(64, 5)
    torch.manual_seed(1)
    ours = encoder(x)
    ours_grads = torch.autograd.grad(ours.square().sum(), list(encoder.parameters()))
    switch_off_kernels(monkeypatch, fused.EXTENSION)
    torch.manual_seed(1)
    theirs = encoder(x)
    theirs_grads = torch.autograd.grad(theirs.square().sum(), list(encoder.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch
def test_the_kernels_refuse_what_they_do_not_compute(kernel):
    """Second derivatives (create_graph) go through PyTorch's ops and equal theirs; other convolution
    hyper-parameters, autocast and forward-mode AD take PyTorch's path (same results as PyTorch's ops)."""
    from mtlcore.models.lenet import LeNetEncoder

    torch.manual_seed(0)
    encoder = LeNetEncoder(dropout=0.5).to(memory_format=torch.channels_last).train()
    x = _images(8, 4)
    params = list(encoder.parameters())

    def penalty_gradient():  # the gradient of a gradient penalty: second derivatives through both blocks
        torch.manual_seed(3)  # the same dropout masks on both paths
        grads = torch.autograd.grad(encoder(x).square().sum(), params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    ours = penalty_gradient()
    with pytest.MonkeyPatch.context() as patch:
        switch_off_kernels(patch, kernel.EXTENSION)
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
