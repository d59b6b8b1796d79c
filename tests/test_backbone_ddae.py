"""DDAE backbone: timm contract, one-forward extraction with early exit, noise, pooling, input checks, loading."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffssl_plugin.backbones import UNET_PRESETS, DDAEBackbone, RawPixels
from diffssl_plugin.backbones.checks import check_model_inputs
from diffssl_plugin.diffusion import add_noise
from diffssl_plugin.errors import CheckpointError, InputError, UnknownNameError


class CallCounter:
    """Counts calls of a module through a forward (pre-)hook; use as a context manager."""

    def __init__(self, module, pre: bool = True):
        self.module, self.pre, self.n = module, pre, 0

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        reg = self.module.register_forward_pre_hook if self.pre else self.module.register_forward_hook
        self.handle = reg(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _no_hooks_left(model: DDAEBackbone) -> bool:
    return all(not m._forward_hooks for m in model.unet.modules())


@pytest.fixture
def x8(real_batch):
    return real_batch[:4]


@pytest.fixture
def x28(real_batch28):
    return real_batch28[:4]


# ================================================================ timm contract (fmnist_small preset, 28×28)
def test_create_model_feature_extractor(x28):
    m = timm.create_model("ddae_unet_fmnist", num_classes=0).eval()
    assert isinstance(m, DDAEBackbone)
    assert m.block == "mid" and m.timestep == 10 and m.pool == "avg2x2"
    assert m.num_features == 64 * 4
    with torch.no_grad():
        out = m(x28)
    assert out.shape == (4, m.num_features)
    assert torch.isfinite(out).all()
    assert isinstance(m.get_classifier(), torch.nn.Identity)


def test_create_model_classifier_and_pre_logits(x28):
    m = timm.create_model("ddae_unet_fmnist", num_classes=10).eval()
    head = m.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.in_features == m.num_features and head.out_features == 10
    with torch.no_grad():
        logits = m(x28)
        feats = m.forward_features(x28)
        pre = m.forward_head(feats, pre_logits=True)
    assert logits.shape == (4, 10)
    assert feats.shape == (4, 64, 7, 7)  # the mid block's map at 28/4
    assert pre.shape == (4, m.num_features)
    torch.testing.assert_close(pre, F.adaptive_avg_pool2d(feats, 2).flatten(1))
    torch.testing.assert_close(logits, head(pre))

    m.reset_classifier(5)
    assert m.get_classifier().out_features == 5 and m.num_classes == 5
    with torch.no_grad():
        assert m(x28).shape == (4, 5)
    m.reset_classifier(0, global_pool="avg")
    assert isinstance(m.get_classifier(), torch.nn.Identity)
    assert m.num_features == 64 and m.pool == "avg"
    with torch.no_grad():
        torch.testing.assert_close(m(x28), feats.mean(dim=(2, 3)))


def test_classifier_trains_through_the_unet(x8, tiny_unet_config):
    m = DDAEBackbone(unet_config=tiny_unet_config, block="up0", num_classes=3)
    loss = F.cross_entropy(m(x8), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert m.head.weight.grad is not None and m.head.weight.grad.abs().sum() > 0
    assert m.unet.conv_in.weight.grad is not None and m.unet.conv_in.weight.grad.abs().sum() > 0
    # the forward stopped after up0, so the last up block and the output conv took no part
    assert all(p.grad is None for p in m.unet.up_blocks[-1].parameters())
    assert all(p.grad is None for p in m.unet.conv_out.parameters())


def test_features_only_matches_feature_info(x28):
    fm = timm.create_model("ddae_unet_fmnist", features_only=True)
    info = fm.feature_info
    chans, reds = info.channels(), info.reduction()
    assert chans == [32, 64, 64, 64] and reds == [1, 1, 2, 4]
    assert all(a <= b for a, b in itertools.pairwise(reds))
    with torch.no_grad():
        outs = fm(x28)
    assert len(outs) == len(chans)
    for o, c, r in zip(outs, chans, reds):
        assert o.shape == (4, c, 28 // r, 28 // r)

    sub = timm.create_model("ddae_unet_fmnist", features_only=True, out_indices=(0, 3))
    assert sub.feature_info.channels() == [32, 64]
    with torch.no_grad():
        outs = sub(x28)
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 28, 28), (64, 7, 7)]


def test_feature_info_of_backbone(tiny_backbone):
    info = tiny_backbone.feature_info
    assert [i["block"] for i in info] == ["up1", "up0", "mid"]
    assert [i["module"] for i in info] == ["unet.up_blocks.1", "unet.up_blocks.0", "unet.mid_block"]
    reds = [i["reduction"] for i in info]
    assert reds == sorted(reds) == [1, 1, 2]
    for i in info:  # the module path really names that module
        assert tiny_backbone.get_submodule(i["module"]) is tiny_backbone.block_module(i["block"])
        c, h, _w = tiny_backbone.block_shapes[i["block"]]
        assert c == i["num_chs"] and h == 8 // i["reduction"]


def test_forward_intermediates(x28):
    m = timm.create_model("ddae_unet_fmnist").eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x28)
        only = m.forward_intermediates(x28, intermediates_only=True)
        last2 = m.forward_intermediates(x28, indices=2, intermediates_only=True)
        ff = m.forward_features(x28)
    torch.testing.assert_close(final, ff)
    assert isinstance(inter, list) and isinstance(only, list)
    assert len(inter) == len(only) == len(m.feature_info) == 4
    for t, i in zip(inter, m.feature_info):
        assert t.shape == (4, i["num_chs"], 28 // i["reduction"], 28 // i["reduction"])
    for a, b in zip(inter, only):
        torch.testing.assert_close(a, b)
    assert len(last2) == 2
    for a, b in zip(last2, inter[2:]):
        torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="NHWC"):
        m.forward_intermediates(x28, output_fmt="NHWC")


def test_data_config_and_transform(fmnist_uint8):
    from PIL import Image

    m = timm.create_model("ddae_unet_fmnist").eval()
    cfg = timm.data.resolve_model_data_config(m)
    assert cfg["mean"] == (0.5,) and cfg["std"] == (0.5,) and cfg["input_size"] == (1, 28, 28)
    tf = timm.data.create_transform(**cfg)
    x = torch.stack([tf(Image.fromarray(img[0].numpy(), "L")) for img in fmnist_uint8[:2]])
    assert x.shape == (2, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, fmnist_uint8[:2].float() / 127.5 - 1, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert m(x).shape == (2, m.num_features)


# ================================================================ extraction (tiny 8×8 U-Net)
def _plain_hook_features(model: DDAEBackbone, x: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
    """Block outputs from an ordinary full ``model.unet(x_t, t)`` forward, captured by our own hooks."""
    unet = model.unet
    modules = {
        "down0": unet.down_blocks[0],
        "down1": unet.down_blocks[1],
        "mid": unet.mid_block,
        "up0.1": unet.up_blocks[0].resnets[1],
        "up0": unet.up_blocks[0],
        "up1": unet.up_blocks[1],
    }
    feats = {}

    def keep(name):
        def hook(module, args, output):
            feats[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    x_t = add_noise(model.scheduler, x, model.draw_noise(x, t), tt)
    try:
        out = unet(x_t, tt).sample
    finally:
        for h in handles:
            h.remove()
    assert out.shape == x.shape
    return feats


def test_extract_equals_plain_forward_hooks(tiny_backbone, x8):
    names = ["down0", "down1", "mid", "up0.1", "up0", "up1"]
    with torch.no_grad():
        got = tiny_backbone.extract(x8, [0, 10, 300], names, pool=None)
        for t in (0, 10, 300):
            ref = _plain_hook_features(tiny_backbone, x8, t)
            for n in names:
                torch.testing.assert_close(got[(t, n)], ref[n], rtol=1e-5, atol=1e-6)
    assert set(got) == {(t, n) for t in (0, 10, 300) for n in names}
    # the timestep matters
    assert not torch.allclose(got[(0, "up1")], got[(300, "up1")])


def test_one_unet_forward_per_timestep(tiny_backbone, x8):
    unet = tiny_backbone.unet
    with torch.no_grad(), CallCounter(unet.conv_in) as c:
        tiny_backbone.extract(x8, [0, 10], ["down0", "mid", "up0.1", "up1"], pool="avg")
    assert c.n == 2
    with torch.no_grad(), CallCounter(unet.conv_in) as c:
        tiny_backbone.extract(x8, [5, 6, 7], ["up1"], pool="avg")
    assert c.n == 3
    with torch.no_grad(), CallCounter(unet.conv_in) as c:
        tiny_backbone(x8)
    assert c.n == 1
    assert _no_hooks_left(tiny_backbone)


def test_extraction_stops_after_last_block_needed(tiny_backbone, x8):
    unet = tiny_backbone.unet
    with (
        torch.no_grad(),
        CallCounter(unet.up_blocks[-1], pre=False) as last_up,
        CallCounter(unet.mid_block) as mid,
        CallCounter(unet.down_blocks[1]) as down1,
        CallCounter(unet.conv_in) as first,
    ):
        out = tiny_backbone.extract(x8, [10], ["down0"], pool="avg")
    assert first.n == 1
    assert down1.n == 0 and mid.n == 0 and last_up.n == 0
    assert out[(10, "down0")].shape == (4, 8)

    with torch.no_grad(), CallCounter(unet.up_blocks[-1]) as last_up, CallCounter(unet.conv_norm_out) as norm_out:
        tiny_backbone.extract(x8, [10], ["mid"], pool="avg")
    assert last_up.n == 0 and norm_out.n == 0

    with (
        torch.no_grad(),
        CallCounter(unet.up_blocks[-1], pre=False) as last_up,
        CallCounter(unet.conv_norm_out) as norm_out,
    ):
        tiny_backbone.extract(x8, [10], ["up1", "down0"], pool="avg")
    assert last_up.n == 1 and norm_out.n == 0  # the decoder ran to up1, the output head did not
    assert _no_hooks_left(tiny_backbone)
    # the U-Net still runs in full after an early exit
    with torch.no_grad():
        assert unet(x8, torch.tensor([3] * 4)).sample.shape == x8.shape


@pytest.mark.parametrize("unet_config", ["tiny", "adm_tiny"])
def test_one_block_alone_reads_the_same_map_as_with_others(tiny_unet_config, unet_config):
    """One block is read through a truncated view of the U-Net (no hooks), several through hooks: the same maps,
    bit for bit; adm_tiny has attention up blocks and resnet upsamplers."""
    from diffssl_plugin.checkpoints.adm import adm_config, adm_unet_config

    config = tiny_unet_config if unet_config == "tiny" else adm_unet_config(adm_config("adm_tiny"))
    torch.manual_seed(0)
    m = DDAEBackbone(unet_config=config).eval()
    names = m.block_names if unet_config == "tiny" else ["down2", "mid", "up0.1", "up1", "up2.2", "up3.0", "up5"]
    x = torch.rand(2, m.in_chans, m.image_size, m.image_size) * 2 - 1
    with torch.no_grad():
        together = m.extract(x, [10], names, pool=None)
        for n in names:
            assert torch.equal(m.extract(x, [10], [n], pool=None)[(10, n)], together[(10, n)]), n
    own = {id(p) for p in m.unet.parameters()}
    assert m._views and all(id(p) in own for v in m._views.values() for p in v.parameters())
    assert _no_hooks_left(m)


def test_construction_and_with_settings_run_no_forward(tiny_unet_config):
    unet = UNet2DModel(**tiny_unet_config)
    with CallCounter(unet.conv_in) as c:
        m = DDAEBackbone(unet=unet)
        other = m.with_settings(block="up0", timestep=50)
    assert c.n == 0 and other.unit_shapes == m.unit_shapes and other.block_shapes["up0"] == (16, 8, 8)


def test_seeded_noise_is_finite_for_every_image_of_a_dataset():
    """The counter-based draw never hits u = 1 or 0 (ndtri → ±inf, then NaN features): checked over 60k images ×
    784 pixels at two timesteps (24-bit uniforms rounded to 1.0 for a few of these in float32)."""
    from diffssl_plugin.diffusion.noise import indexed_noise

    for t in (0, 10):
        eps = indexed_noise(0, t, torch.arange(60_000), (1, 28, 28))
        assert bool(torch.isfinite(eps).all()) and float(eps.abs().max()) < 5.5


def test_seeded_noise_is_independent_per_image_and_timestep(tiny_backbone, x8):
    """DDAE and diffssl draw fresh ε per image and per t; the seeded draw keeps that independence, as a function
    of (seed, t, dataset index) only."""
    eps = tiny_backbone.draw_noise(x8, 10)
    assert eps.shape == x8.shape
    for i in range(1, 4):
        assert not torch.allclose(eps[0], eps[i])  # not one image's noise shared by the batch
    assert not torch.allclose(eps, tiny_backbone.draw_noise(x8, 100))  # nor by the timesteps
    assert torch.equal(tiny_backbone.draw_noise(x8[2:4], 10, index=torch.tensor([2, 3])), eps[2:4])
    assert torch.equal(tiny_backbone.draw_noise(x8, 10), eps)  # reproducible
    assert not [k for k in tiny_backbone.state_dict() if "noise" in k]  # nothing saved with the weights
    from diffssl_plugin.diffusion.noise import indexed_noise

    big = indexed_noise(0, 10, torch.arange(512), (3, 16, 16))
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    assert float(torch.corrcoef(big.flatten(1)[:64]).triu(1).abs().max()) < 0.15
    with pytest.raises(InputError, match="one dataset position per image"):
        tiny_backbone.draw_noise(x8, 10, index=torch.arange(3))


def test_feature_extraction_noise_ignores_batch_size(tiny_backbone, fmnist_uint8):
    """extract_features passes each image's dataset index: the same features whatever the batch size."""
    from diffssl_plugin.data import ImageSet
    from diffssl_plugin.eval.features import Readout, extract_features

    images = F.interpolate(fmnist_uint8[:10].float(), size=(8, 8), mode="area").round().to(torch.uint8)
    data = ImageSet("fm8", "test", images, torch.zeros(10, dtype=torch.long), tuple("0123456789"))
    r = Readout(100, "up1", "avg")
    kw = {"progress": False, "amp": False, "device": "cpu"}
    a = extract_features(tiny_backbone, data, [r], batch_size=10, **kw)[r]
    b = extract_features(tiny_backbone, data, [r], batch_size=3, **kw)[r]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_edits_refuse_gradient_checkpointing(tiny_backbone, x8):
    tiny_backbone.set_grad_checkpointing(True)
    with pytest.raises(InputError, match="gradient checkpointing"):
        tiny_backbone.extract(x8, [10], ["up1"], edits={"mid": lambda h: h})
    with torch.no_grad():  # no backward, nothing recomputed
        tiny_backbone.extract(x8, [10], ["up1"], edits={"mid": lambda h: h})


