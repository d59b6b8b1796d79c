"""The ``semisup`` protocol: few labels. A class-balanced fraction of the pretraining dataset's labels (default
1% and 10%), drawn with several seeds (default 3) and written as split files, then

* ``linear``: the linear probe (:func:`linear_probe`: L2-regularised multinomial logistic regression, C chosen on
  the validation split) on frozen features of the labelled images at the readout the ``linear`` sweep chose;
* ``ft``: fine-tuning the whole backbone on the labelled images with the shared recipe of
  :func:`~diffssl_plugin.eval.finetune.finetune` (LP-FT start, best validation epoch).

SimCLR, BYOL and the DRL paper (``papers.md`` §1.6; DRL pretrains LaplaceNet's classifier) report 1% / 10% label
fractions with fixed subsets; this protocol keeps that shape without DRL's pseudo-labelling of the unlabelled
images (LaplaceNet itself is out of scope: the label-efficiency of the *representation* is measured here).

Choices the sources leave open, fixed here:

* the fraction is of the dataset's full ``train`` split (the training images minus the validation split the
  harness selects on), e.g. 1% of Fashion-MNIST = 540 labels; every class gets
  ``round(fraction · N / classes)`` images (fewer if a class has fewer);
* the subsets of different fractions and seeds are drawn independently (seed ``s`` fixes every subset);
* validation (choice of C, of the fine-tuning epoch) uses the harness's validation subset and the score is on
  its test split, the same images as the ``linear`` column, so the columns compare;
* split files (JSON: source indices = positions in ``load_split(dataset, "trainval")``) are written to
  ``<split_dir>`` (default ``<out_dir>/splits``, else ``<cache_dir>/splits``; with neither, no files) and read
  back when present, so a rerun, another machine or another torch version scores the same images;
* records: one per seed on split ``"test_seed"`` (its test accuracy, seed, C, split file hash) and one summary
  per (fraction, sub-protocol) on split ``"test"`` with ``value`` = mean and ``std`` = sample standard deviation
  over seeds (``None`` for one seed); columns are ``semisup<percent>_linear`` and ``semisup<percent>_ft``.

Settings (``EvalConfig.extra["semisup"]``, see :class:`SemisupSettings`), e.g. a short run::

    extra={"semisup": {"fractions": [0.01, 0.1], "ft_fractions": [0.01], "finetune": {"epochs": 1}}}
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from ..data import ImageSet, load_split, stratified_pick
from ..errors import InputError, check_name
from ..io import file_sha256, write_json
from .finetune import FinetuneRecipe, finetune
from .harness import EvalContext, register_protocol
from .probes import linear_probe

SUBPROTOCOLS = ("linear", "ft")
POOLS = ("train", "eval_train")
SPLIT_FORMAT = "diffssl-semisup-split/1"


@dataclass(frozen=True)
class SemisupSettings:
    """What ``semisup`` runs. Every field is written into the records."""

    fractions: tuple[float, ...] = (0.01, 0.1)  # of the full train split, each in (0, 1]
    seeds: tuple[int, ...] = (0, 1, 2)
    protocols: tuple[str, ...] = SUBPROTOCOLS
    ft_fractions: tuple[float, ...] | None = None  # fractions the ``ft`` sub-protocol runs on (None: all)
    finetune: dict = field(default_factory=dict)  # FinetuneRecipe overrides (not ``seed``/``train_images``)
    ft_val_images: int | None = None  # class-balanced part of the validation subset fine-tuning selects on
    ft_test_images: int | None = None  # class-balanced part of the test split the fine-tuned copies are scored on
    cs: tuple[float, ...] | None = None  # C grid of the probes (None: ``EvalConfig.final_cs``)
    #: where the labels are drawn: ``train`` (the full train split; only the drawn images' features are
    #: extracted) or ``eval_train`` (the harness's class-balanced train subset, whose features the ``linear``
    #: protocol already cached: no extraction, but subsets of different seeds overlap more, so the spread over
    #: seeds is smaller than with ``train``; for short benches)
    pool: str = "train"
    split_dir: str | None = None

    @classmethod
    def from_dict(cls, given: dict | None) -> SemisupSettings:
        """Defaults with ``given`` applied; unknown names or values raise :class:`InputError`/``UnknownNameError``."""
        given = dict(given or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise InputError(f"unknown semisup settings {unknown}; valid: {sorted(names)}")
        for key in ("fractions", "seeds", "protocols", "ft_fractions", "cs"):
            if given.get(key) is not None:
                value = given[key]
                given[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        s = cls(**given)
        if not s.fractions:
            raise InputError("semisup needs at least one label fraction")
        for f in (*s.fractions, *(s.ft_fractions or ())):
            if not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                raise InputError(f"label fractions must lie in (0, 1], got {f!r}")
        if s.ft_fractions and not set(s.ft_fractions) <= set(s.fractions):
            raise InputError(f"ft_fractions {list(s.ft_fractions)} must be among fractions {list(s.fractions)}")
        if not s.seeds or len(set(s.seeds)) != len(s.seeds):
            raise InputError(f"semisup needs one or more distinct seeds, got {list(s.seeds)}")
        for p in s.protocols:
            check_name("semisup sub-protocol", p, SUBPROTOCOLS)
        check_name("semisup pool", s.pool, POOLS)
        bad = sorted({"seed", "train_images"} & set(s.finetune))
        if bad:
            raise InputError(
                f"semisup finetune settings {bad} are fixed by the protocol (the split seed and the labelled subset)"
            )
        FinetuneRecipe.from_dict(s.finetune)  # unknown recipe names fail now, not after minutes of work
        return s


def fraction_label(fraction: float) -> str:
    """The percentage as it appears in column and file names: 0.01 → ``"1"``, 0.1 → ``"10"``, 0.005 → ``"0.5"``."""
    return f"{100 * fraction:g}"


def per_class_count(fraction: float, full_size: int, num_classes: int) -> int:
    """Images per class for ``fraction`` of a split of ``full_size`` images (at least one)."""
    return max(1, round(fraction * full_size / num_classes))


def positions_of(indices: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Positions in ``indices`` (unique source indices) of each of ``wanted``; :class:`InputError` if one is absent."""
    order = indices.argsort()
    ordered = indices[order]
    loc = torch.searchsorted(ordered, wanted).clamp_max(len(ordered) - 1)
    found = ordered[loc] == wanted
    if not bool(found.all()):
        raise InputError(
            f"{int((~found).sum())} of {len(wanted)} indices are not in the pool, e.g. {wanted[~found][:5].tolist()}"
        )
    return order[loc]


