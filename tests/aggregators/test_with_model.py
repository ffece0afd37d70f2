"""Every method trains a small model for three steps through the update object the trainer uses."""
from __future__ import annotations

import pytest
import torch

from mtlcore import settings
from mtlcore.aggregators import available
from mtlcore.training.updates import JacobianUpdate, LossLevelUpdate, Step, UniformUpdate, make_update

OPTIONS = {"fixed": {"weights": [0.2, 0.3, 0.5]}, "uniform": {"reduction": "sum"}}  # uniform through J


@pytest.mark.parametrize("name", available())
def test_trains_lenet_three_steps(name):
    torch.manual_seed(0)
    tasks = ["fashion1", "fashion2", "notmnist"]
    model = settings.get("fashion_mtl").build_model("lenet", tasks)
    update = make_update(name, OPTIONS.get(name, {}), model, tasks, loss_scale="sum", head_update="own", seed=0,
                         device=torch.device("cpu"))
    kind = {"loss": LossLevelUpdate, "gradient": JacobianUpdate}[update.aggregator.kind]
    assert type(update) is kind and not isinstance(update, UniformUpdate)
    loss = settings.get("fashion_mtl").task("fashion1").loss
    optimizer = torch.optim.SGD([*model.parameters(), *update.parameters()], lr=0.01)
    x = torch.randn(8, 1, 28, 28)
    y = {t: torch.randint(0, 10, (8,)) for t in tasks}
    before = [p.detach().clone() for p in model.shared_parameters()]

    def step(inputs=x) -> Step:
        features = model.encoder(inputs)
        parts = [loss.mean(model.heads[t](features), y[t]) for t in tasks]
        return Step(torch.stack(parts), parts, features)

    update.set_batch_source(lambda: step(torch.randn(8, 1, 28, 28)))  # modo's and sdmgrad's extra batches

    for _ in range(3):
        optimizer.zero_grad()
        current = step()
        weights = update.apply(current)
        optimizer.step()
        update.after_step(lambda: step().losses)
        update.end_epoch(current.losses.detach())
        assert weights.shape == (3,)
        if name not in ("graddrop", "dbmtl", "trimmed_mean", "moco"):  # no w with d = Jᵀw: NaN
            assert torch.isfinite(weights).all()
        # the direction Eq. 6 measures: finite, and measuring it leaves the method's state as it was
        state = update.state_dict()
        jacobian = torch.randn(3, 20)
        assert torch.isfinite(update.direction()(jacobian, current.losses.detach())).all()
        assert repr(update.state_dict()) == repr(state)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.shared_parameters()))
