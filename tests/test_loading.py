"""diffssl_plugin.loading: exports load back as the same network from every entry point, published checkpoints
go through their kind's loader, and the pretraining record comes back from an export."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffssl_plugin.backbones import DDAEBackbone
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
