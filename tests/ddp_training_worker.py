"""Trains with :func:`diffssl_plugin.supervised.fit` under ``--devices N`` CPU processes (gloo) and writes what
rank 0 reached: run as a file (Lightning's launcher re-runs ``sys.argv`` for the other ranks).

``python tests/ddp_training_worker.py OUT_DIR DEVICES`` writes ``OUT_DIR/result.json`` (scores, losses, the world
size each part saw) and ``OUT_DIR/weights.pt`` (the trained tensors). Three parts, on real images:

* an attention head on Fashion-MNIST maps (AdamW, warm-up + cosine, validation every epoch);
* LP-FT fine-tuning of a tiny CIFAR-stem ResNet (every weight; fp32, so only the reduction order differs);
* a 1×1-conv pixel classifier on scenes through ``fit`` itself: a loss given as (sum, count) over pixels with
  some ignored, and global batches of 7 scenes (parts of 4 and 3 rows, the last batch 2 rows); each rank's
  first random draw while training, and one after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def main(out_dir: str, devices: int) -> None:
    import timm

    from diffssl_plugin import runtime
    from diffssl_plugin.data import load_segmentation, load_split
    from diffssl_plugin.eval import EvalConfig
    from diffssl_plugin.eval.finetune import FinetuneRecipe, finetune
    from diffssl_plugin.eval.harness import load_eval_splits
    from diffssl_plugin.heads import AttentionHead, HeadTraining, accuracy, tensor_rows, train_head
    from diffssl_plugin.supervised import fit, shuffled_batches

    torch.set_num_threads(1)
    rt = runtime.Runtime(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
    with runtime.use(rt):
        result, weights = {"world_size": rt.world_size}, {}

        data = load_split("fashion_mnist", "test", download=False)
        x, y = data.images[:520].float().div(255), data.labels[:520]
        torch.manual_seed(0)
        head = AttentionHead((1, 28, 28), 10, dim=16, pool_size=7, depth=1, num_heads=4, mlp_ratio=2.0)
        rows = [tensor_rows(x[s], y[s]) for s in (slice(0, 320), slice(320, 420), slice(420, 520))]
        res = train_head(head, rows[0], rows[1], HeadTraining(epochs=3, batch_size=64, lr=1e-2, warmup_epochs=0.5))
        result["attention"] = {
            "val_acc": res.val_acc,
            "test_acc": accuracy(head, rows[2]),
            "best_epoch": res.best_epoch,
            "loss": [h["loss"] for h in res.history],
            "images_seen": res.images_seen,
        }
        weights.update({f"attention.{k}": v for k, v in head.state_dict().items()})

        splits = load_eval_splits(EvalConfig(train_images=200, val_images=100, test_images=100))
        torch.manual_seed(0)
        cnn = timm.create_model("simclr_resnet18_cifar", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
        ft = finetune(
            cnn, *splits, recipe=FinetuneRecipe(epochs=2, batch_size=40, probe_cs=(0.1,), amp=False, select_best=False)
        )
        result["finetune"] = {"val_acc": ft.val_acc, "test_acc": ft.test_acc, "val_curve": ft.val_curve}
        weights.update({f"finetune.{k}": v for k, v in ft.model.state_dict().items()})

        scenes = load_segmentation("fashion_scenes", "train", num_images=30)
        masks = scenes.masks.long()
        masks[scenes.images[:, 0] < 8] = scenes.ignore_index  # the darkest pixels do not count
        images = scenes.images.float().div(255)
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(1, scenes.num_classes, 1)

        first_draws = []

        def loss(m, batch):
            first_draws.append(float(torch.rand(())))  # the stream a model's own draws (noise, dropout) use
            f, t = batch
            total = F.cross_entropy(m(f), t, ignore_index=scenes.ignore_index, reduction="sum")
            return total, (t != scenes.ignore_index).sum()

        opt = torch.optim.SGD(conv.parameters(), lr=0.5)
        fitted = fit(
            conv,
            shuffled_batches(30, 7, torch.Generator().manual_seed(0), drop_last=False),
            lambda idx: (images[idx], masks[idx]),
            loss,
            opt,
            epochs=2,
            check_loss=False,
        )
        result["pixels"] = {"loss": [h["loss"] for h in fitted.history], "steps": fitted.steps}
        weights.update({f"pixels.{k}": v for k, v in conv.state_dict().items()})
        n = rt.world_size  # each rank's first draw while training, and a draw after it
        result["draws"] = {
            "training": rt.gather_shards(torch.tensor([first_draws[:1]]), n).flatten().tolist(),
            "after": rt.gather_shards(torch.rand(1, 1), n).flatten().tolist(),
        }

        if rt.is_global_zero:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "result.json").write_text(json.dumps(result, indent=1))
            torch.save(weights, Path(out_dir) / "weights.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
