"""Diffusion core: schedule, timestep checks, ε-loss, EMA and sampling."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from diffssl_plugin.diffusion import (
    DDPM_DEFAULTS,
    EMA,
    add_noise,
    check_timesteps,
    ddpm_scheduler,
    ema_decay,
    epsilon_loss,
    sample_timesteps,
)
from diffssl_plugin.errors import InputError


# ---------------------------------------------------------------- schedule
def test_ddpm_scheduler_is_the_papers_linear_schedule():
    s = ddpm_scheduler()
    assert s.config.num_train_timesteps == 1000 == DDPM_DEFAULTS["num_train_timesteps"]
    assert s.config.beta_schedule == "linear"
    assert s.config.prediction_type == "epsilon"
    assert torch.isclose(s.betas[0], torch.tensor(1e-4)) and torch.isclose(s.betas[-1], torch.tensor(0.02))
    assert s.alphas_cumprod.shape == (1000,)
    assert ddpm_scheduler(num_train_timesteps=500).alphas_cumprod.shape == (500,)


def test_add_noise_matches_diffusers():
    sched = ddpm_scheduler()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(16, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    t[0], t[1] = 0, 999  # the two ends
    ours = add_noise(sched, x0, noise, t)
    ref = DDPMScheduler(**DDPM_DEFAULTS).add_noise(x0, noise, t)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # and the formula itself, per sample
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(ours, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, rtol=1e-5, atol=1e-6)
    # x_0 at t=0 is almost clean, x_999 almost pure noise
    assert (ours[0] - x0[0]).abs().max() < 0.05  # sqrt(1 - ᾱ_0) = 0.01
    assert (ours[1] - noise[1]).abs().max() < 0.05


def test_add_noise_keeps_dtype():
    sched = ddpm_scheduler()
    x0 = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    out = add_noise(sched, x0, torch.ones_like(x0), torch.tensor([5, 500]))
    assert out.dtype == torch.float64
    assert out[1].mean() > out[0].mean() > 0  # more noise at the later timestep


def test_check_timesteps_accepts_valid():
    assert check_timesteps([0, 10, 999, 7.0], 1000) == [0, 10, 999, 7]
    assert all(type(t) is int for t in check_timesteps([torch.tensor(3), 4.0], 1000))


@pytest.mark.parametrize("bad", [-1, 1000, 5000])
def test_check_timesteps_rejects_out_of_range(bad):
    with pytest.raises(InputError) as ei:
        check_timesteps([0, bad], 1000)
    msg = str(ei.value)
    assert str(bad) in msg and "0..999" in msg and "0-indexed" in msg


def test_check_timesteps_range_follows_schedule_length():
    with pytest.raises(InputError, match=r"0\.\.99\b"):
        check_timesteps([100], 100)


@pytest.mark.parametrize("bad", [2.5, float("nan"), True])
def test_check_timesteps_rejects_non_integers(bad):
    with pytest.raises(InputError, match="integer"):
        check_timesteps([bad], 1000)


def test_sample_timesteps_uniform_range():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(5000, 1000, g)
    assert t.dtype == torch.int64 and t.shape == (5000,)
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    assert int(t.min()) < 10 and int(t.max()) > 990  # covers the whole range


# ---------------------------------------------------------------- loss
def test_epsilon_loss_equals_hand_computation_for_zero_model():
    sched = ddpm_scheduler()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    seen = {}

    def zero_model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss = epsilon_loss(zero_model, x0, sched, torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(loss, noise.pow(2).mean())
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], add_noise(sched, x0, noise, t))
    assert loss.dim() == 0


def test_epsilon_loss_is_deterministic_given_seed_and_zero_for_perfect_model():
    sched = ddpm_scheduler()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    net = nn.Conv2d(1, 1, 3, padding=1)

    def model(x_t, t):
        return net(x_t)

    a = epsilon_loss(model, x0, sched, torch.Generator().manual_seed(7))
    b = epsilon_loss(model, x0, sched, torch.Generator().manual_seed(7))
    c = epsilon_loss(model, x0, sched, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    a.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0

    # an oracle that recovers ε exactly from (x_t, t) has zero loss
    def oracle(x_t, t):
        ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    assert epsilon_loss(oracle, x0, sched, torch.Generator().manual_seed(7)) < 1e-8


# ---------------------------------------------------------------- EMA
def test_ema_decay_schedule():
    assert ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay(10**7, 0.999) == 0.999
    assert ema_decay(0, 0.9, warmup=False) == 0.9


def _perturbed_copy_into(model: nn.Module, delta: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(delta * (i + 1))


def test_ema_first_update_uses_warmup_decay():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9999)
    old = [p.detach().clone() for p in ema.module.parameters()]
    _perturbed_copy_into(model, 1.0)
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    for o, e, new in zip(old, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.1 * o + 0.9 * new.detach())
    assert int(ema.num_updates) == 1
    # buffers are copied, not averaged
    assert torch.equal(ema.module[1].running_mean, torch.full((4,), 3.0))

    # second step: decay 2/11
    old = [p.detach().clone() for p in ema.module.parameters()]
    _perturbed_copy_into(model, -0.5)
    ema.update(model)
    d = 2 / 11
    for o, e, new in zip(old, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, d * o + (1 - d) * new.detach())
    assert int(ema.num_updates) == 2


def test_ema_without_warmup_uses_max_decay():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    old = [p.detach().clone() for p in ema.module.parameters()]
    _perturbed_copy_into(model, 2.0)
    ema.update(model)
    for o, e, new in zip(old, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.5 * o + 0.5 * new.detach())


def test_ema_is_a_frozen_independent_copy():
    model = nn.Linear(3, 2)
    ema = EMA(model)
    assert all(not p.requires_grad for p in ema.parameters())
    ema.update(model)
    ema.train()
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the live model is untouched
    assert all(e.data_ptr() != p.data_ptr() for e, p in zip(ema.module.parameters(), model.parameters()))
    x = torch.randn(5, 3)
    torch.testing.assert_close(ema(x), ema.module(x))
    # it is saved with the model (num_updates included)
    sd = ema.state_dict()
    assert "num_updates" in sd and "module.weight" in sd


# ---------------------------------------------------------------- sampling
@pytest.fixture
def tiny_unet(tiny_unet_config):
    torch.manual_seed(0)
    return UNet2DModel(**tiny_unet_config).eval()


def test_sample_images_ddim_shape_range_and_seed(tiny_unet):
    from diffssl_plugin.diffusion.sampling import sample_images

    sched = ddpm_scheduler()
    a = sample_images(tiny_unet, sched, num_images=3, steps=2, sampler="ddim", seed=0, progress=False)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert a.std() > 0
    b = sample_images(tiny_unet, sched, num_images=3, steps=2, sampler="ddim", seed=0, progress=False)
    torch.testing.assert_close(a, b)
    c = sample_images(tiny_unet, sched, num_images=3, steps=2, sampler="ddim", seed=1, progress=False)
    assert not torch.allclose(a, c)
    # it is diffusers' deterministic DDIM (η = 0) on the same schedule, from the same seeded x_T
    from diffusers import DDIMPipeline, DDIMScheduler

    ref = DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler.from_config(sched.config))
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref(
            batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=2, eta=0.0, output_type="np"
        ).images
    torch.testing.assert_close(a, torch.from_numpy(ref).permute(0, 3, 1, 2))


def test_sample_images_ddpm_and_unknown_sampler(tiny_unet):
    from diffssl_plugin.diffusion.sampling import sample_images

    out = sample_images(tiny_unet, ddpm_scheduler(), num_images=2, steps=2, sampler="ddpm", progress=False)
    assert out.shape == (2, 1, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1
    from diffssl_plugin.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="ddim"):
        sample_images(tiny_unet, ddpm_scheduler(), num_images=2, steps=2, sampler="euler", progress=False)


def test_save_grid_writes_png(tmp_path):
    from PIL import Image

    from diffssl_plugin.diffusion.sampling import save_grid

    images = torch.rand(3, 1, 8, 8)
    p = save_grid(images, tmp_path / "grid.png", nrow=2)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(p) as im:
        # 2 columns × 2 rows of 8×8 with 1-pixel padding
        assert im.size == (2 * 9 + 1, 2 * 9 + 1)
    assert [x.name for x in tmp_path.iterdir()] == ["grid.png"]
