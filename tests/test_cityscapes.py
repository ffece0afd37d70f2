"""The Cityscapes setting on files written by its fixture writer in exactly the released layout (the MTAN preprocessed
archive): loaders traced to the files, masking, split-wide scores by hand, the DeepLabV3 model against torchvision's,
the dense Fisher against its closed form, every factor against brute force, and short STL and MTL runs."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from mtlcore import metrics, settings, training
from mtlcore.metrics.common import task_named_parameters
from mtlcore.settings import DataNotFoundError
from mtlcore.settings.base import MultiTaskModel
from mtlcore.settings.cityscapes import Cityscapes, fixture
from mtlcore.settings.cityscapes.losses import (
    ABS_ERR,
    IGNORE,
    INVALID_DEPTH,
    MIOU,
    PIXEL_ACCURACY,
    REL_ERR,
    DepthL1,
    PixelCrossEntropy,
)
from mtlcore.settings.cityscapes.model import DeepLabEncoder, DeepLabHead, deeplabv3

SIZES = {"train_size": 5, "val_size": 3, "test_size": 3}
TASKS = ["segmentation", "depth"]
TINY = {"width": 4, "aspp_channels": 8}
CE, L1 = PixelCrossEntropy(), DepthL1()


@pytest.fixture
def release(tmp_path):
    """(data root, what the fixture wrote): 8 train and 4 val images of 16×32."""
    return tmp_path, fixture.write(tmp_path)



def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- declarations ----------------------------------------------------------------------------------------------------
def test_the_setting_is_registered_with_two_single_input_tasks():
    setting = settings.get("cityscapes")
    assert type(setting) is Cityscapes and setting.regime == "single_input"
    assert setting.tasks == ("segmentation", "depth")
    assert setting.resolve_options({}) == {"train_size": 2475, "val_size": 500, "test_size": 500, "data_seed": 0,
                                           "classes": 7}
    segmentation, depth = setting.task("segmentation"), setting.task("depth")
    assert [(s.name, s.higher_is_better) for s in segmentation.scores] == [("miou", True), ("pixel_accuracy", True)]
    assert [(s.name, s.higher_is_better) for s in depth.scores] == [("abs_err", False), ("rel_err", False)]
    with pytest.raises(ValueError, match=r"valid values: \[7, 19\]"):
        setting.resolve_options({"classes": 8})
    with pytest.raises(ValueError, match="exceed the release's 2975"):
        setting.resolve_options({"train_size": 2500, "val_size": 500})
    with pytest.raises(ValueError, match=r"valid tasks: \['segmentation', 'depth'\]"):
        setting.task("normals")
    with pytest.raises(ValueError, match=r"valid depths: \[18, 50, 101\]"):
        setting.resolve_model(None, {"depth": 34})
    with pytest.raises(ValueError, match="width=64"):
        setting.resolve_model(None, {"width": 4, "weights": "resnet18.pth"})


# -- data -------------------------------------------------------------------------------------------------------------
def test_every_loaded_example_is_its_file_and_the_splits_are_held_out_as_documented(release):
    root, written = release
    loaded = Cityscapes().load(TASKS, SIZES, root=root, download=False)
    files = loaded.info["files"]
    assert set(files["train"]).isdisjoint(files["val"]) and len(set(files["train"]) | set(files["val"])) == 8
    assert files["test"] == sorted(files["test"]) and set(files["test"]) <= set(range(4))
    for split, source in (("train", "train"), ("val", "train"), ("test", "val")):
        examples = loaded.joint[split]
        assert len(examples) == SIZES[f"{split}_size"]
        images, labels, depths = examples.inputs, examples.targets["segmentation"], examples.targets["depth"]
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 32)
        assert labels.dtype == torch.int8 and depths.shape[1:] == (1, 16, 32)
        for row, number in enumerate(files[split]):
            # the image is the one file it matches among all of its release split's images
            matches = [i for i, image in enumerate(written[source]["image"])
                       if np.array_equal(image.transpose(2, 0, 1), images[row].numpy())]
            assert matches == [number]
            np.testing.assert_array_equal(labels[row].numpy(), written[source]["label_7"][number])
            np.testing.assert_array_equal(depths[row, 0].numpy(), written[source]["depth"][number][..., 0])
        assert torch.equal(loaded.examples[split]["depth"].targets, depths)


def test_the_holdout_is_a_seeded_function_and_smaller_caps_keep_subsets(release):
    root, _ = release
    setting = Cityscapes()

    def files(**options):
        return setting.load(["depth"], {**SIZES, **options}, root=root, download=False).info["files"]

    first, again, other = files(), files(), files(data_seed=1)
    assert first == again and first != other
    smaller = files(train_size=2, test_size=2)
    assert smaller["val"] == first["val"] and set(smaller["train"]) <= set(first["train"])
    with pytest.raises(ValueError, match=r"train_size \+ val_size = 6 \+ 3 = 9 exceed the 8 images"):
        files(train_size=6)
    with pytest.raises(ValueError, match="test_size=5 exceeds the 4 images"):
        files(test_size=5)


def test_libmtl_label_folder_float64_files_and_the_19_class_option(tmp_path):
    written = fixture.write(tmp_path, label_folder="label", dtype="float64")
    setting = Cityscapes()
    seven = setting.load(["segmentation"], SIZES, root=tmp_path, download=False)
    nineteen = setting.load(["segmentation"], {**SIZES, "classes": 19}, root=tmp_path, download=False)
    assert seven.info["label_folder"]["train"].endswith("label") and seven.joint["train"].inputs.dtype == torch.float32
    for loaded, name in ((seven, "label_7"), (nineteen, "label_19")):
        for row, number in enumerate(loaded.info["files"]["test"]):
            np.testing.assert_array_equal(loaded.joint["test"].targets["segmentation"][row].numpy(),
                                          written["val"][name][number])
    assert int(nineteen.joint["train"].targets["segmentation"].max()) > 6
    # the model must predict 19 classes: a 7-class head stops the first step with the fix named
    model = setting.build_model(None, ["segmentation"], {**TINY, "segmentation_classes": 7})
    inputs, targets = nineteen.joint["train"].take(slice(0, 2))
    with pytest.raises(ValueError, match="segmentation_classes"):
        CE.mean(model(inputs, "segmentation"), targets["segmentation"])
    wide = setting.build_model(None, ["segmentation"], {**TINY, "segmentation_classes": 19})
    assert wide(inputs, "segmentation").shape == (2, 19, 16, 32)
    with pytest.raises(ValueError, match=r"valid names: \['label_7', 'label'\]"):
        fixture.write(tmp_path / "other", label_folder="labels")


def test_a_task_reads_only_its_own_folders(release):
    root, _ = release
    for split in ("train", "val"):
        shutil.rmtree(root / "cityscapes" / split / "label_7")
    loaded = Cityscapes().load(["depth"], SIZES, root=root, download=False)
    assert set(loaded.joint["train"].targets) == {"depth"}
    with pytest.raises(DataNotFoundError) as error:
        Cityscapes().load(TASKS, SIZES, root=root, download=False)
    assert "label_7" in str(error.value) and str(root / "cityscapes" / "train" / "label") in str(error.value)
    assert "lorenmt/mtan" in str(error.value)
    assert Cityscapes().missing_optional_files(root) == []
    shutil.rmtree(root / "cityscapes" / "val" / "label_19")
    assert "classes=19" in Cityscapes().missing_optional_files(root)[0]


def test_missing_files_name_the_files_the_folders_searched_and_the_archive(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        Cityscapes().load(TASKS, SIZES, root=tmp_path, download=True)
    message = str(error.value)
    for text in ("train/image/{i}.npy", "train/label_7/{i}.npy (or train/label/{i}.npy)", "depth/{i}.npy", f"- {tmp_path / 'cityscapes'}\n",
                 f"- {tmp_path}\n", "github.com/lorenmt/mtan", "dropbox.com", str(tmp_path / "cityscapes")):
        assert text in message, text
    fixture.write(tmp_path)
    (tmp_path / "cityscapes" / "train" / "depth" / "3.npy").unlink()
    with pytest.raises(DataNotFoundError, match=r"missing from .*train/depth: \['3.npy'\]"):
        Cityscapes().load(TASKS, SIZES, root=tmp_path, download=False)
    (tmp_path / "cityscapes" / "val" / "image" / "1.npy").unlink()
    with pytest.raises(DataNotFoundError, match=r"val/image holds 3 .* not every one of 0..3.npy: missing \['1.npy'\]"):
        Cityscapes().load(TASKS, SIZES, root=tmp_path, download=False)


def _cut(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, message", [
    (lambda folder: _cut(folder / "val" / "image" / "0.npy", 500), r"val/image/0.npy could not be read .*truncated"),
    (lambda folder: _cut(folder / "val" / "depth" / "1.npy", 60), r"val/depth/1.npy could not be read .*truncated"),
    (lambda folder: (folder / "val" / "label_7" / "2.npy").write_bytes(b""), r"label_7/2.npy could not be read"),
    (lambda folder: np.save(folder / "val" / "depth" / "0.npy", np.ones((16, 30, 1))), r"0.npy .*shape \(16, 30, 1\)"),
    (lambda folder: np.save(folder / "val" / "label_7" / "0.npy", np.full((16, 32), 7.0)), r"labels \[7.0\] outside"),
    (lambda folder: np.save(folder / "val" / "label_7" / "0.npy", np.full((16, 32), 0.5)), r"labels \[0.5\] outside"),
])
def test_a_damaged_file_is_named(release, damage, message):
    root, _ = release
    damage(root / "cityscapes")
    with pytest.raises(ValueError, match=message):
        Cityscapes().load(TASKS, {**SIZES, "test_size": 4}, root=root, download=False)


def test_the_data_root_itself_may_hold_the_release(tmp_path):
    fixture.write(tmp_path)
    for split in ("train", "val"):
        shutil.move(tmp_path / "cityscapes" / split, tmp_path / split)
    loaded = Cityscapes().load(TASKS, SIZES, root=tmp_path, download=False)
    assert loaded.info["folder"] == str(tmp_path.resolve())


# -- losses and scores ---------------------------------------------------------------------------------------------
def test_losses_average_each_examples_valid_pixels_only():
    generator = seeded(1)
    logits, predicted = torch.randn(3, 4, 2, 3, generator=generator), torch.randn(3, 1, 2, 3, generator=generator)
    labels = torch.randint(0, 4, (3, 2, 3), generator=generator)
    labels[0, 0, :2] = -1
    labels[2] = -1  # no labelled pixel: loss 0, not NaN
    depths = torch.rand(3, 1, 2, 3, generator=generator) + 0.1
    depths[1, 0, 1, 1:] = 0.0
    expected_ce, expected_l1 = [], []
    for i in range(3):  # brute force, pixel by pixel
        terms = [-torch.log_softmax(logits[i, :, r, c], 0)[labels[i, r, c]] for r in range(2) for c in range(3)
                 if labels[i, r, c] != -1]
        expected_ce.append(float(sum(terms) / len(terms)) if terms else 0.0)
        errors = [abs(predicted[i, 0, r, c] - depths[i, 0, r, c]) for r in range(2) for c in range(3)
                  if depths[i, 0, r, c] != 0]
        expected_l1.append(float(sum(errors) / len(errors)))
    torch.testing.assert_close(CE(logits, labels.to(torch.int8)), torch.tensor(expected_ce))
    torch.testing.assert_close(L1(predicted, depths), torch.tensor(expected_l1))
    assert CE.mean(logits, labels) == pytest.approx(sum(expected_ce) / 3, rel=1e-6)
    # outputs at masked pixels do not matter: their gradients are 0
    logits.requires_grad_(True)
    predicted.requires_grad_(True)
    CE.mean(logits, labels).backward()
    L1.mean(predicted, depths).backward()
    assert logits.grad[0, :, 0, :2].abs().sum() == 0 and logits.grad[2].abs().sum() == 0
    assert predicted.grad[1, 0, 1, 1:].abs().sum() == 0 and logits.grad[1].abs().sum() > 0


def test_miou_and_pixel_accuracy_accumulate_the_confusion_matrix_over_the_split():
    # 3 classes, two batches; labels (−1 ignored) and argmax predictions per pixel:
    labels = [torch.tensor([[[0, 0, 1, -1]]]), torch.tensor([[[1, 2, 2, 0]], [[-1, -1, 2, 1]]])]
    predicted = [torch.tensor([[[1, 1, 1, 2]]]), torch.tensor([[[1, 2, 0, 0]], [[0, 1, 2, 2]]])]
    # labelled pixels (true, predicted): (0,1) (0,1) (1,1) | (1,1) (2,2) (2,0) (0,0) | (2,2) (1,2)
    # class 0: TP 1, FP 1, FN 2 → 1/4; class 1: TP 2, FP 2, FN 1 → 2/5; class 2: TP 2, FP 1, FN 1 → 2/4
    def statistics(p, t):
        return MIOU.statistics(nn.functional.one_hot(p, 3).permute(0, 3, 1, 2).float(), t)

    total = sum(statistics(p, t) for p, t in zip(predicted, labels))
    assert total.reshape(3, 3).tolist() == [[1, 2, 0], [0, 2, 1], [1, 0, 2]]
    assert MIOU.value(total) == pytest.approx((1 / 4 + 2 / 5 + 2 / 4) / 3)
    assert PIXEL_ACCURACY.value(total) == pytest.approx(5 / 9)
    # averaging per batch would differ: batch 1 alone has IoUs 0/2 and 1/3 (class 2 neither labelled nor predicted on
    # a labelled pixel: left out), batch 2 alone 1/2, 1/2, 2/4
    per_batch = [MIOU.value(statistics(p, t)) for p, t in zip(predicted, labels)]
    assert per_batch == pytest.approx([1 / 6, 1 / 2]) and np.mean(per_batch) != pytest.approx(MIOU.value(total))
    # a class neither labelled nor predicted anywhere is left out of the mean
    four = torch.zeros(4, 4, dtype=torch.float64)
    four[:3, :3] = total.reshape(3, 3)
    assert MIOU.value(four.reshape(-1)) == pytest.approx(MIOU.value(total))


def test_depth_errors_over_every_valid_pixel_of_the_split():
    outputs = [torch.tensor([[[[0.3, 0.1], [0.5, 9.0]]]]), torch.tensor([[[[0.2, 0.2]]]])]
    targets = [torch.tensor([[[[0.2, 0.2], [0.4, 0.0]]]]), torch.tensor([[[[0.1, 0.4]]]])]
    total = sum(ABS_ERR.statistics(o, t) for o, t in zip(outputs, targets))
    errors, relative = [0.1, 0.1, 0.1, 0.1, 0.2], [0.5, 0.5, 0.25, 1.0, 0.5]  # the 0 target is no depth
    assert ABS_ERR.value(total) == pytest.approx(sum(errors) / 5)
    assert REL_ERR.value(total) == pytest.approx(sum(relative) / 5)


def test_the_split_scores_of_evaluate_are_those_of_all_its_pixels(release, one_thread):
    root, _ = release
    loaded = Cityscapes().load(TASKS, {**SIZES, "test_size": 4}, root=root, download=False)
    torch.manual_seed(0)
    model = deeplabv3(TASKS, **TINY).eval()
    results = metrics.evaluate(model, {t: Cityscapes().task(t) for t in TASKS}, loaded, "test", batch_size=3)
    test = loaded.joint["test"]
    with torch.no_grad():
        predicted = model(test.inputs, "segmentation").argmax(1).numpy()
        depth = model(test.inputs, "depth").numpy()
    labels, truth = test.targets["segmentation"].numpy(), test.targets["depth"].numpy()
    valid = labels != -1
    matrix = np.zeros((7, 7))
    np.add.at(matrix, (labels[valid], predicted[valid]), 1)
    iou = [matrix[c, c] / (matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]) for c in range(7)]
    assert results["segmentation"].scores["miou"] == pytest.approx(np.mean(iou))
    assert results["segmentation"].scores["pixel_accuracy"] == pytest.approx(np.trace(matrix) / valid.sum())
    has_depth = truth != 0
    assert results["depth"].scores["abs_err"] == pytest.approx(np.abs(depth - truth)[has_depth].mean(), rel=1e-6)


# -- the model -------------------------------------------------------------------------------------------------------
def test_resnet50_backbone_is_torchvisions_dilated_resnet50(one_thread):
    import torchvision

    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    encoder = DeepLabEncoder(50).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in encoder.backbone.state_dict().items()} == {k: v.shape for k, v in state.items()}
    encoder.backbone.load_state_dict(state)
    images = torch.rand(1, 3, 32, 64, generator=seeded())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        x = (images - mean) / std
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(x))))
        torch.testing.assert_close(encoder(images), expected)
    assert expected.shape == (1, 2048, 4, 8)  # output stride 8


def test_resnet18_is_dilated_by_the_mtan_rule_and_heads_upsample_to_the_input(one_thread):
    import torchvision
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead as TorchvisionHead

    reference = torchvision.models.resnet18(weights=None)
    model = deeplabv3(TASKS)  # ResNet18, width 64, ASPP 256: torchvision's sizes
    backbone = model.encoder.backbone
    assert {k: v.shape for k, v in backbone.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    head = TorchvisionHead(512, 7)
    assert {k: v.shape for k, v in model.heads["segmentation"].state_dict().items()} == {
        k: v.shape for k, v in head.state_dict().items()}
    for stage, dilation in ((backbone.layer3, 2), (backbone.layer4, 4)):
        first, second = stage
        assert (first.conv1.stride, first.conv1.dilation, first.conv1.padding) == ((1, 1), (dilation // 2,) * 2,
                                                                                  (dilation // 2,) * 2)
        assert first.downsample[0].stride == (1, 1)
        assert {c.dilation for c in (first.conv2, second.conv1, second.conv2)} == {(dilation, dilation)}
    assert model.couples_examples and model.last_shared_layer() == [backbone.layer4[-1].conv2.weight]
    assert model.describe(torch.device("cpu"))["backbone"] == "resnet18" and not model.pretrained_encoder
    small = deeplabv3(TASKS, **TINY).eval()
    images = torch.rand(2, 3, 24, 40, generator=seeded())
    with torch.no_grad():
        features = small.encoder(images)
        assert features.shape == (2, 32, 3, 5)
        for task, channels in (("segmentation", 7), ("depth", 1)):
            head = small.heads[task]
            expected = nn.functional.interpolate(nn.Sequential(*head)(features), size=(24, 40), mode="bilinear",
                                                 align_corners=False)  # torchvision's DeepLabV3 upsampling
            torch.testing.assert_close(small(images, task), expected)
            assert expected.shape == (2, channels, 24, 40)
    with pytest.raises(ValueError, match="multiples of 8"):
        small(torch.rand(1, 3, 20, 32), "depth")
    assert isinstance(DeepLabHead(32, 1, 8)[0], torchvision.models.segmentation.deeplabv3.ASPP)


def test_imagenet_weights_come_from_a_local_file_only(tmp_path, one_thread):
    import torchvision

    torch.manual_seed(5)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    model = Cityscapes().build_model(None, TASKS, {"weights": str(tmp_path / "resnet18.pth")})
    for key, value in model.encoder.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.pretrained_encoder and model.describe(torch.device("cpu"))["imagenet_weights"]["md5"]
    with pytest.raises(FileNotFoundError, match=r"download.pytorch.org/models/resnet18"):
        deeplabv3(TASKS, weights=str(tmp_path / "absent.pth"))
    torch.save({"conv1.weight": state["conv1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet18 checkpoint"):
        deeplabv3(TASKS, weights=str(tmp_path / "partial.pth"))


# -- the Fisher's predictive distributions ---------------------------------------------------------------------------
def test_sampled_targets_follow_the_softmax_and_the_gaussian_and_keep_masks():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).view(1, 3, 1, 1).expand(2, 3, 60, 100).contiguous()
    labels = CE.sample(logits, seeded(2))
    assert labels.shape == (2, 60, 100) and labels.dtype == torch.int64
    frequencies = torch.bincount(labels.reshape(-1), minlength=3).double() / labels.numel()
    assert torch.allclose(frequencies, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.01)  # 12,000 draws
    truth = torch.zeros(2, 60, 100, dtype=torch.int8)
    truth[:, :10] = -1
    kept = CE.sample(logits, seeded(2), targets=truth)
    assert (kept[:, :10] == -1).all() and torch.equal(kept[:, 10:], labels[:, 10:])
    outputs = torch.full((2, 1, 60, 100), 0.3)
    drawn = L1.sample(outputs, seeded(3))
    assert abs(float(drawn.mean()) - 0.3) < 0.04 and abs(float(drawn.std()) - 1.0) < 0.03
    depths = torch.ones(2, 1, 60, 100)
    depths[..., :5] = 0
    kept = L1.sample(outputs, seeded(3), targets=depths)
    assert (kept[..., :5] == 0).all() and torch.equal(kept[..., 5:], drawn[..., 5:])
    assert L1.fisher_scale == 1.0 and DepthL1(sigma=0.5).fisher_scale == 4.0 and CE.fisher_scale == 1.0


def tiny_dense_model() -> MultiTaskModel:
    """A convolution shared by a 3-class segmentation head and a depth head, no BatchNorm: small enough for
    Jacobians."""
    torch.manual_seed(4)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh())
    return MultiTaskModel(encoder, {"segmentation": nn.Conv2d(4, 3, 1), "depth": nn.Conv2d(4, 1, 1)})


def _output_jacobian(model, task, image) -> torch.Tensor:
    """d outputs / d parameters of one image: (outputs C·H·W) × P, parameters in task_named_parameters' order."""
    parameters = task_named_parameters(model, task)
    names = list(parameters)

    def outputs(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (image[None], task)).reshape(-1)

    blocks = torch.autograd.functional.jacobian(outputs, tuple(p.detach() for p in parameters.values()))
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


