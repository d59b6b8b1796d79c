"""The ``finetune`` protocol: one recipe for every backbone (raw pixels, a timm CNN, a DDAE U-Net), all
weights trained on a deep copy, records with the recipe, accuracy above chance on real Fashion-MNIST."""

from __future__ import annotations

import pytest
import timm
import torch

from diffssl_plugin.backbones import DDAEBackbone
from diffssl_plugin.errors import InputError
from diffssl_plugin.eval import PROTOCOLS, EvalConfig, Readout, evaluate
from diffssl_plugin.eval.finetune import FinetuneRecipe, finetune
from diffssl_plugin.eval.harness import load_eval_splits

SMALL = {"train_images": 600, "val_images": 200, "test_images": 400}
RECIPE = {"epochs": 2, "batch_size": 50, "probe_cs": (0.1,)}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def splits():
    return load_eval_splits(EvalConfig(**SMALL))


def test_protocol_is_registered_and_rejects_unknown_settings():
    assert "finetune" in PROTOCOLS
    with pytest.raises(InputError, match="epochz"):
        FinetuneRecipe.from_dict({"epochz": 3})


def test_raw_pixels_record_carries_recipe_and_budget():
    """Raw pixels have no weights: the protocol is then a linear classifier, well above chance (10%)."""
    budget = {"budget": "3steps", "steps": 3}
    cfg = EvalConfig(**SMALL, extra={"finetune": {**RECIPE, "epochs": 3}})
    records = evaluate(
        timm.create_model("raw_pixels"),
        "raw_pixels",
        "raw_pixels",
        cfg,
        protocols=("finetune",),
        budget=budget,
        progress=False,
    )
    assert len(records) == 1
    r = records[0]
    assert r["protocol"]["name"] == "finetune" and r["split"] == "test" and r["budget"] == budget
    assert r["protocol"]["epochs"] == 3 and r["protocol"]["optimizer"] == "AdamW" and r["protocol"]["lr"] > 0
    assert len(r["protocol"]["val_curve"]) == 4 and 0 <= r["protocol"]["best_epoch"] <= 3  # 0: the probe
    assert r["val_acc"] == max(r["protocol"]["val_curve"])
    assert r["images"] == {"train": 600, "val": 200, "test": 400}
    assert r["value"] > 0.5 and r["val_acc"] > 0.5


