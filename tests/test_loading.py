"""diffssl_plugin.loading: exports load back as the same network from every entry point, published checkpoints
go through their kind's loader, and the pretraining record comes back from an export."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffssl_plugin.backbones import DDAEBackbone
from diffssl_plugin.data import load_split
from diffssl_plugin.errors import CheckpointError
from diffssl_plugin.io import write_json
from diffssl_plugin.loading import (
    export,
    is_export,
    load_backbone,
    load_checkpoint_backbone,
    read_pretrain_info,
)
from diffssl_plugin.methods.ddae import DDAE
from diffssl_plugin.methods.drl import VDRL
from diffssl_plugin.methods.mdsm import MDSM


class Result:  # what export() reads of a PretrainResult
    def as_record(self) -> dict:
        return {"method": "ddae", "steps": 3}


@pytest.fixture
def exported(tmp_path, tiny_unet_config):
    """A tiny DDAE learner exported with a pretraining record; returns (folder, learner)."""
    learner = DDAE(unet_config=tiny_unet_config, in_chans=1).eval()
    return export(learner, tmp_path / "export", Result()), learner


def test_export_loads_back_from_the_folder_and_its_backbone(exported):
    folder, learner = exported
    assert sorted(p.name for p in folder.iterdir()) == ["backbone", "diffusers", "pretrain.json"]
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        want = learner.feature_backbone.eval()(x)  # the export is the EMA representation
        for source in (folder, folder / "backbone"):
            assert is_export(source)
            torch.testing.assert_close(load_backbone(checkpoint=str(source)).eval()(x), want)
            torch.testing.assert_close(load_checkpoint_backbone(source, default_kind="adm").eval()(x), want)


def test_checkpoint_settings_apply_to_an_export(exported):
    folder, _ = exported
    backbone = load_checkpoint_backbone(folder, settings={"block": "up0", "timestep": 5})
    assert (backbone.block, backbone.timestep) == ("up0", 5)


def test_published_kind_goes_through_the_checkpoint_loader(tmp_path, tiny_unet_config):
    unet = UNet2DModel(**{**tiny_unet_config, "layers_per_block": 2}).eval()  # has DDAE's default out_6
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    assert not is_export(tmp_path / "ddpm")
    backbone = load_checkpoint_backbone(tmp_path / "ddpm", default_kind="diffusers_ddpm", settings={"block": "mid"})
    direct = DDAEBackbone(unet=unet, block="mid", timestep=backbone.timestep).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), direct(x), rtol=0, atol=0)


def test_pretrain_info_from_an_export(exported, tmp_path):
    folder, _ = exported
    assert read_pretrain_info(folder) == {"method": "ddae", "steps": 3}
    assert read_pretrain_info(folder / "backbone") == {"method": "ddae", "steps": 3}
    assert read_pretrain_info(tmp_path) is None
    (folder / "pretrain.json").write_text('{"steps": ')
    with pytest.raises(CheckpointError, match="pretrain.json"):
        read_pretrain_info(folder)
    write_json(folder / "pretrain.json", [1, 2])
    with pytest.raises(CheckpointError, match="JSON object"):
        read_pretrain_info(folder)


# ------------------------------------------------------------------ the exported architecture names the data's shape
def _cifar_shaped_unet(**extra) -> dict:
    return {**TINY_UNET, "sample_size": 32, "in_channels": 3, "out_channels": 3, **extra}


CIFAR_SHAPED = {  # tiny learners for 3×32×32 images, and the registered name their export must record
    "ddae": (lambda: DDAE(unet_config=_cifar_shaped_unet()), "ddae_unet_cifar10"),
    "vdrl": (
        lambda: VDRL(
            code_dim=4,
            encoder_config={"in_chans": 3, "image_size": 32, "channels": (8, 16), "norm_num_groups": 4},
            unet_config=_cifar_shaped_unet(time_embedding_type="fourier", class_embed_type="identity"),
        ),
        "vdrl_time_encoder_cifar10",
    ),
    "mdsm": (lambda: MDSM(net="res12", width=2, in_chans=3, img_size=32), "mdsm_ebm_cifar10"),
}


@pytest.mark.parametrize("method", sorted(CIFAR_SHAPED))
def test_a_cifar10_shaped_pretrain_exports_and_records_the_cifar10_architecture(method, tmp_path):
    """One optimiser step on Fashion-MNIST images made CIFAR-10-shaped (3×32×32); the export names the CIFAR-10
    architecture (not the Fashion-MNIST one), and timm rebuilds that network from it."""
    make, name = CIFAR_SHAPED[method]
    learner = make()
    images = F.pad(load_split("fashion_mnist", "test", download=False).images[:4], (2, 2, 2, 2))
    images = images.float().div(255).repeat(1, 3, 1, 1)
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-3)
    learner.training_loss(images, torch.Generator().manual_seed(0)).backward()
    opt.step()
    learner.after_optimizer_step()
    folder = export(learner.eval(), tmp_path / "export")
    assert json.loads((folder / "backbone" / "config.json").read_text())["architecture"] == name
    loaded = timm.create_model(f"local-dir:{folder / 'backbone'}", pretrained=True).eval()
    assert loaded.pretrained_cfg["architecture"] == name  # what bench and eval record as the backbone
    assert type(loaded) is type(learner.backbone) and loaded.pretrained_cfg["input_size"] == (3, 32, 32)
    x = images[:2] * 2 - 1 if learner.backbone.input_range == (-1.0, 1.0) else images[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), learner.backbone.eval()(x))


def test_a_grey_export_keeps_the_fashion_mnist_name(exported):
    folder, learner = exported
    assert learner.backbone.architecture == "ddae_unet_fmnist"
    assert load_backbone(checkpoint=str(folder)).pretrained_cfg["architecture"] == "ddae_unet_fmnist"