def _brute_force_squared_norms(model, task, images, targets, loss) -> torch.Tensor:
    """‖∇ loss(f(x_i), y_i)‖² one example at a time by plain autograd."""
    parameters = list(task_named_parameters(model, task).values())
    norms = []
    for image, target in zip(images, targets):
        grads = torch.autograd.grad(loss(model(image[None], task), target[None]).sum(), parameters)
        norms.append(sum(float(g.double().pow(2).sum()) for g in grads))
    return torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dense_fisher_trace_is_the_closed_form_of_its_docstring(task, one_thread):
    """Closed forms, V = H·W pixels of the image, J_p the Jacobian of pixel p's outputs:
    segmentation tr F = (1/V²) Σ_p tr(J_pᵀ (diag π_p − π_p π_pᵀ) J_p), π_p the softmax;
    depth (Gaussian, σ = 1) tr F = (1/(σ² V²)) Σ_p ‖J_p‖², averaged over the images."""
    model = tiny_dense_model()
    images = torch.rand(3, 3, 4, 5, generator=seeded(5))
    loss = CE if task == "segmentation" else L1
    pixels = 4 * 5
    exact = []
    for image in images:
        jacobian = _output_jacobian(model, task, image)
        if task == "segmentation":
            with torch.no_grad():
                p = torch.softmax(model(image[None], task)[0], dim=0).reshape(3, -1)  # C × V
            per_pixel = jacobian.reshape(3, pixels, -1)  # C × V × P
            total = sum(torch.trace(per_pixel[:, v].T @ (torch.diag(p[:, v]) - torch.outer(p[:, v], p[:, v]))
                                    @ per_pixel[:, v]) for v in range(pixels))
        else:
            total = jacobian.pow(2).sum()
        exact.append(float(total) / pixels**2)
    exact = float(np.mean(exact))
    samples = 150
    estimate = metrics.fisher_trace(model, task, images, loss=loss, num_samples=samples, generator=seeded(6))
    # the same draws by brute force: the estimate is their mean, and the closed form lies within 4 standard errors
    with torch.no_grad():
        outputs = model(images, task)
    drawn = loss.sample(outputs.repeat_interleave(samples, dim=0), generator=seeded(6))
    draws = _brute_force_squared_norms(model, task, images.repeat_interleave(samples, dim=0), drawn, loss)
    assert estimate == pytest.approx(loss.fisher_scale * float(draws.mean()), rel=1e-5)
    standard_error = float(draws.reshape(3, samples).var(dim=1).sum().sqrt()) / (3 * math.sqrt(samples))
    assert abs(estimate - exact) < 4 * standard_error and standard_error < 0.1 * exact