def test_cnn_is_fine_tuned_on_a_copy(splits):
    """Every weight of a (tiny) CIFAR-stem ResNet trains; the caller's model keeps its weights and buffers."""
    torch.manual_seed(0)
    model = timm.create_model("simclr_resnet18_cifar", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    before = _state(model)
    # 60 steps, so the batch-norm running statistics of a randomly initialised network settle
    recipe = FinetuneRecipe(epochs=2, batch_size=20, probe_cs=(0.1,), select_best=False)
    res = finetune(model, *splits, recipe=recipe)
    assert _same(model, before)
    tuned = res.model.backbone.state_dict()
    assert not torch.equal(tuned["conv1.weight"], before["conv1.weight"])  # gradients reached the first layer
    assert not torch.equal(tuned["layer4.0.conv2.weight"], before["layer4.0.conv2.weight"])
    assert res.test_acc > 0.25 and len(res.val_curve) == 3 and res.train_images == 600


def test_ddae_backbone_fine_tunes_its_unet_at_the_swept_readout(tiny_unet_config, splits):
    """The DDAE backbone (noise → U-Net at t → pooled block) is fine-tuned through its U-Net, at the readout
    the linear sweep chose; the input backbone is unchanged."""
    torch.manual_seed(0)
    unet = {**tiny_unet_config, "sample_size": 28}
    model = DDAEBackbone(unet_config=unet, timestep=10, block="up0", pool="avg")
    before = _state(model)
    cfg = EvalConfig(
        **SMALL,
        timesteps=(10,),
        blocks=("mid",),
        pools=("avg2x2",),
        final_cs=(1.0,),
        knn_ks=(20,),
        extra={"finetune": RECIPE},
    )
    records = evaluate(model, "ddae", "tiny", cfg, protocols=("linear", "finetune"), progress=False)
    linear = next(r for r in records if r["protocol"]["name"] == "linear")
    ft = [r for r in records if r["protocol"]["name"] == "finetune"]
    assert len(ft) == 1 and ft[0]["readout"] == {"timestep": 10, "block": "mid", "pool": "avg2x2"}
    assert ft[0]["value"] > 0.3 and ft[0]["val_acc"] >= linear["val_acc"] - 0.05  # starts from the probe
    assert _same(model, before)

    train, val, test = splits
    recipe = FinetuneRecipe(epochs=1, batch_size=50, train_images=100, probe_cs=(0.1,), select_best=False)
    res = finetune(model, train, val, test, Readout(10, "mid", "avg2x2"), recipe)
    tuned = res.model.backbone.unet.state_dict()
    assert not torch.equal(tuned["conv_in.weight"], before["unet.conv_in.weight"])  # gradients reached it
    assert _same(model, before)


def test_the_one_flip_mirrors_the_images_whose_coin_came_up(splits):
    """data.flip.hflip (learners' augmentation and fine-tuning's flips): coins drawn inside or given."""
    from diffssl_plugin.data.flip import flip_coins, hflip

    x = splits[0].images[:16].float()
    coins = flip_coins(16, torch.Generator().manual_seed(3))
    out = hflip(x, coins=coins)
    assert 0 < int(coins.sum()) < 16
    assert torch.equal(out[coins], x[coins].flip(-1)) and torch.equal(out[~coins], x[~coins])
    assert torch.equal(hflip(x, torch.Generator().manual_seed(3)), out)


def test_kept_start_is_scored_on_the_frozen_test_features(splits):
    """When validation keeps epoch 0 (the probe, the backbone unchanged), the test score from the frozen test
    features equals running the backbone on the test images."""
    from diffssl_plugin.eval import extract_features

    torch.manual_seed(0)
    model = timm.create_model("simclr_resnet18_cifar", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    train, val, test = splits
    recipe = FinetuneRecipe(epochs=0, probe_cs=(0.1,))
    frozen = [extract_features(model, d, progress=False)[Readout()] for d in (train, val, test)]
    plain = finetune(model, train, val, test, recipe=recipe, frozen=tuple(frozen[:2]))
    shared = finetune(model, train, val, test, recipe=recipe, frozen=tuple(frozen[:2]), frozen_test=frozen[2])
    assert plain.best_epoch == shared.best_epoch == 0
    assert shared.test_acc == pytest.approx(plain.test_acc, abs=0.01)  # bf16 forward vs the cached rows


def test_lp_ft_start_is_the_linear_columns_classifier(monkeypatch):
    """After ``linear``, fine-tuning starts from the probe the ``linear`` record came from: not fit a second
    time (a refit would fail here), epoch 0 of its validation curve is that record's validation accuracy."""
    import diffssl_plugin.eval.finetune as ft_module

    def refit(*args, **kwargs):
        raise AssertionError("the LP-FT start was fit again")

    monkeypatch.setattr(ft_module, "linear_probe", refit)
    cfg = EvalConfig(**SMALL, final_cs=(0.01, 0.1), knn_ks=(20,), extra={"finetune": {"epochs": 1, "batch_size": 50}})
    records = evaluate(timm.create_model("raw_pixels"), "raw", "raw", cfg, ("linear", "finetune"), progress=False)
    linear, ft = (next(r for r in records if r["protocol"]["name"] == n) for n in ("linear", "finetune"))
    assert ft["protocol"]["head_init"] == "linear probe (LP-FT): the linear column's classifier"
    assert ft["protocol"]["val_curve"][0] == linear["val_acc"]


def test_start_from_gives_the_probes_logits(splits):
    """The head started from a probe computes that probe's logits (BatchNorm's eps made up for in the weights),
    also for a constant feature (std floored)."""
    from diffssl_plugin.eval.finetune import Classifier
    from diffssl_plugin.eval.probes import linear_probe

    train, val, _ = splits
    f_train, f_val = (d.images.flatten(1).float() / 255 for d in (train, val))  # corner pixels: constant
    assert bool((f_train.std(0) == 0).any())
    probe = linear_probe(f_train, train.labels, f_val, val.labels, cs=(0.1,))
    model = Classifier(torch.nn.Identity(), Readout(), f_train.shape[1], 10).eval()
    model.start_from(probe)
    (w, b), (mean, std) = probe.weights, probe.standardisation
    expected = (f_val - mean) / std @ w + b
    got = model.head(model.norm(f_val))
    assert torch.allclose(got, expected, atol=1e-4)
    assert float((got.argmax(1) == val.labels).float().mean()) == pytest.approx(probe.val_acc)