def test_block_shapes_match_extracted_maps(tiny_backbone, x8):
    names = tiny_backbone.block_names
    assert names == ["down0", "down1", "mid", "up0.0", "up0.1", "up0", "up1.0", "up1.1", "up1"]
    with torch.no_grad():
        got = tiny_backbone.extract(x8, [10], names, pool=None)
    for n in names:
        assert tuple(got[(10, n)].shape) == (4, *tiny_backbone.block_shapes[n]), n
    assert tiny_backbone.block_shapes["down0"] == (8, 4, 4)
    assert tiny_backbone.block_shapes["up0"] == (16, 8, 8)
    assert tiny_backbone.block_module("up1.0") is tiny_backbone.unet.up_blocks[1].resnets[0]


def test_noise_seed_is_deterministic_and_batch_independent(tiny_backbone, x8):
    with torch.no_grad():
        a = tiny_backbone.extract(x8, [10, 100], ["mid", "up1"], pool=None)
        b = tiny_backbone.extract(x8, [10, 100], ["mid", "up1"], pool=None)
        one = tiny_backbone.extract(x8[:1], [10, 100], ["mid", "up1"], pool=None, index=torch.tensor([0]))
        back = torch.arange(4).flip(0)
        reordered = tiny_backbone.extract(x8.flip(0), [10, 100], ["mid", "up1"], pool=None, index=back)
    for k in a:
        assert torch.equal(a[k], b[k])
        torch.testing.assert_close(one[k][0], a[k][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reordered[k].flip(0), a[k], rtol=1e-5, atol=1e-5)
    other_seed = tiny_backbone.with_settings(noise_seed=1)
    with torch.no_grad():
        c = other_seed.extract(x8, [100], ["up1"], pool=None)
    assert not torch.allclose(c[(100, "up1")], a[(100, "up1")])


def test_noise_seed_none_draws_fresh_noise(tiny_backbone, x8):
    fresh = tiny_backbone.with_settings(noise_seed=None)
    with torch.no_grad():
        a = fresh.extract(x8, [100], ["up1"], pool=None)[(100, "up1")]
        b = fresh.extract(x8, [100], ["up1"], pool=None)[(100, "up1")]
    assert not torch.allclose(a, b)


def test_pooling_modes(tiny_backbone, x8):
    with torch.no_grad():
        maps = tiny_backbone.extract(x8, [10], ["up0"], pool=None)[(10, "up0")]
        none = tiny_backbone.extract(x8, [10], ["up0"], pool="none")[(10, "up0")]
        avg = tiny_backbone.extract(x8, [10], ["up0"], pool="avg")[(10, "up0")]
        avg2 = tiny_backbone.extract(x8, [10], ["up0"], pool="avg2x2")[(10, "up0")]
    assert maps.shape == (4, 16, 8, 8)
    assert torch.equal(maps, none)
    assert avg.shape == (4, 16)
    torch.testing.assert_close(avg, maps.mean(dim=(2, 3)))
    assert avg2.shape == (4, 64)
    # the top-left quadrant of channel 0 comes first
    torch.testing.assert_close(avg2[:, 0], maps[:, 0, :4, :4].mean(dim=(1, 2)))
    torch.testing.assert_close(avg2, F.adaptive_avg_pool2d(maps, 2).flatten(1))
    assert tiny_backbone.with_settings(pool="avg2x2").num_features == 16 * 4


# ================================================================ bad input
def _bad_inputs(x):
    return {
        "channels": (x.repeat(1, 3, 1, 1), "1 input channel(s), got 3"),
        "size": (F.interpolate(x, size=(16, 16)), "8×8"),
        "3d": (x[:, 0], "(B, C, H, W)"),
        "0..255": ((x + 1) * 127.5, r"[-1, 1]"),
        "nan": (x.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), "NaN"),
        "int": (((x + 1) * 127.5).to(torch.uint8), "floating-point"),
        "not a tensor": (x.numpy(), "torch.Tensor"),
    }


