"""DRL / VDRL: the VE schedule and samplers, the λ = σ² DSM loss, encoders and codes, the learner, timm loading
and export, the classifier helper, and bad inputs."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from diffssl_plugin.backbones.drl import (
    DRLBackbone,
    DRLEncoder,
    TimeDRLBackbone,
    classifier_from_encoder,
)
from diffssl_plugin.diffusion import NoiseSampler, VESchedule, noise_sampler, ve_dsm_loss, ve_perturb
from diffssl_plugin.diffusion.losses import gaussian_kl
from diffssl_plugin.errors import InputError, UnknownNameError
from diffssl_plugin.methods import get_method
from diffssl_plugin.methods.drl import DRL, VDRL

# 8×8 grey networks: small enough to train for a hundred steps in a test
TINY_ENCODER = {"in_chans": 1, "image_size": 8, "channels": (8, 16, 32), "norm_num_groups": 8}
TINY_SCORE_NET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "add_attention": False,
}


def tiny_drl(cls=DRL, **kw) -> DRL:
    torch.manual_seed(0)
    args = {"encoder_config": TINY_ENCODER, "unet_config": TINY_SCORE_NET, "code_dim": 8, "warmup_steps": 1}
    return cls(**{**args, **kw})


@pytest.fixture(scope="module")
def fmnist8() -> torch.Tensor:
    """The first 128 real Fashion-MNIST training images, area-resized to 8×8, in [0, 1]."""
    from diffssl_plugin.data import load_split

    x = load_split("fashion_mnist", "train", download=False).images[:128].float().div(255.0)
    return F.interpolate(x, size=(8, 8), mode="area").clamp(0, 1)


@pytest.fixture
def x28(real_batch28):
    return real_batch28[:4]


# ================================================================ schedule, samplers, loss
def test_ve_schedule_endpoints_and_inverse():
    s = VESchedule()
    assert (s.sigma_min, s.sigma_max) == (0.01, 50.0)
    torch.testing.assert_close(s.sigma(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.01, math.sqrt(0.01 * 50), 50.0]))
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(s.t_of_sigma(s.sigma(t)), t, atol=1e-6, rtol=0)


def test_samplers_weight_noise_levels_as_named():
    g = torch.Generator().manual_seed(0)
    t, sigma = noise_sampler("uniform_t").sample(20000, g)
    torch.testing.assert_close(sigma, VESchedule().sigma(t))
    assert abs(t.mean().item() - 0.5) < 0.01  # t uniform ⇔ log σ uniform
    assert abs(torch.log(sigma).mean().item() - 0.5 * (math.log(0.01) + math.log(50))) < 0.05
    assert abs((sigma < 1).float().mean().item() - math.log(100) / math.log(5000)) < 0.01

    t, sigma = noise_sampler("uniform_sigma").sample(20000, g)
    assert abs(sigma.mean().item() - 25.005) < 0.3  # σ uniform on [0.01, 50]: mostly heavy noise
    assert (sigma < 1).float().mean().item() < 0.03
    torch.testing.assert_close(VESchedule().sigma(t), sigma, rtol=1e-5, atol=1e-5)

    for name in ("uniform_t", "uniform_sigma"):
        _, sigma = noise_sampler(name, sigma_range=(0.1, 2.0)).sample(5000, g)
        assert sigma.min() >= 0.1 - 1e-6 and sigma.max() <= 2.0 + 1e-6
        assert sigma.max() > 1.8 and sigma.min() < 0.15


def test_dsm_loss_matches_hand_computation():
    x0 = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]], [[[-0.5, 0.25], [1.0, -1.0]]]])
    sampler = noise_sampler("uniform_t")
    c = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])

    def constant_score(x_t, sigma, t):
        return c.expand_as(x_t)

    loss = ve_dsm_loss(constant_score, x0, sampler, torch.Generator().manual_seed(3))
    per = ve_dsm_loss(constant_score, x0, sampler, torch.Generator().manual_seed(3), per_sample=True)
    # by hand: the generator first gives u ~ U[0,1) per image (t = u), then ε
    g = torch.Generator().manual_seed(3)
    u = torch.rand(2, generator=g)
    eps = torch.randn(2, 1, 2, 2, generator=g)
    sigma = 0.01 * 5000.0**u
    expected = [((sigma[i] * c[0] + eps[i]) ** 2).mean() for i in range(2)]
    torch.testing.assert_close(per, torch.stack(expected))
    torch.testing.assert_close(loss, (expected[0] + expected[1]) / 2)

    # the exact conditional score −(x_t − x0)/σ² = −ε/σ makes the loss vanish; the zero score leaves mean ε²
    def true_score(x_t, sigma, t):
        return -(x_t - x0) / sigma.view(-1, 1, 1, 1) ** 2

    assert ve_dsm_loss(true_score, x0, sampler, torch.Generator().manual_seed(3)).item() < 1e-10
    zero = ve_dsm_loss(lambda x_t, s, t: torch.zeros_like(x_t), x0, sampler, torch.Generator().manual_seed(3))
    torch.testing.assert_close(zero, eps.pow(2).mean())
    torch.testing.assert_close(ve_perturb(x0, sigma, eps), x0 + sigma.view(-1, 1, 1, 1) * eps)


def test_score_fn_sees_matching_t_and_sigma():
    seen = {}

    def spy(x_t, sigma, t):
        seen.update(sigma=sigma, t=t)
        return torch.zeros_like(x_t)

    ve_dsm_loss(spy, torch.zeros(5, 1, 2, 2), noise_sampler("uniform_sigma"), torch.Generator().manual_seed(0))
    torch.testing.assert_close(VESchedule().sigma(seen["t"]), seen["sigma"], rtol=1e-5, atol=1e-6)


def test_reverse_sde_samples_a_gaussian_from_its_exact_score():
    """Data N(m, s²): the VE marginal at σ is N(m, s² + σ²), so its score is exact and the samples must come
    out N(m, s²); with ``shared_noise`` a condition-free score gives one image repeated."""
    from diffssl_plugin.diffusion.ve import ve_reverse_sde_sample

    m, s = 0.3, 0.5

    def score(x, sigma, t):
        return -(x - m) / (s**2 + sigma.view(-1, 1, 1, 1) ** 2)

    x = ve_reverse_sde_sample(score, (4000, 1, 1, 1), steps=300, generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - m) < 0.04 and abs(x.std().item() - s) < 0.04
    same = ve_reverse_sde_sample(score, (3, 1, 2, 2), 20, generator=torch.Generator().manual_seed(1), shared_noise=True)
    torch.testing.assert_close(same, same[:1].expand_as(same))
    with pytest.raises(InputError, match="at least 2 steps"):
        ve_reverse_sde_sample(score, (1, 1, 1, 1), steps=1)


def test_digits_are_not_flipped_and_pretrain_passes_the_dataset_flag(tmp_path):
    from diffssl_plugin.data import DATASETS
    from diffssl_plugin.methods.drl import drl_transform
    from diffssl_plugin.methods.training import Budget, pretrain
    from diffssl_plugin.runtime import Runtime

    assert not DATASETS["mnist5k"].hflip and not DATASETS["digits"].hflip and DATASETS["fashion_mnist"].hflip
    x = torch.rand(64, 1, 4, 4)
    flipped = drl_transform(x, torch.Generator().manual_seed(0))
    assert 0 < (flipped != x * 2 - 1).flatten(1).any(1).sum() < 64  # about half the images mirrored
    torch.testing.assert_close(drl_transform(x, torch.Generator().manual_seed(0), flip=False), x * 2 - 1)
    assert tiny_drl().hflip and not tiny_drl(hflip=False).hflip

    kwargs = {
        "code_dim": 2,
        "time_dependent": False,
        "encoder_config": {"in_chans": 1, "image_size": 28, "channels": [8], "norm_num_groups": 8},
        "unet_config": {**TINY_SCORE_NET, "sample_size": 28},
    }
    result = pretrain(
        "drl",
        "digits",
        Budget(steps=1),
        tmp_path,
        batch_size=8,
        max_images=20,
        progress=False,
        runtime=Runtime(accelerator="cpu"),
        method_kwargs=kwargs,
        checkpoint_every=1000,
    )
    assert result.method_kwargs["hflip"] is False


def test_bad_schedule_and_sampler_inputs():
    with pytest.raises(InputError, match="σ_min < σ_max"):
        VESchedule(50.0, 0.01)
    with pytest.raises(InputError, match="σ_min < σ_max"):
        VESchedule(1.0, 1.0)
    with pytest.raises(InputError, match="σ_min > 0"):
        VESchedule(0.0, 1.0)
    with pytest.raises(UnknownNameError, match="uniform_sigma"):
        noise_sampler("log_normal")
    with pytest.raises(InputError, match="inside"):
        noise_sampler("uniform_t", sigma_range=(0.001, 1.0))
    with pytest.raises(InputError, match="lo < hi"):
        NoiseSampler("uniform_t", VESchedule(), (2.0, 1.0))


def test_score_is_the_unet_output_over_sigma_with_a_log_sigma_fourier_embedding():
    """s_θ = out/σ (NCSN++): the score net's last conv output divided by σ, its noise embedding the Gaussian
    Fourier features sin/cos(2π W log σ)."""
    m = tiny_drl().eval()
    net = m.score_net
    seen = {}
    hooks = [
        net.conv_out.register_forward_hook(lambda mod, i, o: seen.__setitem__("out", o)),
        net.time_proj.register_forward_hook(lambda mod, i, o: seen.__setitem__("emb", o)),
    ]
    sigma = torch.tensor([0.02, 1.0, 40.0])
    x_t = torch.randn(3, 1, 8, 8) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        score = m.score(x_t, sigma, torch.randn(3, m.hparams.code_dim))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(score, seen["out"] / sigma.view(-1, 1, 1, 1))
    angle = sigma.log()[:, None] * net.time_proj.weight[None, :] * 2 * math.pi  # float32 angles up to ~10³ rad
    torch.testing.assert_close(seen["emb"], torch.cat([angle.sin(), angle.cos()], dim=1))


# ================================================================ encoders and codes
def test_time_dependent_codes_differ_across_t_and_static_codes_do_not(x28):
    td = DRLBackbone(time_dependent=True, code_dim=16).eval()
    static = DRLBackbone(time_dependent=False, code_dim=16).eval()
    with torch.no_grad():
        z = {t: td.code(x28, t) for t in (0.0, 0.3, 1.0)}
        for a, b in ((0.0, 0.3), (0.3, 1.0), (0.0, 1.0)):
            assert (z[a] - z[b]).abs().mean() > 1e-3 * z[a].abs().mean()
        # a static encoder has no time conditioning at all (not merely an ignored t): fewer parameters, no t input
        assert not hasattr(static.encoder, "time_embedding") and hasattr(td.encoder, "time_embedding")
        assert sum(p.numel() for p in static.parameters()) < sum(p.numel() for p in td.parameters())
        # per-image times: row i at t_i equals the batch read at t_i
        mixed = td.code(x28, torch.tensor([0.0, 0.3, 1.0, 0.0]))
        torch.testing.assert_close(mixed[1], z[0.3][1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mixed[2], z[1.0][2], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="needs the time"):
        td.encoder(x28)


def test_concatenated_codes_and_extract(x28):
    m = TimeDRLBackbone(time_dependent=True, code_dim=8, readout_t=(0.0, 0.5, 1.0)).eval()
    assert m.num_features == 24
    with torch.no_grad():
        out = m(x28)
        feats = m.extract(x28, [0, 500, 1000], ["code", "codes"], pool="avg")
        maps = m.extract(x28, [500], ["code", "codes"], pool=None)
    assert out.shape == (4, 24)
    assert m.block == "codes" and set(m.block_names) == {"code", "codes"}
    for i, k in enumerate((0, 500, 1000)):
        torch.testing.assert_close(out[:, 8 * i : 8 * (i + 1)], m.code(x28, k / 1000), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats[(k, "code")], out[:, 8 * i : 8 * (i + 1)], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats[(k, "codes")], out, rtol=1e-4, atol=1e-5)
    assert maps[(500, "code")].shape == (4, 8, 1, 1) and maps[(500, "codes")].shape == (4, 24, 1, 1)
    with pytest.raises(InputError, match="out of range"):
        m.extract(x28, [1001], ["code"])
    with pytest.raises(UnknownNameError):
        m.extract(x28, [0], ["mid"])


def test_variational_encoder_gives_mean_code_and_kl(x28):
    enc = DRLEncoder(code_dim=6, time_dependent=True, variational=True)
    mean, logvar = enc(x28, 0.5)
    assert mean.shape == logvar.shape == (4, 6)
    backbone = DRLBackbone(encoder=enc, readout_t=(0.5,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x28), mean.detach(), rtol=1e-4, atol=1e-5)
    # KL(N(μ, s²) ‖ N(0, 1)) by hand, and zero at the prior
    m, lv = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    torch.testing.assert_close(gaussian_kl(m, lv), torch.tensor([0.5 * 1.0 + 0.5 * (4.0 - 1.0 - math.log(4.0))]))
    assert gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 2)).abs().max() == 0


# ================================================================ the learner
def test_registry_and_loss_is_a_function_of_the_step_seed(fmnist8):
    assert get_method("drl")["model"] is DRL and get_method("vdrl")["model"] is VDRL
    images = fmnist8[:8]
    for cls in (DRL, VDRL):
        m = tiny_drl(cls)
        a = m.training_loss(images, torch.Generator().manual_seed(5))
        b = m.training_loss(images, torch.Generator().manual_seed(5))
        c = m.training_loss(images, torch.Generator().manual_seed(6))
        assert torch.isfinite(a) and a.item() > 0
        assert a.item() == b.item() and a.item() != c.item()


def test_loss_trains_encoder_and_score_net_jointly(fmnist8):
    m = tiny_drl(time_dependent=True)
    m.training_loss(fmnist8[:8], torch.Generator().manual_seed(0)).backward()
    for part in (m.encoder.conv_in, m.encoder.time_embedding.linear_1, m.code_proj, m.score_net.conv_in):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0
    # the unconditional baseline: same architecture, z zeroed, so the encoder gets no gradient
    u = tiny_drl(conditional=False)
    u.training_loss(fmnist8[:8], torch.Generator().manual_seed(0)).backward()
    assert u.encoder.conv_in.weight.grad is None and u.score_net.conv_in.weight.grad.abs().sum() > 0


def test_vdrl_adds_the_beta_weighted_kl(fmnist8):
    """loss(β) − loss(0) = β · mean KL / pixels: the same draws, so the DSM parts are equal."""
    images = fmnist8[:8]
    with torch.no_grad():
        base = tiny_drl(VDRL, beta=0.0).training_loss(images, torch.Generator().manual_seed(1))
        m = tiny_drl(VDRL, beta=3.0)
        loss = m.training_loss(images, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)  # replay the step's draws: flip coins, then (t, σ)
        x0 = m.transform(images, g)
        t, _ = m.noise.sample(8, g)
        kl = gaussian_kl(*m.encoder(x0, t))
    assert kl.mean() > 0
    torch.testing.assert_close(loss - base, 3.0 * kl.mean() / 64, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_encoder_conditioned_dsm_beats_unconditional(fmnist8):
    """Same score-net architecture and init, same batches and draws: the code about x0 takes the DSM loss below
    what the score net reaches with z zeroed (DRL's Prop. 1: without x0's information the loss has a floor).

    σ is drawn from [0.3, 3] (an explicit range), where knowing x0 helps most; at σ ≪ 0.3 the noisy image
    already shows x0, at σ ≫ 3 the λ = σ² loss of any denoiser is small.
    """
    steps, batch = 100, 32
    results = {}
    for conditional in (True, False):
        m = tiny_drl(conditional=conditional, time_dependent=False, sigma_range=(0.3, 3.0))
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
        for s in range(steps):
            loss = m.training_loss(fmnist8[(s * batch) % 128 :][:batch], torch.Generator().manual_seed(s))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            results[conditional] = (
                torch.stack([m.training_loss(fmnist8, torch.Generator().manual_seed(10_000 + i)) for i in range(4)])
                .mean()
                .item()
            )
    assert results[True] < 0.98 * results[False], results


def test_bad_construction_inputs():
    with pytest.raises(InputError, match="code size"):
        DRL(code_dim=0)
    with pytest.raises(InputError, match="code size"):
        DRLEncoder(code_dim=-3)
    with pytest.raises(InputError, match="σ_min < σ_max"):
        DRL(sigma_min=50.0, sigma_max=0.01)
    with pytest.raises(UnknownNameError, match="noise sampler"):
        DRL(sampler="uniform_s")
    with pytest.raises(InputError, match="image size 8 ≠ score-net image size 28"):
        DRL(encoder_config=TINY_ENCODER, unet_config="fmnist_small")
    with pytest.raises(InputError, match="channel"):
        DRL(encoder_config={**TINY_ENCODER, "in_chans": 3}, unet_config=TINY_SCORE_NET)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        DRLBackbone(time_dependent=True, readout_t=(0.5, 1.5))
    with pytest.raises(InputError, match="time-dependent"):
        DRLBackbone(time_dependent=False, readout_t=(0.0, 1.0))
    with pytest.raises(UnknownNameError, match="encoder preset"):
        DRLBackbone(encoder_config="imagenet")


def test_backbone_rejects_bad_images():
    m = DRLBackbone()
    with pytest.raises(InputError, match="28×28"):
        m(torch.zeros(2, 1, 32, 32))
    with pytest.raises(InputError, match="channel"):
        m(torch.zeros(2, 3, 28, 28))
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        m.check_inputs(torch.full((2, 1, 28, 28), 200.0))  # values: once per dataset, not in a forward
    m.strict_inputs = True
    with pytest.raises(InputError, match="NaN"):
        m(torch.full((2, 1, 28, 28), float("nan")))


# ================================================================ timm, export, classifier
@pytest.mark.parametrize(
    "name,time_dependent,variational,num_features",
    [
        ("drl_encoder_fmnist", False, False, 64),
        ("drl_time_encoder_fmnist", True, False, 192),
        ("vdrl_time_encoder_fmnist", True, True, 192),
    ],
)
def test_timm_create_model(name, time_dependent, variational, num_features, x28):
    m = timm.create_model(name).eval()
    assert isinstance(m, DRLBackbone) and isinstance(m, TimeDRLBackbone) == time_dependent
    assert (m.time_dependent, m.variational, m.num_features) == (time_dependent, variational, num_features)
    cfg = timm.data.resolve_model_data_config(m)
    assert cfg["mean"] == (0.5,) and cfg["std"] == (0.5,) and cfg["input_size"] == (1, 28, 28)
    with torch.no_grad():
        assert m(x28).shape == (4, num_features)
    clf = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        feats = clf.forward_features(x28)
        torch.testing.assert_close(clf(x28), clf.get_classifier()(clf.forward_head(feats, pre_logits=True)))
    fm = timm.create_model(name, features_only=True)
    assert fm.feature_info.reduction() == [1, 2, 4, 8]
    with torch.no_grad():
        outs = fm(x28)
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 28, 28), (32, 14, 14), (64, 7, 7), (128, 3, 3)]


def test_export_and_local_dir_round_trip(tmp_path, x28):
    from diffssl_plugin.loading import export

    for cls in (DRL, VDRL):
        m = cls(code_dim=4, readout_t=(0.1, 0.9))
        m.training_loss((x28[:2] + 1) / 2, torch.Generator().manual_seed(0)).backward()
        with torch.no_grad():  # make the EMA encoder differ from a fresh one
            for p in m.ema.module.parameters():
                p.add_(0.01 * torch.randn_like(p))
        folder = export(m, tmp_path / cls.__name__)
        assert not (folder / "diffusers").exists()  # a VE conditional score net is not a DDPM pipeline
        loaded = timm.create_model(f"local-dir:{folder / 'backbone'}", pretrained=True).eval()
        assert loaded.pretrained_cfg["architecture"] == m.timm_architecture
        assert loaded.model_args() == m.feature_backbone.model_args() and loaded.num_features == 8
        with torch.no_grad():
            torch.testing.assert_close(loaded(x28), m.feature_backbone.eval()(x28))
        clf = classifier_from_encoder(folder / "backbone", num_classes=10).eval()  # from the exported folder
        with torch.no_grad():
            assert clf(x28).shape == (4, 10)
            torch.testing.assert_close(clf.forward_features(x28), loaded(x28))


def test_classifier_from_encoder(x28):
    m = DRL(code_dim=4, readout_t=(0.0, 1.0))
    clf = classifier_from_encoder(m, num_classes=3)
    assert clf.num_classes == 3 and clf.num_features == 8
    with torch.no_grad():  # the encoder is copied from the (EMA) backbone
        torch.testing.assert_close(clf.forward_features(x28), m.feature_backbone.eval().forward_features(x28))
    assert clf.encoder is not m.ema.module
    loss = F.cross_entropy(clf.train()(x28), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert clf.encoder.conv_in.weight.grad.abs().sum() > 0 and clf.head.weight.grad is not None
    assert m.ema.module.conv_in.weight.grad is None
    with pytest.raises(InputError, match="num_classes"):
        classifier_from_encoder(m, 0)
    with pytest.raises(InputError, match="DRL"):
        classifier_from_encoder(torch.nn.Linear(2, 2), 3)


def test_pretrain_with_lightning_exports_a_loadable_encoder(tmp_path, x28):
    """The bench's path: Lightning pretraining (bf16 autocast, EMA, checkpoint), export, timm ``local-dir:``."""
    from diffssl_plugin.methods.training import Budget, pretrain
    from diffssl_plugin.runtime import Runtime

    kwargs = {
        "code_dim": 4,
        "readout_t": [0.0, 1.0],
        "encoder_config": {"in_chans": 1, "image_size": 28, "channels": [8, 16], "norm_num_groups": 8},
        "unet_config": {**TINY_SCORE_NET, "sample_size": 28},
    }
    result = pretrain(
        "vdrl",
        budget=Budget(steps=2),
        out_dir=tmp_path,
        batch_size=16,
        max_images=64,
        progress=False,
        runtime=Runtime(accelerator="cpu"),
        method_kwargs=kwargs,
    )
    assert result.steps == 2 and math.isfinite(result.final_loss)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert int(state["ema.num_updates"]) == 2  # one encoder-EMA update per optimiser step
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export' / 'backbone'}", pretrained=True).eval()
    assert isinstance(loaded, TimeDRLBackbone) and loaded.variational and loaded.num_features == 8
    with torch.no_grad():
        assert torch.isfinite(loaded(x28)).all()


