"""DDAE's own ``train.py`` checkpoints (``checkpoints/ddae_official.py``), built here at random in the official
layout: ``torch.save({'MODEL', 'EMA', 'opt'})`` with DDAE's U-Net key names under ``module.nn_model.`` /
``ema_model.nn_model.``.

The reference forward below is written from the architecture's description (papers.md §2.2 and the issue's
list of differences from our ``cifar10_ddpm`` preset), as plain functional ops on the *official* key names; it
never calls the converter, so a wrong key, row split, group count, padding, eps or time input shows up as a
different output.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffssl_plugin.checkpoints import CHECKPOINT_KINDS, DDAEConfig, load_backbone_checkpoint, load_ddae_unet
from diffssl_plugin.errors import CheckpointError

# tiny DDPM-architecture U-Nets: 3 levels (2 resamplings each way), 2 blocks per level, attention at level 1
CFG = DDAEConfig(image_shape=(3, 16, 16), n_channels=32, ch_mults=(1, 2, 2), is_attn=(False, True, False), n_blocks=2)
GREY = DDAEConfig(image_shape=(1, 28, 28), n_channels=32, ch_mults=(1, 2), is_attn=(False, True), n_blocks=2)


# ================================================================ the official layout, at random
def official_state_dict(cfg: DDAEConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under DDAE's ``UNet`` key names (``image_proj``, ``time_emb.lin1``, ``down.N.res.*``, …)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k=3):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
        sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=g)

    def linear(name, cin, cout):
        sd[f"{name}.weight"] = torch.randn(cout, cin, generator=g) / math.sqrt(cin)
        sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=g)

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.2 * torch.randn(c, generator=g)

    C, tc = cfg.n_channels, 4 * cfg.n_channels

    def resblock(name, cin, cout):  # ResidualBlock: norm1, conv1, time_emb (SiLU, Linear), norm2, conv2 (Dropout, conv)
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        linear(f"{name}.time_emb.1", tc, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2.1", cout, cout)
        if cin != cout:
            conv(f"{name}.shortcut", cin, cout, k=1)

    def res_att(name, cin, cout, attn):  # ResAttBlock: res, then attn (AttentionBlock) or Identity
        resblock(f"{name}.res", cin, cout)
        if attn:
            norm(f"{name}.attn.norm", cout)
            linear(f"{name}.attn.projection", cout, 3 * cout)
            linear(f"{name}.attn.output", cout, cout)

    conv("image_proj", cfg.image_shape[0], C)
    linear("time_emb.lin1", C, tc)
    linear("time_emb.lin2", tc, tc)
    skips, n, cin = [C], 0, C
    for level, mult in enumerate(cfg.ch_mults):
        for _ in range(cfg.n_blocks):
            res_att(f"down.{n}", cin, C * mult, cfg.is_attn[level])
            cin = C * mult
            skips.append(cin)
            n += 1
        if level < len(cfg.ch_mults) - 1:
            conv(f"down.{n}.conv", cin, cin)
            skips.append(cin)
            n += 1
    for part in ("res1", "res2"):
        resblock(f"middle.{part}", cin, cin)
    norm("middle.attn.norm", cin)
    linear("middle.attn.projection", cin, 3 * cin)
    linear("middle.attn.output", cin, cin)
    n = 0
    for level in reversed(range(len(cfg.ch_mults))):
        cout = C * cfg.ch_mults[level]
        for _ in range(cfg.n_blocks + 1):
            res_att(f"up.{n}", cin + skips.pop(), cout, cfg.is_attn[level])
            cin = cout
            n += 1
        if level > 0:
            conv(f"up.{n}.conv", cin, cin)
            n += 1
    norm("norm", cin)
    conv("final", cin, cfg.image_shape[0])
    return sd


def save_like_train_py(path, ema: dict, online: dict, online_model_in_ema: bool = True) -> None:
    """DDAE's train.py: ``{'MODEL': DDP(DDPM).state_dict(), 'EMA': EMA(DDPM).state_dict(), 'opt': Adam}``."""
    params = [torch.nn.Parameter(v.clone()) for v in list(online.values())[:3]]
    opt = torch.optim.Adam(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    ema_sd = {"initted": torch.tensor(True), "step": torch.tensor(7)}
    if online_model_in_ema:  # ema_pytorch versions differ on keeping the online model in its state dict
        ema_sd.update({f"online_model.nn_model.{k}": v for k, v in online.items()})
    ema_sd.update({f"ema_model.nn_model.{k}": v for k, v in ema.items()})
    checkpoint = {
        "MODEL": {f"module.nn_model.{k}": v for k, v in online.items()},
        "EMA": ema_sd,
        "opt": opt.state_dict(),
    }
    torch.save(checkpoint, path)


# ================================================================ the reference forward
def reference_forward(sd: dict, x: torch.Tensor, t_ddae: torch.Tensor, cfg: DDAEConfig, n_T: int = 1000):
    """DDAE's DDPM U-Net on time input ``t_ddae / n_T``, in float64: (ε prediction, {``out_k``: activation})."""
    w = {k: v.double() for k, v in sd.items()}
    x = x.double()

    def gn(h, name, groups=32):  # GroupNorm eps 1e-5 (nn.GroupNorm's default) everywhere
        return F.group_norm(h, groups, w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)

    def conv(h, name, stride=1):
        k = w[f"{name}.weight"].shape[-1]
        return F.conv2d(h, w[f"{name}.weight"], w[f"{name}.bias"], stride=stride, padding=k // 2)

    def lin(h, name):
        return F.linear(h, w[f"{name}.weight"], w[f"{name}.bias"])

    # sinusoid of dim C over t / n_T: [sin, cos] at frequencies 10000^(-i / (C/2 - 1)), then Linear-SiLU-Linear
    half = cfg.n_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    arg = (t_ddae.double() / n_T)[:, None] * freqs[None]
    temb = lin(F.silu(lin(torch.cat([arg.sin(), arg.cos()], 1), "time_emb.lin1")), "time_emb.lin2")

    def res(h, name):  # GN-SiLU-conv, + Linear(SiLU(temb)), GN-SiLU-(dropout)-conv, + shortcut
        out = conv(F.silu(gn(h, f"{name}.norm1")), f"{name}.conv1")
        out = out + lin(F.silu(temb), f"{name}.time_emb.1")[:, :, None, None]
        out = conv(F.silu(gn(out, f"{name}.norm2")), f"{name}.conv2.1")
        return out + (conv(h, f"{name}.shortcut") if f"{name}.shortcut.weight" in w else h)

    def attn(h, name):  # single head: one Linear to [q | k | v], softmax(q·k / sqrt(C)), Linear, residual
        b, c, hh, ww = h.shape
        seq = gn(h, f"{name}.norm").flatten(2).transpose(1, 2)
        q, k, v = lin(seq, f"{name}.projection").split(c, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        return lin(a, f"{name}.output").transpose(1, 2).reshape(b, c, hh, ww) + h

    def block(h, name, has_attn):
        h = res(h, f"{name}.res")
        return attn(h, f"{name}.attn") if has_attn else h

    h = conv(x, "image_proj")
    skips, n, L = [h], 0, len(cfg.ch_mults)
    for level in range(L):
        for _ in range(cfg.n_blocks):
            h = block(h, f"down.{n}", cfg.is_attn[level])
            skips.append(h)
            n += 1
        if level < L - 1:
            h = conv(h, f"down.{n}.conv", stride=2)  # stride-2 conv, padding 1
            skips.append(h)
            n += 1
    h = res(attn(res(h, "middle.res1"), "middle.attn"), "middle.res2")
    acts, n, k = {}, 0, 0
    for level in reversed(range(L)):
        for _ in range(cfg.n_blocks + 1):
            h = block(torch.cat([h, skips.pop()], 1), f"up.{n}", cfg.is_attn[level])
            k += 1
            acts[f"out_{k}"] = h
            n += 1
        if level > 0:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"up.{n}.conv")
            n += 1
    return conv(F.silu(gn(h, "norm", groups=8)), "final"), acts


def ddae_noised(x: torch.Tensor, eps: torch.Tensor, t_ddae: int, n_T: int = 1000) -> torch.Tensor:
    """DDAE's ``perturb``: β = [0, linspace(1e-4, 0.02, n_T)], ᾱ_t = ∏_{s ≤ t} (1 − β_s), in float64."""
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1e-4, 0.02, n_T, dtype=torch.float64)])
    abar = torch.cumprod(1 - beta, 0)[t_ddae]
    return abar.sqrt() * x.double() + (1 - abar).sqrt() * eps.double()


