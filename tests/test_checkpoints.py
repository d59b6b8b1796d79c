"""Official-checkpoint loading: diffusers DDPM folders, the guided-diffusion ADM converter, MDSM's layout, and
the safety/strictness of ``load_backbone_checkpoint``. All weights are built locally at random.

The ADM and MDSM checks compare against reference forwards written here from the papers' network descriptions
(papers.md §3.1, §4.3; guided-diffusion's ADM), working directly on the *official* key names, so a wrong key
mapping, head order or option shows up as a different output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from diffssl_plugin.backbones import DDAEBackbone
from diffssl_plugin.backbones.ebm import EnergyResNet
from diffssl_plugin.checkpoints import (
    adm_config,
    adm_to_unet,
    adm_unet_config,
    convert_adm_state_dict,
    ddae_block_name,
    ddae_out_name,
    ddae_timestep,
    diffssl_block_name,
    diffssl_block_number,
    load_backbone_checkpoint,
    save_adm_as_diffusers,
)
from diffssl_plugin.errors import CheckpointError, InputError, UnknownNameError


# ================================================================ diffusers DDPM folder
@pytest.fixture
def x8(real_batch) -> torch.Tensor:
    return real_batch[:4]


def _save_ddpm_folder(root, unet: UNet2DModel, **sched) -> None:
    unet.save_pretrained(root / "unet")
    DDPMScheduler(**sched).save_config(root / "scheduler")


def test_diffusers_folder_round_trip(tmp_path, tiny_unet_config, x8):
    unet = UNet2DModel(**tiny_unet_config).eval()
    _save_ddpm_folder(tmp_path / "ddpm", unet, num_train_timesteps=500, beta_end=0.03)
    m = load_backbone_checkpoint("diffusers_ddpm", tmp_path / "ddpm", block="up0", timestep=20)
    assert not m.training and m.block == "up0" and m.timestep == 20
    assert m.num_train_timesteps == 500 and m.scheduler_config["beta_end"] == pytest.approx(0.03)
    for (k, a), b in zip(m.unet.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(a, b), k
    t = torch.tensor([3, 400])
    with torch.no_grad():
        torch.testing.assert_close(m.unet(x8[:2], t).sample, unet(x8[:2], t).sample, rtol=0, atol=0)
        direct = DDAEBackbone(unet=unet, block="up0", timestep=20, scheduler_config=m.scheduler_config).eval()
        torch.testing.assert_close(m(x8), direct(x8), rtol=0, atol=0)


def test_diffusers_folder_defaults_are_ddae_out6_at_t11(tmp_path):
    # the DDPM CIFAR-10 U-Net's structure (google/ddpm-cifar10-32) with narrow channels
    cfg = {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64, 64, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
        "attention_head_dim": None,
    }
    _save_ddpm_folder(tmp_path / "c", UNet2DModel(**cfg))
    m = load_backbone_checkpoint("diffusers_ddpm", tmp_path / "c")
    assert (m.block, m.timestep) == ("up1.2", 10)
    # out_6 is the last 8×8 block before the upsampler: up1.2 is 8×8, up1 (after the upsampler) is 16×16
    assert m.block_shapes["up1.2"] == (64, 8, 8) and m.block_shapes["up1"] == (64, 16, 16)
    assert m.block_module("up1.2") is m.unet.up_blocks[1].resnets[2]
    # DDAE names count up-path residual blocks from 1: out_1-3 at 4×4, 4-6 at 8×8, 7-9 at 16×16, 10-12 at 32×32
    names = [ddae_block_name(f"out_{k}", 2, 4) for k in range(1, 13)]
    assert [m.block_shapes[n][1] for n in names] == [4] * 3 + [8] * 3 + [16] * 3 + [32] * 3
    assert m.block_module(names[6]) is m.unet.up_blocks[2].attentions[0]  # after attention where there is one
    assert [ddae_out_name(n, 2) for n in names] == [f"out_{k}" for k in range(1, 13)]
    m2 = load_backbone_checkpoint("diffusers_ddpm", tmp_path / "c", block="out_7", timestep=ddae_timestep(5))
    assert (m2.block, m2.timestep) == ("up2.0", 4)


def test_ddae_timestep_matches_the_schedules():
    # DDAE: alpha_bar_t = prod_{s=1..t}(1 - beta_s) with beta_s = linspace(1e-4, 0.02, 1000)[s-1]
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ddae_abar_11 = torch.prod(1 - betas[:11])
    ours = DDPMScheduler(beta_schedule="linear").alphas_cumprod[ddae_timestep(11)]
    assert ddae_timestep(11) == 10
    assert float(ours) == pytest.approx(float(ddae_abar_11), rel=1e-6)
    assert math.sqrt(1 - float(ours)) == pytest.approx(0.0468, abs=1e-4)  # papers.md §2.5
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError):
            ddae_timestep(bad)
    with pytest.raises(InputError, match="out_1 … out_12"):
        ddae_block_name("out_13", 2, 4)
    with pytest.raises(InputError, match="DDAE block name"):
        ddae_block_name("up1.2", 2, 4)


def test_diffusers_folder_with_pre_0_15_attention_names(tmp_path):
    # google/ddpm-cifar10-32's files predate diffusers 0.15: attention weights are query/key/value/proj_attn
    cfg = {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 32),
        "layers_per_block": 1,
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
        "attention_head_dim": None,
    }
    unet = UNet2DModel(**cfg).eval()
    _save_ddpm_folder(tmp_path / "old", unet)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in unet.state_dict().items():
        for new, name in legacy.items():
            k = k.replace(f".{new}.", f".{name}.")
        old[k] = v
    assert "down_blocks.0.attentions.0.query.weight" in old
    torch.save(old, tmp_path / "old" / "unet" / "diffusion_pytorch_model.bin")
    (tmp_path / "old" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    m = load_backbone_checkpoint("diffusers_ddpm", tmp_path / "old", block="mid", timestep=5)
    for (k, a), b in zip(m.unet.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(a, b), k


def test_diffusers_folder_missing_weight_is_an_error_not_a_random_layer(tmp_path, tiny_unet_config):
    # diffusers' from_pretrained only warns here and initialises conv_in.bias at random
    unet = UNet2DModel(**tiny_unet_config)
    _save_ddpm_folder(tmp_path / "d", unet)
    sd = {k: v for k, v in unet.state_dict().items() if k != "conv_in.bias"}
    save_file(sd, str(tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing.*conv_in\.bias"):
        load_backbone_checkpoint("diffusers_ddpm", tmp_path / "d")


def test_diffusers_folder_bad_layouts(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_checkpoint("diffusers_ddpm", tmp_path / "nowhere")
    (tmp_path / "e").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_backbone_checkpoint("diffusers_ddpm", tmp_path / "e")


# ================================================================ safety of every loader
class _Custom:  # a class a weights-only unpickler cannot rebuild
    pass


@pytest.mark.parametrize("payload", ["custom_class", "whole_module"])
def test_pickles_that_need_code_are_refused(tmp_path, tiny_unet_config, payload):
    obj = (
        {"state_dict": {"w": torch.zeros(1)}, "extra": _Custom()}
        if payload == "custom_class"
        else EnergyResNet(width=4)
    )
    torch.save(obj, tmp_path / "ckpt.pt")
    for kind in ("mdsm", "adm"):
        with pytest.raises(CheckpointError, match="needs code to load.*safetensors"):
            load_backbone_checkpoint(kind, tmp_path / "ckpt.pt")
    unet = UNet2DModel(**tiny_unet_config)
    _save_ddpm_folder(tmp_path / "f", unet)
    (tmp_path / "f" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(obj, tmp_path / "f" / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="needs code to load"):
        load_backbone_checkpoint("diffusers_ddpm", tmp_path / "f")


def test_truncated_and_corrupted_files_name_the_file(tmp_path, tiny_unet_config):
    model = EnergyResNet(width=4)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    for name in ("m.pt", "m.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"cut_{name}"):
            load_backbone_checkpoint("mdsm", tmp_path / f"cut_{name}")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_backbone_checkpoint("adm", tmp_path / "junk.pt")
    unet = UNet2DModel(**tiny_unet_config)
    _save_ddpm_folder(tmp_path / "g", unet)
    weights = tmp_path / "g" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_backbone_checkpoint("diffusers_ddpm", tmp_path / "g")


def test_unknown_kind_lists_kinds(tmp_path):
    with pytest.raises(UnknownNameError, match="adm.*diffusers_ddpm.*mdsm"):
        load_backbone_checkpoint("ddae_official", tmp_path)


# ================================================================ ADM: a reference forward from the description
def _adm_layout(cfg):
    """ADM's blocks as guided-diffusion builds them: lists of layers ('conv'|'res'|'attn', in, out, resample)."""
    mc, R, L = cfg.num_channels, cfg.num_res_blocks, len(cfg.channel_mult)
    attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
    ch, ds, chans = mc, 1, [mc]
    inputs = [[("conv", cfg.in_channels, ch, None)]]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(R):
            layers = [("res", ch, mult * mc, None)]
            ch = mult * mc
            if ds in attn_ds:
                layers.append(("attn", ch, ch, None))
            inputs.append(layers)
            chans.append(ch)
        if level != L - 1:
            inputs.append([("res", ch, ch, "down")])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch, None), ("attn", ch, ch, None), ("res", ch, ch, None)]
    outputs = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(R + 1):
            layers = [("res", ch + chans.pop(), mc * mult, None)]
            ch = mc * mult
            if ds in attn_ds:
                layers.append(("attn", ch, ch, None))
            if level and i == R:
                layers.append(("res", ch, ch, "up"))
                ds //= 2
            outputs.append(layers)
    return inputs, middle, outputs