@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_the_fisher_given_targets_leaves_their_masked_pixels_out(task, one_thread):
    """With the true targets, the factor draws only the pixels they label: an image without any labelled pixel adds
    exactly 0, and the others are the masked draws' squared gradients."""
    model = tiny_dense_model()
    images = torch.rand(2, 3, 4, 5, generator=seeded(7))
    loss = CE if task == "segmentation" else L1
    if task == "segmentation":
        targets = torch.randint(0, 3, (2, 4, 5), generator=seeded(8))
        targets[0] = IGNORE
        targets[1, :2] = IGNORE
    else:
        targets = torch.rand(2, 1, 4, 5, generator=seeded(8)) + 0.1
        targets[0] = INVALID_DEPTH
        targets[1, :, :2] = INVALID_DEPTH
    samples = 4
    estimate = metrics.fisher_trace(model, task, images, targets, loss=loss, num_samples=samples, generator=seeded(9))
    with torch.no_grad():
        outputs = model(images, task).repeat_interleave(samples, dim=0)
    drawn = loss.sample(outputs, seeded(9), targets=targets.repeat_interleave(samples, dim=0))
    draws = _brute_force_squared_norms(model, task, images.repeat_interleave(samples, dim=0), drawn, loss)
    assert torch.all(draws[:samples] == 0) and torch.all(draws[samples:] > 0)
    assert estimate == pytest.approx(loss.fisher_scale * float(draws.mean()), rel=1e-5)
    unmasked = metrics.fisher_trace(model, task, images, loss=loss, num_samples=samples, generator=seeded(9))
    assert unmasked != pytest.approx(estimate, rel=1e-3)  # without targets every pixel is drawn

