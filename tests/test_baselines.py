"""SimCLR and MAE baselines: timm backbones, batch augmentations, masking, learning on real Fashion-MNIST,
budgets, exports, records, and the reference configs."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from diffssl_plugin.backbones.baselines import CifarResNet, MAEViT, norm_stats
from diffssl_plugin.errors import InputError
from diffssl_plugin.eval import EvalConfig, evaluate
from diffssl_plugin.eval.features import normalise
from diffssl_plugin.loading import export
from diffssl_plugin.methods import get_method
from diffssl_plugin.methods.augment import color_jitter, random_resized_crop
from diffssl_plugin.methods.mae import MAE, random_token_mask
from diffssl_plugin.methods.reference_configs import load_config, pretrain_from_config
from diffssl_plugin.methods.simclr import SimCLR, simclr_transform
from diffssl_plugin.methods.training import Budget, pretrain
from diffssl_plugin.runtime import cpu_has_fast_bf16

# tiny versions of both learners: same code, CPU-test sizes
TINY = {
    "simclr": {"backbone_args": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}},
    "mae": {
        "backbone_args": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "decoder_dim": 32,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "warmup_steps": 1,
    },
}


@pytest.fixture(scope="module")
def images01(fmnist_uint8) -> torch.Tensor:
    """64 real Fashion-MNIST test images in [0, 1]."""
    return fmnist_uint8.float().div(255.0)


def _learner(name: str, **kw):
    torch.manual_seed(0)
    return get_method(name)["model"](in_chans=1, **{**TINY[name], **kw})


# ---------------------------------------------------------------- backbones through timm
@pytest.mark.parametrize("name, dim", [("simclr_resnet18_cifar", 512), ("mae_vit_tiny_p4", 192)])
def test_backbones_load_through_timm(name, dim, images01):
    model = timm.create_model(name, num_classes=0).eval()
    x = normalise(model, images01[:4])
    with torch.no_grad():
        out = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        maps = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert out.shape == (4, dim) == pre.shape and model.num_features == dim
    assert torch.allclose(out, pre)
    assert len(maps) == 2 and all(m.dim() == 4 and m.shape[0] == 4 for m in maps)
    reductions = [f["reduction"] for f in model.feature_info]
    assert reductions == sorted(reductions)
    assert model.pretrained_cfg["mean"] == (0.449,) and model.pretrained_cfg["num_classes"] == 0
    feats = timm.create_model(name, features_only=True, out_indices=(0, 1))
    assert len(feats(x)) == 2
    head = timm.create_model(name, num_classes=7)
    assert head(x).shape == (4, 7)


def test_resnet_has_the_cifar_stem():
    model = timm.create_model("simclr_resnet18_cifar", in_chans=3)
    assert isinstance(model, CifarResNet)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 3
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.pretrained_cfg["mean"] == norm_stats(3)[0]
    assert model.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 512, 4, 4)  # stride 8, not 32


def test_mae_vit_extract_is_a_block_sweep(images01):
    vit = timm.create_model("mae_vit_tiny_p4", depth=3, embed_dim=24, num_heads=2).eval()
    assert isinstance(vit, MAEViT) and vit.block_names == ["blocks.0", "blocks.1", "blocks.2"]
    x = normalise(vit, images01[:3])
    with torch.no_grad():
        feats = vit.extract(x, [0, 10], ["blocks.0", "blocks.2"], pool="avg2x2")
        maps = vit.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert set(feats) == {(0, "blocks.0"), (0, "blocks.2"), (10, "blocks.0"), (10, "blocks.2")}
    assert feats[(0, "blocks.2")].shape == (3, 24 * 4)
    assert torch.equal(feats[(0, "blocks.0")], feats[(10, "blocks.0")])  # a ViT has no noise level
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps[0], 2).flatten(1)
    assert torch.allclose(feats[(0, "blocks.0")], pooled)
    with pytest.raises(KeyError, match="blocks.7"):
        vit.extract(x, [0], ["blocks.7"])


def test_mae_sweep_reads_the_output_and_blocks_from_one_forward(images01, monkeypatch):
    """A sweep over the pooled output and blocks costs one ViT forward per batch, with the same numbers as
    ``model(x)`` and ``extract``."""
    from diffssl_plugin.eval.features import OUTPUT, Readout, _forward_batch

    vit = timm.create_model("mae_vit_tiny_p4", depth=3, embed_dim=24, num_heads=2).eval()
    x = normalise(vit, images01[:3])
    calls = []
    inner = MAEViT.forward_intermediates
    monkeypatch.setattr(MAEViT, "forward_intermediates", lambda self, *a, **k: calls.append(1) or inner(self, *a, **k))
    readouts = [OUTPUT, Readout(0, "blocks.1", "avg2x2")]
    with torch.no_grad():
        feats = _forward_batch(vit, x, readouts, [0], ["blocks.1"])
        assert len(calls) == 1
        assert torch.equal(feats[OUTPUT], vit(x))
        assert torch.equal(feats[readouts[1]], vit.extract(x, [0], ["blocks.1"], pool="avg2x2")[(0, "blocks.1")])


@pytest.mark.parametrize(
    "name, prefers", [("simclr_resnet18_cifar", True), ("mdsm_ebm_fmnist", True), ("ddae_unet_fmnist", False)]
)
def test_channels_last_where_a_backbone_runs_faster_in_it(name, prefers, images01):
    """Convolutional backbones that declare it are converted to channels-last by feature extraction (same
    features, weights saved contiguous); the GroupNorm U-Nets, slower in it on CPUs, stay NCHW."""
    from diffssl_plugin.backbones.memory_format import prefers_channels_last
    from diffssl_plugin.data import ImageSet
    from diffssl_plugin.eval.features import extract_features
    from diffssl_plugin.io import state_dict_sha256

    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=1).eval()
    assert prefers_channels_last(model) is prefers
    conv = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)
    ][-1]
    images = (images01[:16] * 255).round().to(torch.uint8)
    data = ImageSet("t", "test", images, torch.zeros(16, dtype=torch.long), tuple("0123456789"))
    x = normalise(model, images01[:16])
    with torch.no_grad():
        before, weights = model(x), state_dict_sha256(model.state_dict())
    feats = extract_features(model, data, amp=False, progress=False)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is prefers
    assert not prefers or not conv.weight.is_contiguous()
    assert torch.allclose(next(iter(feats.values())), before, atol=1e-4, rtol=1e-4)
    assert state_dict_sha256(model.state_dict()) == weights  # hashes and exports do not see the layout


# ---------------------------------------------------------------- augmentations and masking
def test_simclr_views_are_batched_seeded_and_valid(images01):
    views = simclr_transform(images01, torch.Generator().manual_seed(1))
    again = simclr_transform(images01, torch.Generator().manual_seed(1))
    other = simclr_transform(images01, torch.Generator().manual_seed(2))
    assert views.shape == (2, *images01.shape) and torch.isfinite(views).all()
    assert torch.equal(views, again) and not torch.equal(views, other)
    assert not torch.allclose(views[0], views[1])  # two different views of each image
    mean, std = norm_stats(1)
    lo, hi = (0 - mean[0]) / std[0], (1 - mean[0]) / std[0]
    assert views.min() >= lo - 1e-4 and views.max() <= hi + 1e-4


def test_crop_at_full_scale_is_identity_or_flip(images01):
    x = images01[:8]
    out = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    same = (out - x).abs().flatten(1).amax(1) < 1e-5
    flipped = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same | flipped).all()) and same.any() and flipped.any()


def test_color_jitter_grey_keeps_shape_rgb_changes_hue():
    gen = torch.Generator().manual_seed(0)
    grey = torch.rand(6, 1, 8, 8, generator=gen)
    assert color_jitter(grey, gen, prob=1.0).shape == grey.shape
    rgb = torch.rand(6, 3, 8, 8, generator=gen)
    only_hue = color_jitter(rgb, gen, brightness=0, contrast=0, saturation=0, hue=0.5, prob=1.0)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert not torch.allclose(only_hue, rgb, atol=1e-3)
    unclamped = (only_hue > 1e-4).all(1) & (only_hue < 1 - 1e-4).all(1)  # hue rotation keeps luma Y
    assert torch.allclose(((only_hue - rgb) * luma).sum(1)[unclamped], torch.zeros(()), atol=1e-4)


def test_random_token_mask_keeps_class_token_and_partitions():
    keep, mask = random_token_mask(5, 49, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (5, 13) and mask.shape == (5, 37)  # lightly's counts: int(49·0.25) + class token
    assert (keep[:, 0] == 0).all() and (mask > 0).all()
    assert torch.equal(torch.cat([keep, mask], 1).sort(1).values, torch.arange(50).expand(5, 50))
    again, _ = random_token_mask(5, 49, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_mae_rejects_images_of_the_wrong_size():
    model = _learner("mae")
    with pytest.raises(InputError, match="28×28"):
        model.training_loss(torch.rand(2, 1, 32, 32), torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- learning on real data
@pytest.mark.parametrize("name", ["simclr", "mae"])
def test_loss_decreases_on_real_fashion_mnist(name, images01):
    """A few optimiser steps on one fixed batch with fixed augmentations and masks must lower the loss."""
    model = _learner(name)
    opt = model.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(8):
        loss = model.training_loss(images01[:32], torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize("name", ["simclr", "mae"])
def test_budget_exports_and_records(name, tmp_path):
    """Stops at the step budget, a FLOP budget too; the export loads through timm with identical outputs; the
    harness's records carry the budget."""
    res = pretrain(
        name,
        budget=Budget(steps=3),
        out_dir=tmp_path / "steps",
        batch_size=16,
        max_images=200,
        progress=False,
        method_kwargs=TINY[name],
    )
    assert abs(res.steps - 3) <= 1 and res.images_seen == res.steps * 16
    assert res.flops_per_image > 0 and res.train_flops == pytest.approx(res.flops_per_image * 16 * res.steps)
    res2 = pretrain(
        name,
        budget=Budget(flops=2.5 * 16 * res.flops_per_image),
        out_dir=tmp_path / "flops",
        batch_size=16,
        max_images=200,
        progress=False,
        method_kwargs=TINY[name],
    )
    assert abs(res2.steps - 2) <= 1

    folder = tmp_path / "steps" / "export" / "backbone"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == get_method(name)["model"].timm_architecture
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    model = _learner(name)
    from safetensors.torch import load_file

    model.backbone.load_state_dict(load_file(str(folder / "model.safetensors")))
    x = normalise(loaded, torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.backbone.eval()(x))
    assert loaded.num_features == model.backbone.num_features

    budget = {"budget": res.budget, "steps": res.steps, "train_flops": res.train_flops}
    cfg = EvalConfig(train_images=100, val_images=50, test_images=100, knn_ks=(5,), final_cs=(1.0,), sweep_cs=(1.0,))
    records = evaluate(loaded, name, config["architecture"], cfg, protocols=("linear",), budget=budget, progress=False)
    assert records and all(r["budget"] == budget for r in records)
    assert {r["protocol"]["name"] for r in records if r["split"] == "test"} >= {"linear", "knn5"}