def _adm_modules(cfg):
    inputs, middle, outputs = _adm_layout(cfg)
    for n, layers in enumerate(inputs):
        for k, layer in enumerate(layers):
            yield f"input_blocks.{n}.{k}", layer
    for k, layer in enumerate(middle):
        yield f"middle_block.{k}", layer
    for n, layers in enumerate(outputs):
        for k, layer in enumerate(layers):
            yield f"output_blocks.{n}.{k}", layer


def random_adm_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ADM's key names and shapes (no zero-initialised layers, so every weight matters)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple] = {}
    mc, temb = cfg.num_channels, 4 * cfg.num_channels
    shapes.update(
        {
            "time_embed.0.weight": (temb, mc),
            "time_embed.0.bias": (temb,),
            "time_embed.2.weight": (temb, temb),
            "time_embed.2.bias": (temb,),
        }
    )
    for p, (kind, cin, cout, _) in _adm_modules(cfg):
        if kind == "conv":
            shapes.update({f"{p}.weight": (cout, cin, 3, 3), f"{p}.bias": (cout,)})
        elif kind == "attn":
            shapes.update(
                {
                    f"{p}.norm.weight": (cout,),
                    f"{p}.norm.bias": (cout,),
                    f"{p}.qkv.weight": (3 * cout, cout, 1),
                    f"{p}.qkv.bias": (3 * cout,),
                    f"{p}.proj_out.weight": (cout, cout, 1),
                    f"{p}.proj_out.bias": (cout,),
                }
            )
        else:
            emb_out = 2 * cout if cfg.use_scale_shift_norm else cout
            shapes.update(
                {
                    f"{p}.in_layers.0.weight": (cin,),
                    f"{p}.in_layers.0.bias": (cin,),
                    f"{p}.in_layers.2.weight": (cout, cin, 3, 3),
                    f"{p}.in_layers.2.bias": (cout,),
                    f"{p}.emb_layers.1.weight": (emb_out, temb),
                    f"{p}.emb_layers.1.bias": (emb_out,),
                    f"{p}.out_layers.0.weight": (cout,),
                    f"{p}.out_layers.0.bias": (cout,),
                    f"{p}.out_layers.3.weight": (cout, cout, 3, 3),
                    f"{p}.out_layers.3.bias": (cout,),
                }
            )
            if cin != cout:
                shapes.update({f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)})
    shapes.update(
        {
            "out.0.weight": (mc,),
            "out.0.bias": (mc,),
            "out.2.weight": (cfg.out_channels, mc, 3, 3),
            "out.2.bias": (cfg.out_channels,),
        }
    )
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if k.endswith("bias"):
            sd[k] = 0.1 * t
        elif len(shape) == 1:  # GroupNorm scale
            sd[k] = 1 + 0.1 * t
        else:
            sd[k] = t / math.sqrt(math.prod(shape[1:]))
    return sd


