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