# ================================================================ tests
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ema, online = official_state_dict(CFG, seed=1), official_state_dict(CFG, seed=2)
    path = tmp_path_factory.mktemp("ddae") / "model_1999.pth"
    save_like_train_py(path, ema, online)
    return path, ema, online


def test_the_test_checkpoint_is_what_train_py_writes(ckpt):
    obj = torch.load(ckpt[0], weights_only=True)
    assert set(obj) == {"MODEL", "EMA", "opt"} and "state" in obj["opt"] and "param_groups" in obj["opt"]
    assert "ema_model.nn_model.image_proj.weight" in obj["EMA"] and "module.nn_model.final.bias" in obj["MODEL"]


def test_ema_weights_match_the_reference_forward(ckpt):
    path, ema, _ = ckpt
    bb = load_backbone_checkpoint("ddae_ddpm", path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    ours = torch.tensor([0, 10, 500, 999])  # our 0-indexed t; DDAE's is t + 1
    xs = x.repeat(2, 1, 1, 1)
    want, _ = reference_forward(ema, xs, ours + 1, CFG)
    assert want.abs().max() > 0.5  # a real signal, not a vanishing one
    with torch.no_grad():
        got = bb.unet(xs, ours).sample  # float32, as loaded
    assert (got.double() - want).abs().max() < 1e-5

    # the same network in float64: equal to rounding, so no architecture detail (eps 1e-5 vs 1e-6, padding,
    # time input) hides under float32 noise; DDAE's out_k are our up{i}.{j}, read with hooks on our blocks
    unet64 = copy.deepcopy(bb.unet).double()
    names = {f"out_{i * 3 + j + 1}": f"up{i}.{j}" for i in range(3) for j in range(3)}
    seen = {}
    for name in names.values():
        module = dict(unet64.named_modules())[_module_path(bb, name)]
        module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():
        got64 = unet64(xs.double(), ours).sample
    _, acts = reference_forward(ema, xs, ours + 1, CFG)
    assert (got64 - want).abs().max() < 1e-6
    assert max((seen[n] - acts[out]).abs().max().item() for out, n in names.items()) < 1e-6

    # the backbone as used: DDAE's noising (its schedule at DDAE t = ours + 1) then out_k, in float32
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    assert (bb.block, bb.timestep) == ("up1.2", 10)  # DDAE's out_6 at t = 11
    feats = bb.extract(x, [10], list(names.values()), pool=None, noise=eps)
    _, acts = reference_forward(ema, ddae_noised(x, eps, 11), torch.full((2,), 11), CFG)
    for out, n in names.items():
        assert (feats[(10, n)].double() - acts[out]).abs().max() < 1e-5 * acts[out].abs().max(), out


def _module_path(bb, block: str) -> str:
    """The dotted path, inside the U-Net, of the module whose output is ``block``."""
    target = bb.block_module(block)
    return next(path for path, m in bb.unet.named_modules() if m is target)


def test_model_entry_and_the_other_ema_pytorch_layout(ckpt, tmp_path):
    path, ema, online = ckpt
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        got = load_ddae_unet(path, weights="model")(x, torch.tensor([5])).sample
    assert (got.double() - reference_forward(online, x, torch.tensor([6]), CFG)[0]).abs().max() < 1e-5
    save_like_train_py(tmp_path / "b.pth", ema, online, online_model_in_ema=False)
    with torch.no_grad():
        got = load_ddae_unet(tmp_path / "b.pth")(x, torch.tensor([5])).sample
    assert (got.double() - reference_forward(ema, x, torch.tensor([6]), CFG)[0]).abs().max() < 1e-5


def test_refusals_name_the_problem(ckpt, tmp_path):
    _, ema, online = ckpt
    torch.save({"MODEL": {}, "opt": {}}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="no 'EMA' entry"):
        load_backbone_checkpoint("ddae_ddpm", tmp_path / "no_ema.pth")
    torch.save({"EMA": {"x": torch.zeros(1)}, "net": torch.nn.Linear(1, 1)}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="refusing to load .*code.pth"):
        load_backbone_checkpoint("ddae_ddpm", tmp_path / "code.pth")
    cases = {
        "shape": ({**ema, "down.0.res.conv1.bias": torch.zeros(5)}, "shape mismatch.*down_blocks.0.resnets.0"),
        "extra": ({**ema, "down.0.res.extra.weight": torch.zeros(1)}, "unmapped keys.*extra"),
        "missing": ({k: v for k, v in ema.items() if k != "up.1.res.norm2.bias"}, "missing DDAE keys.*up.1.res"),
        "ddpmpp": (
            {**{k: v for k, v in ema.items() if not k.startswith("down.2.")}, "down.2.op.norm1.weight": torch.ones(1)},
            "DDPM\\+\\+",
        ),
    }
    for name, (sd, message) in cases.items():
        save_like_train_py(tmp_path / f"{name}.pth", sd, online)
        with pytest.raises(CheckpointError, match=message):
            load_backbone_checkpoint("ddae_ddpm", tmp_path / f"{name}.pth")


def test_diffssl_eval_accepts_the_checkpoint_kind(tmp_path, capsys):
    from diffssl_plugin.cli import CHECKPOINT_KIND_CHOICES, main

    assert set(CHECKPOINT_KIND_CHOICES) == {"export", *CHECKPOINT_KINDS}
    sd = official_state_dict(GREY, seed=5)
    save_like_train_py(tmp_path / "grey.pth", sd, sd)
    args = ["eval", "--checkpoint", str(tmp_path / "grey.pth"), "--checkpoint-kind", "ddae_ddpm"]
    args += ["--timesteps", "10", "--blocks", "up0.1", "--pools", "avg", "--no-progress", "--out", str(tmp_path)]
    args += ["--train-images", "60", "--val-images", "20", "--test-images", "20"]
    assert main(args) == 0, capsys.readouterr().err
    assert "ddae_ddpm" in (tmp_path / "records.jsonl").read_text()
    assert main(["eval", "--model", "raw_pixels", "--checkpoint-kind", "ddae_ddpm"]) == 2