def test_harness_sweeps_the_readout_time(tmp_path):
    """The frozen-feature harness reads a time-dependent backbone through ``extract`` (a t sweep), a static one
    through its output."""
    from diffssl_plugin.eval import EvalConfig, evaluate

    config = EvalConfig(
        train_images=100,
        val_images=50,
        test_images=100,
        timesteps=(0, 500, 1000),
        blocks=("code", "codes"),
        pools=("avg",),
        sweep_cs=(1.0,),
        final_cs=(1.0,),
        knn_ks=(20,),
    )
    records = evaluate(
        timm.create_model("drl_time_encoder_fmnist"),
        "drl",
        "drl_time_encoder_fmnist",
        config,
        cache_dir=tmp_path,
        progress=False,
    )
    swept = {(r["readout"]["timestep"], r["readout"]["block"]) for r in records if r["split"] == "val"}
    assert swept == {(k, b) for k in (0, 500, 1000) for b in ("code", "codes")}
    assert {r["protocol"]["name"] for r in records if r["split"] == "test"} == {"linear", "knn20"}
    static = evaluate(timm.create_model("drl_encoder_fmnist"), "drl", "drl_encoder_fmnist", config, progress=False)
    assert [r["readout"]["block"] for r in static] == [None, None]
    # random-init codes of 100 real images still beat chance (10%) by a margin: the records carry real accuracies
    tests = [r for r in records + static if r["split"] == "test"]
    assert tests and all(r["value"] > 0.25 for r in tests), [(r["protocol"]["name"], r["value"]) for r in tests]