# -- the factors on the dense losses ---------------------------------------------------------------------------------
@pytest.fixture
def dense(release):
    """The tiny DeepLabV3 and 8 training examples of the fixture (both tasks)."""
    root, _ = release
    loaded = Cityscapes().load(TASKS, {"train_size": 5, "val_size": 3, "test_size": 1}, root=root, download=False)
    torch.manual_seed(7)
    model = deeplabv3(TASKS, **TINY)
    model(loaded.joint["train"].inputs, "depth")  # train-mode pass: running statistics that are not the defaults
    model.eval()
    return model, loaded.joint["train"]


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_per_example_gradients_of_deeplab_are_those_of_autograd_one_example_at_a_time(dense, task, one_thread):
    model, examples = dense
    loss = Cityscapes().task(task).loss
    x, y = examples.inputs, examples.targets[task]
    expected = _brute_force_squared_norms(model, task, x, y, loss)
    for method in ("vmap", "loop"):
        got = metrics.per_example_squared_norms(model, task, x, y, loss=loss, method=method, chunk_size=3)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-10)
    empirical = metrics.fisher_trace(model, task, x, y, loss=loss, empirical=True)
    assert empirical == pytest.approx(float(expected.mean()), rel=1e-4)


def test_coherence_and_conflict_on_dense_tasks_against_brute_force(dense, one_thread):
    model, examples = dense
    losses = {t: Cityscapes().task(t).loss for t in TASKS}
    data = {t: (examples.inputs, examples.targets[t]) for t in TASKS}
    # B = 1 and L = N: the coherence estimate is exact, tr Σ of the per-example gradients
    for task in TASKS:
        parameters = list(task_named_parameters(model, task).values())
        rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            losses[task](model(x[None], task), y[None]).sum(), parameters)]) for x, y in zip(*data[task])]).double()
        trace = float((rows - rows.mean(0)).pow(2).sum(1).mean())
        result = metrics.gradient_coherence(model, task, *data[task], loss=losses[task], small_batch=1, large_batch=5,
                                            generator=seeded())
        assert result.trace_covariance == pytest.approx(trace, rel=1e-4)
        assert result.grad_norm_sq == pytest.approx(float(rows.mean(0).pow(2).sum()), rel=1e-4)
    # the whole set as the one batch: cos(g_k, g_seg + g_depth) on the shared parameters
    shared = model.shared_parameters()
    gradients = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        losses[t].mean(model(examples.inputs, t), examples.targets[t]), shared)]) for t in TASKS]
    total = gradients[0] + gradients[1]
    cosines = metrics.gradient_conflict(model, data, losses=losses, batch_size=5, num_batches=1, single_input=True,
                                        generator=seeded())
    for task, g in zip(TASKS, gradients):
        assert cosines[task] == pytest.approx(float(nn.functional.cosine_similarity(g, total, dim=0)), abs=1e-5)