def test_export_round_trip_of_an_untrained_learner(tmp_path):
    """``loading.export`` of a learner with non-default widths: timm rebuilds the same network."""
    model = _learner("simclr").eval()
    export(model, tmp_path / "export")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export' / 'backbone'}", pretrained=True).eval()
    assert loaded.channels == [8, 16, 32, 64] and loaded.num_features == 64
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.backbone(x))


# ---------------------------------------------------------------- reference configs
@pytest.mark.parametrize("name, method", [("simclr_cifar10", SimCLR), ("mae_cifar10", MAE)])
def test_reference_configs_load_and_run_one_step(name, method, tmp_path):
    config = load_config(name)
    assert get_method(config["method"])["model"] is method
    assert config["dataset"] == "cifar10" and config["batch_size"] == 128 and config["epochs"] == 200
    assert config["reference"]  # the published numbers stand beside the settings
    res = pretrain_from_config(
        name,
        dataset="fashion_mnist",
        budget=Budget(steps=1),
        batch_size=8,
        max_images=40,
        out_dir=tmp_path,
        progress=False,
    )
    assert res.steps == 1 and res.final_loss is not None and res.final_loss == res.final_loss
    # the config's bf16-mixed, in fp32 where this CPU would only emulate bf16 (see Runtime.with_config_precision)
    assert res.precision == ("bf16-mixed" if cpu_has_fast_bf16() else "32-true")


def test_reference_config_values_are_lightlys():
    simclr = load_config("simclr_cifar10")
    kwargs = simclr["method_kwargs"]
    assert kwargs["temperature"] == 0.5 and kwargs["lr"] == pytest.approx(0.06)
    assert simclr["reference"]["knn_top1"]["batch128_epochs200"] == pytest.approx(0.847)
    with pytest.raises(InputError, match="simclr_cifar10"):
        load_config("no_such_config")