def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _ref_res(sd, p, x, emb, resample, scale_shift):
    h = F.silu(_gn(sd, f"{p}.in_layers.0", x))
    if resample == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    elif resample == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = _gn(sd, f"{p}.out_layers.0", h) * (1 + scale) + shift
    else:
        h = _gn(sd, f"{p}.out_layers.0", h + e)
    h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def _ref_attn(sd, p, x, heads, legacy):
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(sd, f"{p}.norm", x), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    d = c // heads
    if legacy:  # QKVAttentionLegacy: split heads, then q/k/v
        q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    else:  # QKVAttention: split q/k/v, then heads
        q, k, v = (z.reshape(b * heads, d, -1) for z in qkv.chunk(3, dim=1))
    s = d**-0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    h = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return (x + h).reshape(b, c, hh, ww)


def adm_reference_forward(sd, cfg, x, t, capture: dict | None = None, legacy: bool | None = None):
    """ADM's forward on its own state dict; ``capture`` receives diffssl's blocks {1-based number: output}."""
    legacy = (not cfg.use_new_attention_order) if legacy is None else legacy
    half = cfg.num_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(
        F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
        sd["time_embed.2.weight"],
        sd["time_embed.2.bias"],
    )
    inputs, middle, outputs = _adm_layout(cfg)
    heads = (lambda c: c // cfg.num_head_channels) if cfg.num_head_channels > 0 else (lambda c: cfg.num_heads)

    def run(prefix, layers, h):
        for k, (kind, _, cout, resample) in enumerate(layers):
            p = f"{prefix}.{k}"
            if kind == "conv":
                h = F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1)
            elif kind == "attn":
                h = _ref_attn(sd, p, h, heads(cout), legacy)
            else:
                h = _ref_res(sd, p, h, emb, resample, cfg.use_scale_shift_norm)
        return h

    capture = {} if capture is None else capture
    h, hs, b = x, [], 0
    for n, layers in enumerate(inputs):
        h = run(f"input_blocks.{n}", layers, h)
        hs.append(h)
        b += 1
        capture[b] = h
    h = run("middle_block", middle, h)
    b += 1
    capture[b] = h
    for n, layers in enumerate(outputs):
        h = run(f"output_blocks.{n}", layers, torch.cat([h, hs.pop()], dim=1))
        b += 1
        capture[b] = h
    h = F.silu(_gn(sd, "out.0", h))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