def split_path(split_dir: str | Path, dataset: str, pool_tag: str, fraction: float, seed: int) -> Path:
    return Path(split_dir) / f"{dataset}-{pool_tag}-{fraction_label(fraction)}pct-seed{seed}.json"


def read_split_file(path: Path, dataset: str, fraction: float, seed: int) -> torch.Tensor:
    """Source indices stored in a split file, after checking that it is the file for (dataset, fraction, seed)."""
    try:
        meta = json.loads(path.read_text())
        indices = torch.tensor(meta["indices"], dtype=torch.long)
        stored = (meta["format"], meta["dataset"], float(meta["fraction"]), int(meta["seed"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"split file {path} is unreadable ({e}); delete it to draw the subset again") from e
    if stored[0] != SPLIT_FORMAT or stored[1] != dataset or abs(stored[2] - fraction) > 1e-12 or stored[3] != seed:
        raise InputError(f"split file {path} holds {stored[1:]}, expected {(dataset, fraction, seed)}")
    return indices


def labelled_subset(
    pool: ImageSet,
    fraction: float,
    seed: int,
    full_size: int | None = None,
    split_dir: str | Path | None = None,
    pool_tag: str = "train",
) -> tuple[ImageSet, Path | None]:
    """The class-balanced labelled subset of ``pool`` for ``fraction`` (of ``full_size`` images, default the
    pool's size) and ``seed``: read from its split file in ``split_dir`` if present, else drawn with
    :func:`stratified_pick` and written there. Returns the subset and the file (None without ``split_dir``)."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"label fractions must lie in (0, 1], got {fraction!r}")
    if pool.indices is None:
        raise InputError(f"{pool.name}/{pool.split} carries no source indices; load it with load_split")
    path = split_path(split_dir, pool.name, pool_tag, fraction, seed) if split_dir is not None else None
    if path is not None and path.is_file():
        return pool.take(positions_of(pool.indices, read_split_file(path, pool.name, fraction, seed))), path
    per_class = per_class_count(fraction, full_size or len(pool), pool.num_classes)
    subset = pool.take(stratified_pick(pool.labels, per_class, seed))
    if path is not None:
        counts = torch.bincount(subset.labels, minlength=pool.num_classes).tolist()
        write_json(
            path,
            {
                "format": SPLIT_FORMAT,
                "dataset": pool.name,
                "pool": pool_tag,
                "fraction": fraction,
                "seed": seed,
                "per_class": per_class,
                "num_images": len(subset),
                "class_counts": dict(zip(pool.class_names, counts)),
                "indices_are": "positions in load_split(dataset, 'trainval')",
                "indices": subset.indices.tolist(),
            },
        )
    return subset, path


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _capped(data: ImageSet, total: int | None, seed: int) -> torch.Tensor:
    """Positions of a class-balanced part of ``data`` (all of it when ``total`` is None or not smaller)."""
    if total is None or total >= len(data):
        return torch.arange(len(data))
    return stratified_pick(data.labels, max(1, total // data.num_classes), seed)


@register_protocol("semisup")
def semisup_protocol(ctx: EvalContext) -> list[dict]:
    """Linear probe and fine-tuning on class-balanced label fractions, several seeds, mean ± std."""
    s = SemisupSettings.from_dict(ctx.config.extra.get("semisup"))
    config = ctx.config
    cs = tuple(s.cs or config.final_cs)
    eval_train, val, test = ctx.splits()
    readout = ctx.readout()
    full = load_split(config.dataset, "train", root=config.data_root)
    if s.pool == "train":
        pool, tag = full, "train"
    else:
        pool, tag = eval_train, f"evaltrain{len(eval_train)}-seed{config.seed}"
    split_dir = s.split_dir or next((Path(d) / "splits" for d in (ctx.out_dir, ctx.cache_dir) if d), None)
    with ctx.runtime.rank_zero_first():  # rank 0 writes the split files the other ranks then read
        subsets = {
            (f, seed): labelled_subset(pool, f, seed, len(full), split_dir, tag)
            for f in s.fractions
            for seed in s.seeds
        }

    # frozen features of the labelled images only: the pool's if the linear protocol cached them, else the union
    if s.pool == "eval_train":
        bank = pool
    else:
        bank = full.take(positions_of(full.indices, torch.unique(torch.cat([d.indices for d, _ in subsets.values()]))))
    f_bank = ctx.features(bank, [readout])[readout]
    f_val, f_test = (ctx.features(d, [readout])[readout] for d in (val, test))

    def feats(data: ImageSet) -> torch.Tensor:
        return f_bank[positions_of(bank.indices, data.indices)]

    common = {"pool": s.pool, "pool_images": len(pool), "seeds": list(s.seeds), "settings": asdict(s)}
    # the linear column's probe at this readout: where each fraction's probes start (its path, its eigenbasis)
    start = ctx.final_probe if ctx.best_readout == readout else None
    records = []
    for fraction in s.fractions:
        label = fraction_label(fraction)
        runs = [p for p in s.protocols if p == "linear" or fraction in (s.ft_fractions or s.fractions)]
        for sub in runs:
            name = f"semisup{label}_{sub}"
            values, val_accs = [], []
            for seed in s.seeds:
                data, path = subsets[(fraction, seed)]
                if sub == "linear":
                    res = ctx.once(
                        linear_probe,
                        feats(data),
                        data.labels,
                        f_val,
                        val.labels,
                        f_test,
                        test.labels,
                        cs=cs,
                        seed=seed,
                        device=ctx.device,
                        start=start,
                    )
                    params, test_acc, val_acc, test_images = res.params, res.test_acc, res.val_acc, len(test)
                else:
                    recipe = FinetuneRecipe.from_dict({**s.finetune, "seed": seed})
                    recipe = replace(recipe, probe_cs=tuple(recipe.probe_cs or cs))
                    val_pos = _capped(val, s.ft_val_images, seed)
                    test_pos = _capped(test, s.ft_test_images, seed)
                    ft_test = test.take(test_pos)
                    res = finetune(
                        ctx.model,
                        data,
                        val.take(val_pos),
                        ft_test,
                        readout,
                        recipe,
                        device=ctx.device,
                        progress=ctx.progress,
                        frozen=(feats(data), f_val[val_pos]),
                        frozen_test=f_test[test_pos],
                    )
                    params = {
                        **asdict(recipe),
                        "best_epoch": res.best_epoch,
                        "val_curve": res.val_curve,
                        "val_images": len(val_pos),
                    }
                    test_acc, val_acc, test_images = res.test_acc, res.val_acc, len(ft_test)
                values.append(test_acc)
                val_accs.append(val_acc)
                records.append(
                    ctx.record(
                        split="test_seed",
                        value=test_acc,
                        val_acc=val_acc,
                        readout=readout,
                        subset_seed=seed,
                        labelled_images=len(data),
                        test_images=test_images,
                        split_file=str(path) if path else None,
                        split_sha256=file_sha256(path) if path else None,
                        protocol={
                            "name": name,
                            "subprotocol": sub,
                            "fraction": fraction,
                            "seed": seed,
                            **common,
                            **params,
                        },
                    )
                )
            mean, std = _mean_std(values)
            records.append(
                ctx.record(
                    split="test",
                    value=mean,
                    std=std,
                    val_acc=statistics.fmean(val_accs),
                    readout=readout,
                    per_seed=values,
                    labelled_images=[len(subsets[(fraction, seed)][0]) for seed in s.seeds],
                    protocol={
                        "name": name,
                        "subprotocol": sub,
                        "fraction": fraction,
                        **common,
                        "aggregate": "mean and sample std of the per-seed test accuracies",
                    },
                )
            )
    return records