@pytest.mark.parametrize("case", ["channels", "size", "3d", "0..255", "nan", "int", "not a tensor"])
@pytest.mark.parametrize("entry", ["forward", "extract", "check_inputs"])
def test_bad_images_raise_input_error(tiny_backbone, x8, case, entry):
    """Every forward checks the metadata; the values (range, NaN: host syncs) are checked by check_inputs,
    once per dataset, and by every forward only with strict_inputs."""
    bad, needle = _bad_inputs(x8)[case]
    call = {
        "forward": tiny_backbone,
        "extract": lambda b: tiny_backbone.extract(b, [10], ["mid"]),
        "check_inputs": tiny_backbone.check_inputs,
    }[entry]
    if case in ("0..255", "nan") and entry != "check_inputs":
        with torch.no_grad():
            call(bad)
        tiny_backbone.strict_inputs = True
    with pytest.raises(InputError) as ei:
        call(bad)
    assert needle in str(ei.value)
    assert "DDAEBackbone" in str(ei.value)


def test_check_inputs_without_values_reads_metadata_only(tiny_backbone, x8):
    tiny_backbone.check_inputs(x8 * 300, values=False)
    with pytest.raises(InputError, match="8×8"):
        tiny_backbone.check_inputs(x8[:, :, :4], values=False)
    check_model_inputs(tiny_backbone, x8)
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        check_model_inputs(tiny_backbone, x8 * 300)
    with pytest.raises(InputError, match="NaN"):  # a model without check_inputs: NaN/inf only
        check_model_inputs(torch.nn.Identity(), x8 / 0 * 0)
    check_model_inputs(torch.nn.Identity(), x8 * 300)


