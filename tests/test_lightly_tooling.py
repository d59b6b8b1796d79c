"""Every learner is a lightly-style LightningModule: a bare ``pl.Trainer().fit`` on lightly's batches
``(views, targets, filenames)`` from a ``LightlyDataset`` trains it (with its own gradient clipping) and reports
its online linear and kNN top-1, and lightly's ``LinearClassifier``, ``KNNClassifier`` and
``FinetuneClassifier`` run on its backbone (tiny settings, real Fashion-MNIST images, CPU)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_UNET
from lightly.data import LightlyDataset
from lightly.utils.benchmarking import FinetuneClassifier, KNNClassifier, LinearClassifier
from torch.utils.data import DataLoader, Dataset

from diffssl_plugin.data import load_split
from diffssl_plugin.methods import get_method

UNET28 = {**TINY_UNET, "sample_size": 28, "add_attention": False, "dropout": 0.1}
TINY = {
    "simclr": {"backbone_args": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}},
    "mae": {"backbone_args": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "decoder_dim": 32, "decoder_depth": 1},
    "ddae": {"unet_config": UNET28, "warmup_steps": 1},
    "drl": {
        "encoder_config": {"in_chans": 1, "image_size": 28, "channels": (8, 16, 32), "norm_num_groups": 8},
        "unet_config": {k: v for k, v in UNET28.items() if k != "dropout"},
        "code_dim": 8,
        "warmup_steps": 1,
    },
    "mdsm": {"width": 4},
}
TINY["vdrl"] = TINY["drl"]
METHODS = ["simclr", "mae", "ddae", "drl", "vdrl", "mdsm"]


class _Images(Dataset):
    """(uint8 image tensor, label) pairs, with a torchvision-style ``transform`` attribute (which
    ``LightlyDataset.from_torch_dataset`` sets)."""

    transform = None

    def __init__(self, n: int, offset: int = 0):
        data = load_split("fashion_mnist", "trainval").balanced_subset(total=100, seed=0)
        self.images, self.labels = data.images[offset : offset + n], data.labels[offset : offset + n]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def _loader(transform, n: int = 16, offset: int = 0, shuffle: bool = False) -> DataLoader:
    dataset = LightlyDataset.from_torch_dataset(_Images(n, offset), transform=transform)
    return DataLoader(dataset, batch_size=8, shuffle=shuffle, drop_last=True)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _learner(name: str, **kw):
    return get_method(name)["model"](batch_size_per_device=8, num_classes=10, in_chans=1, **TINY[name], **kw)


@pytest.mark.parametrize("name", METHODS)
def test_bare_trainer_fits_on_lightly_batches_with_online_eval(name, monkeypatch):
    entry = get_method(name)
    model = _learner(name, knn_k=3, knn_t=0.1)
    clips = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, v, *a, **k: clips.append(v) or clip(p, v, *a, **k))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = _trainer(max_steps=2)
    val = [_loader(entry["val_transform"]), _loader(entry["val_transform"], offset=16)]  # kNN bank, queries
    trainer.fit(model, _loader(entry["image_transform"], shuffle=True), val)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 and torch.isfinite(metrics["train_loss"])
    assert {"train_online_cls_top1", "val_online_cls_top1", "val_knn_top1"} <= set(metrics)
    assert 0.0 <= float(metrics["val_knn_top1"]) <= 1.0
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{name}: training left the backbone unchanged"
    assert clips == ([model.gradient_clip_val] * 2 if model.gradient_clip_val else []), clips  # its own clipping


@pytest.mark.parametrize("name", METHODS)
def test_lightly_classifiers_run_on_every_backbone(name):
    entry = get_method(name)
    learner = _learner(name)
    dim = learner.online_classifier.feature_dim
    train, val = _loader(entry["val_transform"]), _loader(entry["val_transform"], offset=16)

    linear = LinearClassifier(learner, batch_size_per_device=8, feature_dim=dim, num_classes=10, topk=(1,))
    _trainer(max_steps=1, limit_val_batches=1).fit(linear, train, val)
    assert "val_top1" in _trainer(limit_val_batches=1).validate(linear, val)[0]

    knn = KNNClassifier(learner, num_classes=10, knn_k=3, knn_t=0.1, train_dataloader_idx=0, val_dataloader_idx=1)
    knn_metrics = {k: v for d in _trainer().validate(knn, [train, val]) for k, v in d.items()}
    assert any(k.startswith("val_knn_top1") for k in knn_metrics), knn_metrics

    features = {k: v.clone() for k, v in learner.feature_backbone.state_dict().items()}
    tuned = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    finetune = FinetuneClassifier(learner.backbone, batch_size_per_device=8, feature_dim=dim, num_classes=10, topk=(1,))
    _trainer(max_steps=2, limit_val_batches=1).fit(finetune, train, val)
    changed = [k for k, v in learner.backbone.state_dict().items() if not torch.equal(v, tuned[k])]
    assert changed, f"{name}: fine-tuning did not change the backbone"
    if learner.feature_backbone is not learner.backbone:  # the EMA copy (features) is not fine-tuned
        assert all(torch.equal(v, features[k]) for k, v in learner.feature_backbone.state_dict().items())
