"""The same code on CUDA: runs reproduce bit for bit from the seed, and aggregators, per-example gradients
and trajectory factors agree with their CPU results. Skipped where no CUDA device is present (CI); run on
a GPU machine with `pytest tests/test_cuda.py`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from mtlcore import metrics
from mtlcore.aggregators import gramian as gramian_module
from mtlcore.aggregators.gramian import gramian
from mtlcore.settings.fashion_mtl import CrossEntropy
from mtlcore.settings.fashion_mtl.model import lenet
from mtlcore.training import RunConfig
from mtlcore.training import trainer as train

from conftest import SMALL
from aggregators._properties import GRADIENT_METHODS, make, random_jacobian
from test_train import assert_grads_in_parameter_layout, trainer_after_updates

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BASE = {"setting": "fashion_mtl", "setting_options": SMALL, "epochs": 2, "batch_size": 32, "lr": 0.05,
        "optimizer": "momentum"}
RECORDED = ("train_loss", "val_loss", "test_loss", "val_score", "test_score", "task_weight")


def config(device: str, tasks=("fashion1", "fashion2"), **changes) -> RunConfig:
    return RunConfig.from_dict({**BASE, "tasks": list(tasks), "device": device, **changes})


@pytest.fixture
def run(fake_data_root):
    return lambda device, **changes: train.run(config(device, **changes), data_root=fake_data_root, progress=False)


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and products: TF32 (cuDNN's default) differs from the CPU by ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("aggregator", ["uniform", "mgda", "pcgrad", "gradnorm"])
def test_a_cuda_run_reproduces_bit_for_bit(run, aggregator):
    a, b = run("cuda", aggregator=aggregator), run("cuda", aggregator=aggregator)
    assert a.attrs["device"].startswith("cuda")
    for name in RECORDED:
        xr.testing.assert_identical(a[name], b[name])


def test_measuring_factors_does_not_change_a_cuda_run(run):
    """The factors draw on their own generators and restore the model: the trained trajectory is the same."""
    from test_schedule import FAST

    plain, measured = run("cuda"), run("cuda", metrics=FAST)
    for name in RECORDED:
        xr.testing.assert_identical(plain[name], measured[name])
    assert np.isfinite(measured["sharpness"].values[[0, 2]]).all()


def test_device_auto_picks_cuda():
    assert train.resolve_device("auto").type == "cuda"
    with pytest.raises(ValueError, match=f"this machine has {torch.cuda.device_count()} CUDA device"):
        train.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_a_killed_cuda_run_of_a_randomised_method_resumes_bit_for_bit(fake_data_root, tmp_path, monkeypatch):
    from test_train import _kill_and_resume

    cfg = config("cuda", ("fashion1", "fashion2", "noisy_fashion"), epochs=3, aggregator="pcgrad")
    reference = train.run(cfg, data_root=fake_data_root, progress=False)
    resumed = _kill_and_resume(cfg, fake_data_root, tmp_path, monkeypatch)
    for name in RECORDED:
        xr.testing.assert_identical(reference[name], resumed[name])


@pytest.mark.parametrize("aggregator", ["pcgrad", "gradvac", "rlw", "graddrop"])
def test_a_cuda_run_gives_each_randomised_method_its_generator_where_the_draws_are_used(fake_data_root, aggregator):
    """PCGrad's and GradVac's draws order the tasks on the host and RLW's weights are recorded there: from a
    generator on the GPU each draw costs a round trip to the device. GradDrop's draws mask J on the device, so its
    generator stays there."""
    agg = trainer_after_updates(config("cuda", aggregator=aggregator), fake_data_root, steps=2).update.aggregator
    assert agg.generator.device.type == ("cuda" if aggregator == "graddrop" else "cpu")
    if aggregator != "graddrop":  # GradDrop has no task weights (NaN by definition)
        assert agg.weights.device.type == "cpu" and agg.weights.dtype == torch.float64
        assert torch.isfinite(agg.weights).all()


@pytest.mark.parametrize("aggregator", ["uniform", "mgda"])
def test_cuda_and_cpu_runs_follow_the_same_trajectory(run, no_tf32, aggregator):
    """Not bit-equal (other kernels, summation orders), but the same training; without dropout, whose masks
    come from each device's own generator."""
    gpu, cpu = (run(device, epochs=1, model_options={"dropout": 0.0}, aggregator=aggregator)
                for device in ("cuda", "cpu"))
    for name in ("train_loss", "test_loss"):
        torch.testing.assert_close(torch.from_numpy(gpu[name].values), torch.from_numpy(cpu[name].values), rtol=1e-3, atol=1e-4)
    one_image = 1 / SMALL["test_size"]  # a prediction that flips on a near-tie moves the accuracy by this much
    torch.testing.assert_close(torch.from_numpy(gpu["test_score"].values), torch.from_numpy(cpu["test_score"].values),
                               rtol=0, atol=1.01 * one_image)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_aggregators_on_cuda_match_cpu(name):
    J, losses = random_jacobian(3, 50, None, seed=7), torch.tensor([0.5, 1.0, 2.0])
    cpu_agg, gpu_agg = make(name, 3), make(name, 3)  # randomised ones: the same CPU generator seed drives both
    expected = cpu_agg(J, losses)
    got = gpu_agg(J.cuda(), losses.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    assert gpu_agg.weights.device.type == "cpu" and gpu_agg.weights.dtype == torch.float64
    torch.testing.assert_close(gpu_agg.weights, cpu_agg.weights, rtol=1e-5, atol=1e-8, equal_nan=True)


@pytest.mark.parametrize("shape", [(1, 7), (3, 431_080), (5, 300_000), (20, 100_003), (33, 20_000), (65, 5_000)])
def test_float64_gramian_on_cuda_is_exact(shape):
    """Integer entries: every partial sum is an exact integer, so G must equal the integer Gramian exactly."""
    J = torch.randint(-64, 65, shape, generator=torch.Generator().manual_seed(sum(shape))).float()
    exact = (J.long() @ J.long().T).double()
    for given in (J, J.half(), J.bfloat16(), J.double(), J.T.contiguous().T):
        G = gramian(given.cuda())
        assert G.device.type == "cuda" and G.dtype == torch.float64
        assert torch.equal(G.cpu(), exact)


@pytest.mark.parametrize("block", [1 << 24, 1 << 12])  # one block, many blocks
def test_float64_gramian_on_cuda_over_one_or_many_blocks(monkeypatch, block):
    monkeypatch.setattr(gramian_module, "BLOCK_GPU", block)
    J = torch.randn(5, 300_000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gramian(J.cuda()).cpu(), J.double() @ J.double().T, rtol=1e-10, atol=1e-8)


def test_per_example_gradients_and_factors_on_cuda_match_cpu(no_tf32):
    ce = CrossEntropy()
    torch.manual_seed(0)
    model = lenet(["a", "b"]).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    gpu_model = lenet(["a", "b"]).eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.cuda()
    xg, yg = x.cuda(), y.cuda()
    by_vmap = metrics.per_example_gradients(gpu_model, "a", xg[:16], yg[:16], loss=ce, method="vmap")
    by_loop = metrics.per_example_gradients(gpu_model, "a", xg[:16], yg[:16], loss=ce, method="loop")
    torch.testing.assert_close(by_vmap, by_loop, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(by_vmap.cpu(), metrics.per_example_gradients(model, "a", x[:16], y[:16], loss=ce),
                               rtol=1e-4, atol=1e-6)
    cpu_fisher = metrics.fisher_trace(model, "a", x, y, loss=ce, empirical=True)
    assert metrics.fisher_trace(gpu_model, "a", xg, yg, loss=ce, empirical=True) == pytest.approx(cpu_fisher, rel=1e-4)
    # sampled targets from a CPU generator: the same draws on both devices (up to near-ties of the softmax)
    cpu_sampled = metrics.fisher_trace(model, "a", x, loss=ce, num_samples=4,
                                       generator=torch.Generator().manual_seed(3))
    gpu_sampled = metrics.fisher_trace(gpu_model, "a", xg, loss=ce, num_samples=4,
                                       generator=torch.Generator().manual_seed(3))
    assert gpu_sampled == pytest.approx(cpu_sampled, rel=1e-3)
    cpu_sharp = metrics.sharpness(model, "a", x, y, loss=ce, rho=1e-3, batch_size=32,
                                  generator=torch.Generator().manual_seed(2))
    gpu_sharp = metrics.sharpness(gpu_model, "a", xg, yg, loss=ce, rho=1e-3, batch_size=32,
                                  generator=torch.Generator().manual_seed(2))
    assert gpu_sharp >= 0 and gpu_sharp == pytest.approx(cpu_sharp, rel=0.1, abs=1e-6)
    data = {"a": (x, y), "b": (x, y.flip(0))}
    on_gpu = {task: (inputs.cuda(), targets.cuda()) for task, (inputs, targets) in data.items()}
    losses = {"a": ce, "b": ce}
    conflict = [metrics.gradient_conflict(m, d, losses=losses, batch_size=16, num_batches=4,
                                          generator=torch.Generator().manual_seed(4))
                for m, d in ((model, data), (gpu_model, on_gpu))]
    for task in data:
        assert conflict[1][task] == pytest.approx(conflict[0][task], abs=1e-4)


def test_lenet_fused_on_cuda_is_lenet(run):
    """The fused kernels are CPU kernels: on CUDA `lenet_fused` takes PyTorch's ops, so its run is lenet's bit for bit
    (under another content hash)."""
    plain, fused = run("cuda", epochs=1), run("cuda", epochs=1, model="lenet_fused")
    assert plain.attrs["run_id"] != fused.attrs["run_id"] and fused.attrs["model"] == "lenet_fused"
    for name in RECORDED:
        xr.testing.assert_identical(plain[name], fused[name])


@pytest.mark.parametrize("aggregator", ["mgda", "mgda_ub", "pcgrad"])
def test_every_cuda_gradient_has_its_parameters_memory_layout(fake_data_root, aggregator):
    assert_grads_in_parameter_layout(trainer_after_updates(config("cuda", aggregator=aggregator), fake_data_root, steps=0))


def test_factors_measured_along_a_cuda_run(run):
    ds = run("cuda", metrics={"factors": ["sharpness", "fisher_trace", "coherence", "conflict"], "every": 1, "examples": 64,
                        "coherence": {"large_batch": 32}, "conflict": {"num_batches": 10}})
    for name in ("sharpness", "fisher_trace", "grad_cov_trace", "grad_norm_sq", "conflict"):
        assert bool(np.isfinite(ds[name].values).all()), name
