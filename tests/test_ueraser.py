"""UEraser: the augmentation runs batched on the input's device, the max-over-K loss picks each
sample's worst view and back-propagates through that one only, the schedules, and an end-to-end
build on real digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import defenses.ueraser  # noqa: F401  (registers ueraser_lite / ueraser / ueraser_max)
from harness.core.defense import BuildContext, build_defense
from defenses.ueraser import UEraserPolicy, max_over_k_loss, per_view_losses, random_jpeg
from harness.data.datasets import load_dataset
from harness.core.errors import UserError
from harness.data.models import build_model
from harness.data.training import accuracy

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits"})


@pytest.fixture(scope="module")
def mnist_batch():
    data = load_dataset({"name": "mnist5k"})
    return data.train_x[:32].float() / 255.0, data.train_y[:32]


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("policy", ["default", "jpeg"])
def test_policy_runs_batched_on_the_inputs_device(mnist_batch, device, policy):
    x = mnist_batch[0].to(device)
    before = x.clone()
    torch.manual_seed(0)
    out = UEraserPolicy(policy).to(device)(x)
    assert out.device.type == device.type and out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(x, before)  # the caller's batch is never modified
    # per-sample randomness within one batched call: the same image twice gets two different views
    twice = torch.cat([x[:1], x[:1]])
    views = UEraserPolicy(policy).to(device)(twice)
    assert not torch.allclose(views[0], views[1])
    assert (out - x).abs().mean() > 0.02  # strong augmentation, not a no-op


def test_policy_is_deterministic_under_the_global_seed(mnist_batch):
    x = mnist_batch[0]
    policy = UEraserPolicy()
    torch.manual_seed(5)
    a = policy(x)
    torch.manual_seed(5)
    b = policy(x)
    assert torch.equal(a, b)


def test_random_jpeg_codes_grey_images_without_touching_them(mnist_batch):
    x = mnist_batch[0]
    before = x.clone()
    torch.manual_seed(0)
    out = random_jpeg(x, 10, 11)  # quality 10: visibly lossy
    assert torch.equal(x, before)
    assert out.shape == x.shape and (out - x).abs().mean() > 0.005


@pytest.mark.parametrize("joint_forward", [False, True])
def test_max_over_k_picks_each_samples_worst_view_and_backprops_through_it_only(mnist_batch, joint_forward):
    x, y = mnist_batch
    torch.manual_seed(0)
    model = build_model({"name": "small_cnn"}, 10, (1, 28, 28))
    policy = UEraserPolicy()
    views = [policy(x).requires_grad_(True) for _ in range(4)]
    loss, chosen = max_over_k_loss(model, views, y, joint_forward=joint_forward)

    with torch.no_grad():  # independent reference: per-view losses computed one view at a time
        ref = torch.stack([F.cross_entropy(model(v), y, reduction="none") for v in views])
    assert torch.allclose(loss, ref.max(dim=0).values.mean(), atol=1e-6)
    assert torch.equal(chosen, ref.argmax(dim=0))
    assert len(set(chosen.tolist())) > 1  # samples do pick different views

    loss.backward()
    for k, v in enumerate(views):
        per_sample = v.grad.flatten(1).abs().sum(dim=1)
        assert bool((per_sample[chosen == k] > 0).all())
        assert bool((per_sample[chosen != k] == 0).all())

    # the parameter gradient equals that of the mean CE over the chosen views alone
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    picked = torch.stack([views[int(k)][i] for i, k in enumerate(chosen)]).detach()
    F.cross_entropy(model(picked), y).backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_per_view_losses_shape(mnist_batch):
    x, y = mnist_batch
    model = build_model({"name": "small_cnn"}, 10, (1, 28, 28))
    assert per_view_losses(model, [x, x, x], y).shape == (3, len(y))


def test_schedules():
    lite, mid, full = (build_defense({"name": n}) for n in ("ueraser_lite", "ueraser", "ueraser_max"))
    assert [lite.adv_epochs(200), mid.adv_epochs(200), full.adv_epochs(200)] == [0, 50, 200]
    assert mid.adv_epochs(8) == 2 and full.adv_epochs(8) == 8
    assert build_defense({"name": "ueraser_max", "k": 1}).adv_epochs(8) == 0
    assert "kornia" in full.describe()
    with pytest.raises(UserError, match="policy"):
        build_defense({"name": "ueraser", "policy": "sepia"})
    with pytest.raises(UserError, match="adv_fraction"):
        build_defense({"name": "ueraser", "adv_fraction": 2})


def test_ueraser_max_trains_end_to_end_on_real_digits(digits, tmp_path):
    defense = build_defense({"name": "ueraser_max", "k": 2, "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.003}})
    seen = []
    ctx = BuildContext(data=digits, model_cfg={"name": "small_cnn"}, device=torch.device("cpu"), seed=0,
                       cache_dir=tmp_path, progress=False,
                       on_epoch_end=lambda e, m: seen.append(e) or {"test_acc": accuracy(m, digits.test_x, digits.test_y, device=torch.device("cpu"))})
    clf = defense.build(ctx)
    assert seen == [0, 1]
    info = clf.info
    assert info["ueraser"] == {"k": 2, "adv_epochs": 2, "policy": "default"}
    n = len(digits.train_y)
    # K = 2 views per sample in both epochs: 2 forward passes per sample and epoch (+1 for train_acc)
    assert info["train"]["forward_passes"] >= 2 * 2 * n
    assert info["train"]["backward_passes"] == 2 * 2 * n
    assert [h["epoch"] for h in info["train"]["history"]] == [0, 1]
    acc = accuracy(clf.module, digits.test_x, digits.test_y, device=torch.device("cpu"))
    assert acc > 0.3  # it learns through the strong augmentation (chance is 0.1)