def test_sharpness_of_a_dense_loss_starts_from_its_mean_batch_loss(dense, one_thread):
    model, examples = dense
    for task in TASKS:
        loss = Cityscapes().task(task).loss
        x, y = examples.inputs[:4], examples.targets[task][:4]
        result = metrics.worst_case_perturbation(model, task, x, y, loss=loss, rho=1e-2, steps=3)
        with torch.no_grad():
            assert result.clean_loss == pytest.approx(float(loss(model(x, task), y).mean()), rel=1e-6)
        assert result.worst_loss > result.clean_loss
        assert all(torch.all(d.abs() <= 1e-2 * p.abs() + 1e-12) for (name, p), d in zip(
            task_named_parameters(model, task).items(), result.perturbation.values()))


# -- end to end ------------------------------------------------------------------------------------------------------
FACTORS = {"factors": ["sharpness", "fisher_trace", "coherence", "conflict"], "examples": 4,
           "sharpness": {"steps": 2, "batch_size": 2}, "coherence": {"small_batch": 2, "large_batch": 4},
           "conflict": {"num_batches": 2}}


@pytest.mark.parametrize("tasks, aggregator", [(["depth"], "uniform"), (TASKS, "uniform"), (TASKS, "upgrad")])
def test_training_runs_end_to_end_and_measures_every_factor(release, one_thread, tasks, aggregator):
    root, _ = release
    ds = training.run({"setting": "cityscapes", "tasks": tasks, "setting_options": {**SIZES, "train_size": 4},
                       "model_options": TINY, "epochs": 1, "batch_size": 2, "eval_batch_size": 2, "device": "cpu",
                       "aggregator": aggregator, "metrics": FACTORS}, data_root=root, progress=False)
    assert ds.attrs["status"] == "complete" and ds.attrs["regime"] == "single_input"
    assert ds.attrs["steps_per_epoch"] == 2 and ds["task"].values.tolist() == tasks
    variables = ["train_loss", "val_loss", "test_loss", "val_score", "test_score", "sharpness", "fisher_trace",
                 "grad_cov_trace"] + (["conflict"] if len(tasks) > 1 else [])
    for variable in variables:
        assert np.isfinite(ds[variable].values).all(), variable
    primary = {"segmentation": ("miou", 1), "depth": ("abs_err", 0)}
    assert ds["primary_score"].values.tolist() == [primary[t][0] for t in tasks]
    assert ds["higher_is_better"].values.tolist() == [primary[t][1] for t in tasks]
    assert ds.attrs["model_info"] and "resnet18" in ds.attrs["model_info"]