@pytest.mark.slow  # a fresh interpreter imports the package (5-15 s here)
def test_strict_inputs_from_the_environment():
    code = (
        "import torch, diffssl_plugin; from diffssl_plugin.backbones import DDAEBackbone; "
        "m = DDAEBackbone(unet_config='fmnist_small'); print(m.strict_inputs); "
        "m(torch.full((1, 1, 28, 28), 5.0))"
    )
    env = {**os.environ, "DIFFSSL_STRICT_INPUTS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.stdout.strip() == "True" and "expects values in [-1, 1]" in run.stderr


def test_unknown_block_lists_valid_blocks(tiny_backbone, x8, tiny_unet_config):
    with pytest.raises(UnknownNameError) as ei:
        tiny_backbone.extract(x8, [10], ["mid", "out_6"])
    msg = str(ei.value)
    assert "out_6" in msg and "block" in msg
    for n in tiny_backbone.block_names:
        assert n in msg
    with pytest.raises(UnknownNameError, match="up1.1"):
        DDAEBackbone(unet_config=tiny_unet_config, block="up7")
    with pytest.raises(UnknownNameError, match="fmnist_small"):
        DDAEBackbone(unet_config="imagenet_huge")


@pytest.mark.parametrize("t", [1000, -1])
def test_bad_timestep(tiny_backbone, x8, t, tiny_unet_config):
    with pytest.raises(InputError, match=r"0\.\.999"):
        tiny_backbone.extract(x8, [10, t], ["mid"])
    with pytest.raises(InputError, match=r"0\.\.999"):
        DDAEBackbone(unet_config=tiny_unet_config, timestep=t)


def test_unknown_pool(tiny_backbone, x8, tiny_unet_config):
    with pytest.raises(InputError, match="unknown pooling 'max'"):
        tiny_backbone.extract(x8, [10], ["mid"], pool="max")
    with pytest.raises(InputError, match="avg2x3"):
        tiny_backbone.extract(x8, [10], ["mid"], pool="avg2x3")
    with pytest.raises(InputError, match="unknown pooling"):
        DDAEBackbone(unet_config=tiny_unet_config, pool="gem")


def test_bad_input_runs_no_forward(tiny_backbone, x8):
    with CallCounter(tiny_backbone.unet.conv_in) as c:
        tiny_backbone.strict_inputs = True
        for bad in [x8 * 300, x8[:, :, :4]]:
            with pytest.raises(InputError):
                tiny_backbone(bad)
        with pytest.raises(UnknownNameError):
            tiny_backbone.extract(x8, [10], ["nope"])
    assert c.n == 0


def test_unexpected_constructor_argument(tiny_unet_config):
    with pytest.raises(TypeError, match="drop_path_rate"):
        DDAEBackbone(unet_config=tiny_unet_config, drop_path_rate=0.1)


def test_dynamic_img_size(tiny_unet_config):
    m = DDAEBackbone(unet_config=tiny_unet_config, dynamic_img_size=True, pool="avg").eval()
    with torch.no_grad():
        assert m(torch.rand(2, 1, 16, 16) * 2 - 1).shape == (2, 16)


# ================================================================ settings, loading, presets
def test_with_settings_shares_weights(tiny_backbone, x8):
    other = tiny_backbone.with_settings(block="up0", timestep=50, pool="avg2x2")
    assert other.unet is tiny_backbone.unet
    for a, b in zip(tiny_backbone.parameters(), other.parameters()):
        if a.dim():  # the U-Net's tensors (the identity heads have none)
            assert a is b
    assert (other.block, other.timestep, other.pool) == ("up0", 50, "avg2x2")
    assert (tiny_backbone.block, tiny_backbone.timestep, tiny_backbone.pool) == ("mid", 10, "avg")
    assert other.num_features == 64
    with torch.no_grad():
        before = other(x8)
        tiny_backbone.unet.conv_in.weight.mul_(2.0)  # changing one model changes the other
        after = other(x8)
    assert not torch.allclose(before, after)
    ref = tiny_backbone.extract(x8, [50], ["up0"], pool="avg2x2")[(50, "up0")]
    torch.testing.assert_close(after, ref)


def test_from_diffusers_folder(tmp_path, tiny_unet_config, x8):
    torch.manual_seed(1)
    unet = UNet2DModel(**tiny_unet_config).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    loaded = DDAEBackbone.from_diffusers(str(tmp_path / "ddpm"), block="up0", timestep=20).eval()
    direct = DDAEBackbone(unet=unet, block="up0", timestep=20).eval()
    assert loaded.unet is not unet
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    with torch.no_grad():
        a = loaded.extract(x8, [20, 500], ["mid", "up0"], pool=None)
        b = direct.extract(x8, [20, 500], ["mid", "up0"], pool=None)
        torch.testing.assert_close(loaded(x8), direct(x8), rtol=0, atol=0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_from_diffusers_reads_schedule_and_unet_only_folder(tmp_path, tiny_unet_config, x8):
    torch.manual_seed(2)
    unet = UNet2DModel(**tiny_unet_config)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=500, beta_end=0.03)).save_pretrained(
        tmp_path / "p"
    )
    m = DDAEBackbone.from_diffusers(tmp_path / "p")
    assert m.num_train_timesteps == 500 and m.scheduler_config["beta_end"] == pytest.approx(0.03)
    with pytest.raises(InputError, match=r"0\.\.499"):
        m.extract(x8, [600], ["mid"])

    unet.save_pretrained(tmp_path / "u")  # a bare U-Net folder (no unet/ subfolder)
    m2 = DDAEBackbone.from_diffusers(tmp_path / "u").eval()
    for (k, a), b in zip(m2.unet.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(a, b), k


def test_from_diffusers_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        DDAEBackbone.from_diffusers(tmp_path / "empty")


def test_cifar10_ddpm_preset_is_the_35_7m_ddpm_unet():
    cfg = UNET_PRESETS["cifar10_ddpm"]
    assert list(cfg["block_out_channels"]) == [128, 256, 256, 256]
    m = timm.create_model("ddae_unet_cifar10")
    n = sum(p.numel() for p in m.parameters())
    assert 35.74e6 <= n <= 35.76e6, n
    c = m.unet_config
    assert c["block_out_channels"] == [128, 256, 256, 256]
    assert c["layers_per_block"] == 2
    assert c["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert c["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert (c["sample_size"], c["in_channels"], c["out_channels"]) == (32, 3, 3)
    assert (c["flip_sin_to_cos"], c["freq_shift"], c["downsample_padding"]) == (False, 1, 0)
    # DDAE's out_6 at DDAE t=11 is our up1.2 at t=10, global average pooled
    assert (m.block, m.timestep, m.pool, m.num_features) == ("up1.2", 10, "avg", 256)
    assert m.block_module("up1.2") is m.unet.up_blocks[1].resnets[2]
    assert m.block_module("up2.1") is m.unet.up_blocks[2].attentions[1]  # after attention where there is one
    assert [i["reduction"] for i in m.feature_info] == [1, 1, 2, 4, 8]
    assert m.block_shapes["up1.2"] == (256, 8, 8)


# ================================================================ raw pixels
def test_raw_pixels(fmnist_uint8):
    m = timm.create_model("raw_pixels")
    assert isinstance(m, RawPixels)
    x = fmnist_uint8[:4].float() / 255
    out = m(x)
    assert out.shape == (4, 784) and m.num_features == 784
    assert torch.equal(out, x.flatten(1))
    cfg = timm.data.resolve_model_data_config(m)
    assert cfg["mean"] == (0.0,) and cfg["std"] == (1.0,)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        m.check_inputs(x * 2 - 1)  # the DDAE normalisation is wrong for raw pixels
    with pytest.raises(InputError, match="input channel"):
        m(x.repeat(1, 3, 1, 1))
    clf = timm.create_model("raw_pixels", num_classes=10)
    assert clf(x).shape == (4, 10)
    assert np.isclose(clf.get_classifier().in_features, 784)
    rgb = timm.create_model("raw_pixels", in_chans=3, img_size=32, num_classes=0)  # e.g. the CIFAR floor row
    cfg = timm.data.resolve_model_data_config(rgb)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.0,) * 3 and rgb.num_features == 3 * 32 * 32


# ------------------------------------------------------------------ timm's optimiser conventions
_TINY_DRL = {"encoder_config": {"in_chans": 1, "image_size": 28, "channels": (8, 16, 16), "norm_num_groups": 4}}
#: (model, arguments, parameter-name prefixes in forward order: each in a later coarse layer group than the one before)
LAYER_ORDER = {
    "ddae": (
        "ddae_unet_fmnist",
        {"unet_config": {**TINY_UNET, "sample_size": 28}},
        [f"unet.{m}." for m in ("conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0")]
        + ["unet.up_blocks.1.", "unet.conv_out.", "head."],
    ),
    "drl": (
        "drl_time_encoder_fmnist",
        _TINY_DRL,
        ["encoder.time_embedding.", "encoder.blocks.0.", "encoder.blocks.1.", "encoder.norm_out.", "head."],
    ),
    "mdsm": ("mdsm_ebm_fmnist", {"width": 2}, ["stem.", "stages.0.", "stages.1.", "stages.2.", "head."]),
}


@pytest.mark.parametrize("kind", sorted(LAYER_ORDER))
def test_group_matcher_orders_layers_for_layer_decay(kind):
    """timm's ``group_matcher``: coarse groups follow the forward order (the classifier last), fine groups
    split blocks further, and timm's optimiser factory builds layer-decayed, decay-exempt groups from them."""
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    name, kwargs, prefixes = LAYER_ORDER[kind]
    model = timm.create_model(name, num_classes=3, **kwargs)
    layer_of = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    spans = [[layer_of[n] for n, _ in model.named_parameters() if n.startswith(p)] for p in prefixes]
    assert all(spans) and all(max(a) < min(b) for a, b in itertools.pairwise(spans)), spans
    fine = group_parameters(model, model.group_matcher(), reverse=True)
    assert len(set(fine.values())) > len(set(layer_of.values())) or kind == "drl"  # DRL: one block per level
    assert model.no_weight_decay() == set()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    first = next(p for n, p in params.items() if n.startswith(prefixes[0]) and p.ndim > 1)
    assert scale[id(first)][0] < scale[id(params["head.weight"])][0] == 1.0  # decayed by depth
    assert scale[id(first)][1] == 0.05 and scale[id(params["head.bias"])][1] == 0.0  # biases: no weight decay


# ================================================================ DDAE's EMA (ema-pytorch's warm-up)
def test_ema_pytorch_warmup_values():
    """ema-pytorch's get_current_decay at its defaults (inv_gamma 1, power 2/3, min_value 0, beta cap) for the
    n-th update, n = s + 1: the first copies, then 1 − n^(−2/3); exact at n = 8 and 27."""
    from diffssl_plugin.diffusion import ema_decay

    assert ema_decay(0, 0.9999, "ema_pytorch") == 0.0
    assert ema_decay(7, 0.9999, "ema_pytorch") == pytest.approx(0.75)
    assert ema_decay(26, 0.9999, "ema_pytorch") == pytest.approx(1 - 1 / 9)
    assert ema_decay(10**9, 0.9999, "ema_pytorch") == 0.9999  # capped at beta (reached after 1M updates)
    assert ema_decay(999_999, 0.9999, "ema_pytorch") == pytest.approx(0.9999, abs=1e-9)
    assert ema_decay(7, 0.9999, "ema_pytorch", inv_gamma=7.0) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(1, 0.9999, "ema_pytorch", min_value=0.5) == 0.5
    with pytest.raises(UnknownNameError, match="ema_pytorch"):
        ema_decay(1, 0.9999, "ema-pytorch")


def test_ddae_ema_follows_ema_pytorch(tiny_unet_config):
    """DDAE's EMA (paper configs and CPU preset) is ema-pytorch's; against the library itself when installed."""
    from diffssl_plugin.diffusion import EMA
    from diffssl_plugin.methods.ddae import DDAE
    from diffssl_plugin.published import load_reproduction

    assert DDAE(unet_config=tiny_unet_config).ema.warmup == "ema_pytorch"
    for name in ("ddae_cifar10", "ddae_tiny_imagenet"):
        assert load_reproduction(name).raw["method_kwargs"]["ema_warmup"] == "ema_pytorch"
    torch.manual_seed(0)
    live = torch.nn.Linear(3, 2)
    ours = EMA(live, decay=0.9999, warmup="ema_pytorch")
    expected = [p.detach().clone() for p in live.parameters()]
    ema_pytorch = None
    try:
        import ema_pytorch
    except ImportError:
        pass
    ref = ema_pytorch and ema_pytorch.EMA(live, beta=0.9999, update_after_step=0, update_every=1)
    for n in range(1, 41):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        ours.update(live)
        decay = 0.0 if n == 1 else 1 - n ** (-2 / 3)  # the n-th update of ema-pytorch (DDAE's train.py)
        expected = [e * decay + p.detach() * (1 - decay) for e, p in zip(expected, live.parameters())]
        if ref is not None:
            ref.update()
    for e, o in zip(expected, ours.module.parameters()):
        torch.testing.assert_close(o, e)
    if ref is not None:
        for r, o in zip(ref.ema_model.parameters(), ours.module.parameters()):
            torch.testing.assert_close(o, r)