def _close(a, b):
    # tight enough to see GroupNorm eps 1e-6 vs ADM's 1e-5 (a 3e-5 relative change of the output)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6 * float(b.abs().max()))


@pytest.fixture(scope="module")
def tiny_adm():
    cfg = adm_config("adm_tiny")
    return cfg, random_adm_state_dict(cfg)


def test_adm_256_preset_is_the_diffssl_backbone():
    cfg = adm_config("adm256_uncond")
    inputs, _, outputs = _adm_layout(cfg)
    assert (len(inputs), len(outputs), cfg.out_channels) == (18, 18, 6)  # diffssl's 1-18 / 19 / 20-37
    uc = adm_unet_config(cfg)
    assert uc["block_out_channels"] == (256, 256, 512, 512, 1024, 1024)
    assert uc["down_block_types"] == ("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3
    assert uc["up_block_types"] == ("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3
    shapes = {}
    for p, (kind, cin, cout, _) in _adm_modules(cfg):
        shapes[p] = (kind, cin, cout)
    n_params = sum(
        t.numel()
        for t in random_adm_state_dict(adm_config("adm256_uncond", num_channels=8, num_head_channels=8)).values()
    )
    assert n_params > 0  # the full-size dict (554M floats) is not built in the test suite
    # the full model, built on the meta device: ~554M parameters (papers.md §3.1)
    with torch.device("meta"):
        unet = UNet2DModel(**uc)
    assert 552e6 < sum(p.numel() for p in unet.parameters()) < 556e6


@pytest.mark.parametrize("new_order", [False, True])
def test_adm_conversion_matches_reference_forward(new_order):
    cfg = adm_config("adm_tiny", use_new_attention_order=new_order)
    sd = random_adm_state_dict(cfg, seed=1)
    unet = adm_to_unet(sd, cfg)  # strict: every key maps, shapes match, nothing left over
    assert unet.config.out_channels == 6
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([3, 700])
    with torch.no_grad():
        ref = adm_reference_forward(sd, cfg, x, t)
        out = unet(x, t).sample
    assert out.shape == (2, 6, 64, 64)
    _close(out, ref)
    with torch.no_grad():  # the test can fail: the other head order gives another output
        wrong = adm_reference_forward(sd, cfg, x, t, legacy=new_order)
    assert not torch.allclose(wrong, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_adm_conversion_every_key_maps(tiny_adm):
    cfg, sd = tiny_adm
    converted = convert_adm_state_dict(sd, cfg)
    unet = UNet2DModel(**adm_unet_config(cfg))
    own = unet.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    # qkv of 3C rows became three C×C linears; proj_out's 1-D conv a linear
    assert converted["mid_block.attentions.0.to_q.weight"].shape == (128, 128)
    extra = dict(sd, **{"input_blocks.99.0.in_layers.0.weight": torch.ones(4)})
    with pytest.raises(CheckpointError, match="unmapped keys.*input_blocks.99"):
        convert_adm_state_dict(extra, cfg)
    short = {k: v for k, v in sd.items() if not k.startswith("middle_block.1.")}
    with pytest.raises(CheckpointError, match=r"missing ADM keys.*middle_block\.1\.norm"):
        convert_adm_state_dict(short, cfg)
    with pytest.raises(CheckpointError, match="class-conditional"):
        convert_adm_state_dict(dict(sd, **{"label_emb.weight": torch.zeros(10, 128)}), cfg)
    with pytest.raises(CheckpointError, match="does not match.*num_res_blocks=3"):  # other key names
        convert_adm_state_dict(sd, adm_config("adm_tiny", num_res_blocks=3))
    with pytest.raises(CheckpointError, match="shape mismatch.*conv_in"):  # same names, other widths
        adm_to_unet(sd, adm_config("adm_tiny", num_channels=64))


def test_adm_checkpoint_file_as_backbone_reads_diffssl_blocks(tmp_path, tiny_adm):
    cfg, sd = tiny_adm
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "adm.pt")  # fp16 like use_fp16 checkpoints
    m = load_backbone_checkpoint("adm", tmp_path / "adm.pt", preset="adm_tiny", block=24, timestep=150)
    assert (m.block, m.timestep, m.pool, m.in_chans) == ("up1.1", 150, "avg2x2", 3)
    assert m.unet.config.out_channels == 6  # learned sigma: features come from inner blocks, unaffected
    sd16 = {k: v.half().float() for k, v in sd.items()}
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    noise = m.draw_noise(x)
    x_t = m.scheduler.add_noise(x, noise, torch.tensor([150, 150]))
    capture: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        adm_reference_forward(sd16, cfg, x_t, torch.tensor([150, 150]), capture)
        readable = [b for b in range(1, 38) if diffssl_block_name(b) in m.block_names]
        feats = m.extract(x, [150], [diffssl_block_name(b) for b in readable], pool=None, noise=noise)
    assert readable == [4, 7, 10, 13, 16, 18, *list(range(19, 38))]
    for b in readable:
        _close(feats[(150, diffssl_block_name(b))], capture[b])
    # every diffssl block has the shape diffssl's ssl_diff/const.py lists for the 256 model (FEAT_DIM_LIST,
    # FEAT_SIZE_LIST), scaled to this model's 32 channels (÷8) and 64 pixels (÷4)
    dims = [256] * 7 + [512] * 6 + [1024] * 12 + [512] * 6 + [256] * 6
    sizes = (
        [256] * 3
        + [128] * 3
        + [64] * 3
        + [32] * 3
        + [16] * 3
        + [8] * 6
        + [16] * 3
        + [32] * 3
        + [64] * 3
        + [128] * 3
        + [256] * 4
    )
    for b in range(1, 38):
        assert m.unit_shapes[diffssl_block_name(b)] == (dims[b - 1] // 8, sizes[b - 1] // 4, sizes[b - 1] // 4), b
    assert m.block_shapes["up1.1"] == (128, 4, 4)  # block 24: 1024 ch @ 16 in the 256 model
    with torch.no_grad():
        _close(m(x), F.adaptive_avg_pool2d(capture[24], 2).flatten(1))


def test_adm_converted_folder_loads_without_converting(tmp_path, tiny_adm):
    _, sd = tiny_adm
    save_file(sd, str(tmp_path / "adm.safetensors"))
    out = save_adm_as_diffusers(tmp_path / "adm.safetensors", tmp_path / "converted", preset="adm_tiny")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    a = load_backbone_checkpoint("adm", out, block="b30", timestep=90)
    b = load_backbone_checkpoint("adm", tmp_path / "adm.safetensors", preset="adm_tiny", block="up3.1", timestep=90)
    assert a.block == b.block == "up3.1"
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_diffssl_block_table():
    table = {b: diffssl_block_name(b) for b in range(1, 38)}
    assert table[1] == "conv_in" and table[19] == "mid" and table[24] == "up1.1"
    assert [table[b] for b in (4, 7, 10, 13, 16, 18)] == ["down0", "down1", "down2", "down3", "down4", "down5"]
    assert [table[b] for b in (22, 25, 28, 31, 34, 37)] == ["up0", "up1", "up2", "up3", "up4", "up5"]
    assert [table[b] for b in (2, 5, 8, 11, 14, 17)] == [
        "down0.0",
        "down1.0",
        "down2.0",
        "down3.0",
        "down4.0",
        "down5.0",
    ]
    assert all(diffssl_block_number(name) == b for b, name in table.items())
    assert diffssl_block_number("up5.2") == 37 and diffssl_block_number("down5.1") == 18
    for bad in (0, 38, "24", True):
        with pytest.raises(InputError):
            diffssl_block_name(bad)


def test_diffssl_mirror_pairs_match_our_skip_mirrors():
    # diffssl pairs decoder block b with encoder block 38 - b (DifFeed: 21→17, 24→14, …, 36→2)
    with torch.device("meta"):
        unet = UNet2DModel(**adm_unet_config(adm_config("adm256_uncond")))
    from diffssl_plugin.backbones.unet_blocks import unet_skip_mirrors

    mirrors = unet_skip_mirrors(unet)
    for b in range(20, 38):
        assert mirrors[diffssl_block_name(b)] == diffssl_block_name(38 - b), b


def test_adm_unsupported_configs():
    with pytest.raises(InputError, match="resblock_updown"):
        adm_unet_config(adm_config("adm_tiny", resblock_updown=False))
    with pytest.raises(UnknownNameError, match="adm256_uncond"):
        adm_config("adm512")


# ================================================================ MDSM official layout
def _official_names(blocks_per_stage: int) -> list[tuple[str, bool]]:
    """(official block name, is a down block) in forward order: rb1, rbc1, rbc11, rb2, … (models/ResNet.py)."""
    out = []
    for s in (1, 2, 3):
        out.append((f"rb{s}", True))
        out += [(f"rbc{str(s) * k}", False) for k in range(1, blocks_per_stage)]
    return out


def random_official_mdsm(width: int, blocks_per_stage: int, in_chans: int, hw: int = 32, seed: int = 0):
    """Random weights under the official Res*_Quadratic key names, incl. the unused LayerNorms."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else 1)

    sd = {"conv1.conv.weight": w(width, in_chans, 3, 3), "conv1.conv.bias": 0.1 * w(width)}
    c, size = width, hw
    for name, down in _official_names(blocks_per_stage):
        cin, cout = (c, 2 * c) if down else (c, c)
        wrap = ".conv" if down else ""  # MeanPoolConv / ConvMeanPool hold a MyConvo2d
        sd[f"{name}.conv_1.conv.weight"] = w(cin, cin, 3, 3)
        sd[f"{name}.conv_2.conv{wrap}.weight"] = w(cout, cin, 3, 3)
        sd[f"{name}.conv_2.conv{wrap}.bias"] = 0.1 * w(cout)
        sd[f"{name}.conv_shortcut.conv{wrap}.weight"] = w(cout, cin, 1, 1)
        sd[f"{name}.conv_shortcut.conv{wrap}.bias"] = 0.1 * w(cout)
        for norm in ("bn1", "bn2"):
            sd[f"{name}.{norm}.weight"] = torch.ones(cin, size, size)
            sd[f"{name}.{norm}.bias"] = torch.zeros(cin, size, size)
        if down:
            c, size = cout, size // 2
    dim = c * size * size
    for lin in ("ln1", "ln2", "lq"):
        sd[f"{lin}.weight"], sd[f"{lin}.bias"] = w(1, dim), 0.1 * w(1)
    return sd


def official_mdsm_energy(sd, x, blocks_per_stage):
    """The official forward (ELU, no normalisation, mean-pool as the average of the four strided slices)."""

    def mean_pool(h):
        return (h[:, :, ::2, ::2] + h[:, :, 1::2, ::2] + h[:, :, ::2, 1::2] + h[:, :, 1::2, 1::2]) / 4

    h = F.conv2d(x, sd["conv1.conv.weight"], sd["conv1.conv.bias"], padding=1)
    for name, down in _official_names(blocks_per_stage):
        wrap = ".conv" if down else ""
        sc_w, sc_b = sd[f"{name}.conv_shortcut.conv{wrap}.weight"], sd[f"{name}.conv_shortcut.conv{wrap}.bias"]
        shortcut = F.conv2d(mean_pool(h) if down else h, sc_w, sc_b)
        out = F.conv2d(F.elu(h), sd[f"{name}.conv_1.conv.weight"], None, padding=1)
        out = F.conv2d(
            F.elu(out), sd[f"{name}.conv_2.conv{wrap}.weight"], sd[f"{name}.conv_2.conv{wrap}.bias"], padding=1
        )
        h = shortcut + (mean_pool(out) if down else out)
    h = h.flatten(1)
    lin = {k: F.linear(h, sd[f"{k}.weight"], sd[f"{k}.bias"]) for k in ("ln1", "ln2")}
    return (lin["ln1"] * lin["ln2"] + F.linear(h * h, sd["lq.weight"], sd["lq.bias"])).view(-1)


@pytest.mark.parametrize("blocks,in_chans", [(3, 3), (2, 1)])  # Res18 (CIFAR-10), Res12 ((F)MNIST)
def test_mdsm_dataparallel_checkpoint_matches_official_forward(tmp_path, blocks, in_chans):
    sd = random_official_mdsm(width=4, blocks_per_stage=blocks, in_chans=in_chans)
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "netE_270000.pt")
    m = load_backbone_checkpoint("mdsm", tmp_path / "netE_270000.pt")
    assert isinstance(m, EnergyResNet) and not m.training
    assert (m.width, m.blocks_per_stage, m.in_chans, m.net_size) == (4, blocks, in_chans, 32)
    assert m.img_size == (28 if in_chans == 1 else 32)
    x = torch.rand(3, in_chans, m.img_size, m.img_size)
    pad = (32 - m.img_size) // 2
    with torch.no_grad():
        ref = official_mdsm_energy(sd, F.pad(x, (pad,) * 4), blocks)  # the paper pads 28 → 32 outside
        _close(m.energy(x), ref)


def test_mdsm_nested_and_plain_layouts(tmp_path):
    sd = random_official_mdsm(width=4, blocks_per_stage=3, in_chans=3)
    torch.save({"iteration": torch.tensor(5), "netE": sd}, tmp_path / "nested.pt")
    save_file(sd, str(tmp_path / "plain.safetensors"))
    a = load_backbone_checkpoint("mdsm", tmp_path / "nested.pt")
    b = load_backbone_checkpoint("mdsm", tmp_path / "plain.safetensors", global_pool="avg")
    assert b.global_pool == "avg"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.energy(x), b.energy(x), rtol=0, atol=0)
    ours = EnergyResNet(width=4, blocks_per_stage=2, in_chans=1)  # our own naming loads as well
    torch.save({f"module.{k}": v for k, v in ours.state_dict().items()}, tmp_path / "ours.pt")
    c = load_backbone_checkpoint("mdsm", tmp_path / "ours.pt")
    for (k, v), w in zip(c.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(v, w), k


def test_mdsm_refuses_trained_layernorms_and_foreign_weights(tmp_path):
    sd = random_official_mdsm(width=4, blocks_per_stage=2, in_chans=1)
    sd["rbc2.bn1.weight"] = sd["rbc2.bn1.weight"] * 1.5
    torch.save(sd, tmp_path / "ln.pt")
    with pytest.raises(CheckpointError, match="rbc2.bn1.*normalize=True"):
        load_backbone_checkpoint("mdsm", tmp_path / "ln.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an MDSM"):
        load_backbone_checkpoint("mdsm", tmp_path / "other.pt")
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_backbone_checkpoint("mdsm", tmp_path / "nothing.pt")


@pytest.mark.parametrize("name", ["diffssl_attention_imagenet", "difformer_imagenet", "diffeed_imagenet"])
def test_imagenet_dry_run_configs_have_the_converted_adm_architecture(name):
    """The architecture a ``--dry-run``/``--full-scale`` build reads from the config (diffusers defaults filled
    in) is the one :func:`adm_unet_config` gives the real checkpoint, mid-block attention GroupNorm included."""
    import inspect

    from diffssl_plugin.published import load_reproduction

    rep = load_reproduction(name)
    defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items() if k != "self"}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in rep.checkpoint["backbone"]["unet_config"].items()}
    built = {**defaults, **given}
    reference = adm_unet_config(adm_config(rep.checkpoint["method"]))
    assert {k: built[k] for k in reference} == reference
