"""The harness: feature caching, probes, protocols, records and leaderboards, on real data and any backbone."""

from __future__ import annotations

import contextlib
import json

import pytest
import timm
import torch
from torch import nn

import diffssl_plugin  # noqa: F401
from diffssl_plugin.data import load_split
from diffssl_plugin.errors import UnknownNameError
from diffssl_plugin.eval import (
    EvalConfig,
    Readout,
    evaluate,
    extract_features,
    knn_accuracy,
    linear_probe,
    read_records,
    render_markdown,
    write_leaderboard,
    write_records,
)
from diffssl_plugin.eval.features import OUTPUT, FeatureCache, model_fingerprint
from diffssl_plugin.eval.leaderboard import leaderboard_rows

SMALL = EvalConfig(
    train_images=200,
    val_images=100,
    test_images=200,
    timesteps=(0, 10),
    blocks=("mid", "up0"),
    pools=("avg",),
    final_cs=(0.1, 1.0),
    knn_ks=(20,),
)


@pytest.fixture
def tiny_fmnist_backbone():
    """A tiny untrained 28×28 grey DDAE backbone (3 levels, like the fmnist_small preset but narrow)."""
    from diffssl_plugin.backbones import DDAEBackbone

    torch.manual_seed(0)
    cfg = {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (8, 16, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D",) * 3,
        "up_block_types": ("UpBlock2D",) * 3,
        "norm_num_groups": 8,
    }
    return DDAEBackbone(unet_config=cfg, timestep=10, block="mid", pool="avg")


@pytest.fixture(scope="module")
def fmnist_small():
    return load_split("fashion_mnist", "train").balanced_subset(total=64, seed=1)


def _count_forwards(model):
    calls = []
    handle = (
        model.register_forward_pre_hook(lambda m, a: calls.append(1))
        if not hasattr(model, "unet")
        else model.unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append(1))
    )
    return calls, handle


def test_features_are_cached_and_not_recomputed(tmp_path, tiny_fmnist_backbone, fmnist_small):
    readouts = [Readout(0, "mid", "avg"), Readout(10, "mid", "avg2x2"), Readout(10, "up0", "avg")]
    calls, handle = _count_forwards(tiny_fmnist_backbone)
    first = extract_features(
        tiny_fmnist_backbone, fmnist_small, readouts, batch_size=32, cache_dir=tmp_path, progress=False
    )
    n_batches = 2
    assert len(calls) == n_batches * 2  # one U-Net forward per (batch, timestep), all blocks at once
    again = extract_features(
        tiny_fmnist_backbone, fmnist_small, readouts, batch_size=32, cache_dir=tmp_path, progress=False
    )
    assert len(calls) == n_batches * 2  # nothing recomputed
    handle.remove()
    for r in readouts:
        torch.testing.assert_close(first[r], again[r])
    assert first[readouts[1]].shape == (len(fmnist_small), 4 * first[readouts[0]].shape[1])
    assert not list(tmp_path.rglob("*.tmp"))


def test_extraction_batch_follows_the_device_and_does_not_change_features(tiny_fmnist_backbone):
    from diffssl_plugin.runtime import inference_batch_size

    assert inference_batch_size("cpu") == 64 and inference_batch_size("cuda:0") == 256
    assert inference_batch_size("cpu", 200) == 200  # an explicit batch is honoured
    data = load_split("fashion_mnist", "train").balanced_subset(total=150, seed=2)
    r = Readout(10, "mid", "avg2x2")
    calls, handle = _count_forwards(tiny_fmnist_backbone)
    by_default = extract_features(tiny_fmnist_backbone, data, [r], progress=False)[r]
    assert len(calls) == 3  # 150 images in CPU batches of 64
    whole = extract_features(tiny_fmnist_backbone, data, [r], batch_size=150, progress=False)[r]
    handle.remove()
    torch.testing.assert_close(by_default, whole, rtol=1e-4, atol=1e-5)  # per-image noise: batching changes nothing


def test_damaged_cache_entry_is_recomputed(tmp_path, tiny_fmnist_backbone, fmnist_small):
    r = Readout(0, "mid", "avg")
    good = extract_features(tiny_fmnist_backbone, fmnist_small, [r], cache_dir=tmp_path, progress=False)[r]
    cache = FeatureCache(tmp_path)
    path = cache.path(model_fingerprint(tiny_fmnist_backbone), fmnist_small, r)
    path.write_bytes(path.read_bytes()[:40])  # a truncated file, as after a crash mid-write
    again = extract_features(tiny_fmnist_backbone, fmnist_small, [r], cache_dir=tmp_path, progress=False)[r]
    torch.testing.assert_close(good, again)


def test_cache_key_changes_with_weights(tmp_path, tiny_fmnist_backbone):
    h = model_fingerprint(tiny_fmnist_backbone)
    with torch.no_grad():
        next(tiny_fmnist_backbone.parameters()).add_(1.0)
    assert model_fingerprint(tiny_fmnist_backbone) != h


def test_linear_probe_chooses_c_on_validation_and_scores_test():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=gen)
    res = linear_probe(x[:150], y[:150], x[150:225], y[150:225], x[225:], y[225:], cs=(1e-4, 1.0))
    assert res.test_acc > 0.95 and res.val_acc > 0.95
    assert res.params["C"] in (1e-4, 1.0)
    noise = linear_probe(
        torch.randn(150, 16, generator=gen), y[:150], torch.randn(75, 16, generator=gen), y[150:225], cs=(1.0,)
    )
    assert noise.val_acc < 0.6 and noise.test_acc is None


def test_knn_accuracy_on_clusters_and_labels_matter():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.nn.functional.one_hot(y, 4).float() * 5 + 0.1 * torch.randn(200, 4, generator=gen)
    assert knn_accuracy(x[:100], y[:100], x[100:], y[100:], k=20, t=0.1) == 1.0
    assert knn_accuracy(x[:100], y[:100].roll(1), x[100:], y[100:], k=20, t=0.1) < 0.1


def test_knn_resolves_features_that_share_one_large_direction():
    """Clusters riding on a shared offset 10,000 times their signal, in 64 dimensions (as MDSM's energy features
    do): the cosines differ below float32's resolution, yet the neighbours are still the right ones."""
    from lightly.utils.benchmarking import knn_predict

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    signal = torch.nn.functional.one_hot(y, 64).float() * 0.1 + 0.01 * torch.randn(200, 64, generator=gen)
    x = (1000.0 + signal).float()
    bank, query = (torch.nn.functional.normalize(t, dim=1) for t in (x[:100], x[100:]))
    in_float32 = knn_predict(query, bank.t().contiguous(), y[:100], 4, knn_k=20, knn_t=0.1)[:, 0]
    assert (in_float32 == y[100:]).float().mean() < 0.6  # float32 cosines cannot tell the clusters apart
    assert knn_accuracy(x[:100], y[:100], x[100:], y[100:], k=20, t=0.1) == 1.0
    # the learners' online kNN monitor (lightly's layout) builds its bank at the same precision
    from diffssl_plugin.methods.lightly_api import FeatureBank

    monitor = FeatureBank()
    monitor.add(x[:100], y[:100])
    bank, labels = monitor.bank(lambda t: t)
    query = torch.nn.functional.normalize(x[100:].to(bank.dtype), dim=1)
    assert (knn_predict(query, bank, labels, 4, knn_k=20, knn_t=0.1)[:, 0] == y[100:]).all()


def test_evaluate_raw_pixels_records_carry_the_protocol(tmp_path):
    model = timm.create_model("raw_pixels")
    records = evaluate(
        model, "raw_pixels", "raw_pixels", SMALL, budget={"steps": 0}, cache_dir=tmp_path, progress=False
    )
    names = [r["protocol"]["name"] for r in records]
    assert names == ["linear", "knn20"]
    lin = records[0]
    assert lin["split"] == "test" and 0.5 < lin["value"] <= 1.0  # well above chance (0.1) on Fashion-MNIST
    assert lin["protocol"]["C"] in SMALL.final_cs and lin["images"] == {"train": 200, "val": 100, "test": 200}
    assert lin["versions"]["torch"] and lin["machine"]["cpu_count"] and lin["budget"] == {"steps": 0}
    assert records[1]["protocol"]["k"] == 20 and records[1]["protocol"]["T"] == 0.1


def test_evaluate_sweeps_blocks_and_timesteps_and_draws_heatmap(tmp_path, tiny_fmnist_backbone):
    records = evaluate(
        tiny_fmnist_backbone, "ddae", "tiny", SMALL, cache_dir=tmp_path / "c", out_dir=tmp_path, progress=False
    )
    sweep = [r for r in records if r["protocol"]["name"] == "sweep_linear"]
    assert len(sweep) == 4 and all(r["split"] == "val" for r in sweep)
    best = max(sweep, key=lambda r: r["value"])
    final = next(r for r in records if r["protocol"]["name"] == "linear")
    assert final["readout"] == best["readout"]  # chosen on validation
    assert (tmp_path / "sweep_tiny.png").stat().st_size > 1000


def test_any_timm_or_lightly_style_backbone_works(tmp_path):
    timm_model = timm.create_model("resnet18", in_chans=1, num_classes=0, pretrained=False)
    lightly_style = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    config = EvalConfig(train_images=100, val_images=50, test_images=100, final_cs=(1.0,), knn_ks=(20,))
    accuracy = {}
    for name, model in (("resnet18", timm_model), ("conv", lightly_style)):
        recs = evaluate(model, name, name, config, progress=False)
        assert [r["protocol"]["name"] for r in recs] == ["linear", "knn20"]
        accuracy[name] = recs[0]["value"]
    assert 0.0 <= accuracy["resnet18"] <= 1.0  # untrained and deep: only the plumbing is checked
    assert accuracy["conv"] > 0.3  # random conv features of real images beat chance (0.1)


def test_unknown_protocol_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="linear"):
        evaluate(timm.create_model("raw_pixels"), "x", "x", SMALL, protocols=("segmentation-v9",), progress=False)


def test_leaderboard_from_records(tmp_path):
    base = {"dataset": "fashion_mnist", "split": "test", "readout": {}, "budget": {}}
    records = [
        {**base, "method": "a", "backbone": "A", "protocol": {"name": "linear"}, "value": 0.8},
        {**base, "method": "a", "backbone": "A", "protocol": {"name": "semisup_1pct"}, "value": 0.5, "std": 0.02},
        {
            **base,
            "method": "b",
            "backbone": "B",
            "protocol": {"name": "linear"},
            "value": 0.9,
            "readout": {"block": "mid", "timestep": 10, "pool": "avg"},
            "budget": {"steps": 5, "wall_seconds": 60},
        },
        {**base, "method": "b", "backbone": "B", "protocol": {"name": "sweep_linear"}, "value": 0.99, "split": "val"},
    ]
    rows = leaderboard_rows(records)
    assert [r["method"] for r in rows] == ["b", "a"]  # sorted by linear accuracy
    md = render_markdown(rows)
    assert "50.0 ± 2.0" in md and "90.0" in md and "mid @ t=10 (avg)" in md and "99.0" not in md
    write_records(tmp_path / "records.jsonl", records)
    assert read_records(tmp_path / "records.jsonl") == json.loads(json.dumps(records))
    write_leaderboard(records, tmp_path)
    csv_text = (tmp_path / "leaderboard.csv").read_text()
    assert csv_text.splitlines()[0].startswith("method,backbone,dataset,linear")
    with pytest.raises(FileNotFoundError, match="diffssl"):
        read_records(tmp_path / "missing.jsonl")


def test_backbones_without_diffusion_blocks_sweep_their_own_grid(tmp_path):
    """A ViT sweeps its pooled output and patch-token maps of three blocks; a time-dependent DRL encoder sweeps
    its concatenated codes and the code at single times t. The heatmap leaves the pooled output to its title."""
    vit = timm.create_model("mae_vit_tiny_p4", in_chans=1, num_classes=0)
    drl = timm.create_model("drl_time_encoder_fmnist", num_classes=0)
    config = EvalConfig(
        train_images=100, val_images=50, test_images=50, final_cs=(1.0,), knn_ks=(20,), sweep_cs=(1.0,), pools=("avg",)
    )
    vit_readouts = config.readouts(vit)
    assert vit_readouts[0] == OUTPUT and {r.block for r in vit_readouts[1:]} == {"blocks.6", "blocks.9", "blocks.11"}
    drl_readouts = config.readouts(drl)
    assert drl_readouts[0] == OUTPUT and [r.timestep for r in drl_readouts[1:]] == [0, 100, 250, 500, 750, 1000]
    records = evaluate(drl, "drl", "drl_time", config, cache_dir=tmp_path / "c", out_dir=tmp_path, progress=False)
    assert len([r for r in records if r["protocol"]["name"] == "sweep_linear"]) == 7
    assert (tmp_path / "sweep_drl_time.png").stat().st_size > 1000


def test_sweep_rows_are_shared_and_choices_match_extracting_every_set_alone(tiny_fmnist_backbone):
    """The linear protocol reuses the sweep's rows inside the final subsets (only the other images run through
    the backbone), and its choices and scores equal the plain recipe: every subset extracted alone, one probe
    per readout, the best validation readout probed again on the whole subsets."""
    from dataclasses import replace

    from diffssl_plugin.eval import EvalContext
    from diffssl_plugin.eval.harness import linear_and_knn, load_eval_splits
    from diffssl_plugin.runtime import inference_batch_size

    model = tiny_fmnist_backbone
    config = replace(SMALL, sweep_train_images=100, sweep_val_images=50)
    ctx = EvalContext(model, "ddae", "tiny", config, progress=False)
    calls, handle = _count_forwards(model)
    records = linear_and_knn(ctx)
    handle.remove()
    train, val, test = load_eval_splits(config)
    s_train, s_val = train.balanced_subset(total=100, seed=0), val.balanced_subset(total=50, seed=0)
    readouts = config.readouts(model)
    timesteps = len(config.timesteps)
    batch = inference_batch_size("cpu", config.batch_size)
    batches = sum(-(-len(d) // batch) for d in (s_train, s_val))
    rest = sum(-(-n // batch) for n in (len(train) - 100, len(val) - 50, len(test)))
    assert len(calls) == timesteps * batches + rest  # one forward per (batch, timestep); sweep images not again

    def alone(data, rs):
        return extract_features(model, data, rs, batch_size=config.batch_size, progress=False)

    f_s_train, f_s_val = alone(s_train, readouts), alone(s_val, readouts)
    sweep = {
        r: linear_probe(f_s_train[r], s_train.labels, f_s_val[r], s_val.labels, cs=config.sweep_cs).val_acc
        for r in readouts
    }
    best = max(readouts, key=lambda r: (sweep[r], -readouts.index(r)))
    assert ctx.best_readout == best
    got = {Readout(**r["readout"]): r["value"] for r in records if r["protocol"]["name"] == "sweep_linear"}
    assert got == pytest.approx(sweep, abs=1e-6)
    f = {name: alone(d, [best])[best] for name, d in (("train", train), ("val", val), ("test", test))}
    for name, d in (("train", train), ("val", val), ("test", test)):
        torch.testing.assert_close(ctx.features(d, [best])[best], f[name], atol=1e-5, rtol=1e-4)
    lin = linear_probe(f["train"], train.labels, f["val"], val.labels, f["test"], test.labels, cs=config.final_cs)
    final = next(r for r in records if r["protocol"]["name"] == "linear")
    assert (final["value"], final["protocol"]["C"]) == (pytest.approx(lin.test_acc, abs=1e-6), lin.params["C"])


@pytest.mark.parametrize("per_feature", [False, True])
def test_analytic_logistic_gradient_is_autograd_s(per_feature):
    """The closure's hand-written gradient, for one penalty weight and for one per feature (preconditioned)."""
    from diffssl_plugin.eval.probes import logistic_loss_closure

    x, y = torch.randn(120, 7), torch.randint(0, 4, (120,))
    w_t, b = torch.randn(4, 7), torch.randn(4)  # class-major weights
    lam = torch.rand(7) if per_feature else 0.05
    loss = logistic_loss_closure(x, y, w_t, b, lam)()
    w2, b2 = w_t.t().clone().requires_grad_(True), b.clone().requires_grad_(True)
    penalty = (torch.as_tensor(lam).expand(7)[:, None] * w2.pow(2)).sum()
    ref = nn.functional.cross_entropy(x @ w2 + b2, y) + penalty
    ref.backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(w_t.grad, w2.grad.t())
    torch.testing.assert_close(b.grad, b2.grad)


def test_semisup_columns_of_any_fraction_are_titled_by_percent():
    from diffssl_plugin.eval.leaderboard import column_title, columns

    assert column_title("semisup0.2_linear") == "0.2% linear" and column_title("semisup50_ft") == "50% fine-tune"
    assert column_title("semisup1_linear") == "1% linear" and column_title("custom_protocol") == "custom_protocol"
    rows = [{"values": {"linear": (0.8, None), "semisup0.2_ft": (0.5, None)}}]
    assert columns(rows) == [("linear", "linear"), ("semisup0.2_ft", "0.2% fine-tune")]


@contextlib.contextmanager
def counted_loss_evaluations():
    """A list that gains one entry per evaluation of the probes' L-BFGS loss while the block runs."""
    from diffssl_plugin.eval import probes

    calls, closure = [], probes.logistic_loss_closure

    def counted(*args):
        inner = closure(*args)
        return lambda: (calls.append(1), inner())[1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probes, "logistic_loss_closure", counted)
        yield calls


def test_torch_logistic_regression_finds_sklearns_solution():
    """The probe's solver (class-major L-BFGS in torch) minimises sklearn's objective ``C·Σ CE + ½‖W‖²``: the same
    objective value, weights and predictions as ``sklearn.linear_model.LogisticRegression``."""
    from sklearn.linear_model import LogisticRegression

    from diffssl_plugin.eval.probes import eigenbasis, fit_logistic_regression

    digits = load_split("digits", "train")
    x = digits.images[:400].flatten(1).double() / 255.0
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = digits.labels[:400]

    def objective(w, b):
        return 0.05 * nn.functional.cross_entropy(x @ w + b, y, reduction="sum") + 0.5 * w.pow(2).sum()

    ref = LogisticRegression(C=0.05, tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    ref_w, ref_b = torch.from_numpy(ref.coef_).t(), torch.from_numpy(ref.intercept_)
    # in the features' own coordinates, and preconditioned in their eigenbasis (the probe's default)
    for basis in (None, eigenbasis(x)):
        w, b = fit_logistic_regression(x, y, 0.05, 10, max_iter=1000, tol=1e-8, basis=basis)
        assert float(objective(w, b)) == pytest.approx(float(objective(ref_w, ref_b)), rel=1e-6)
        torch.testing.assert_close(w, ref_w, atol=2e-4, rtol=0)
        assert torch.equal((x @ w + b).argmax(1), torch.from_numpy(ref.predict(x.numpy())))


@pytest.mark.parametrize("images, dtype", [(1000, torch.float64), (300, torch.float32)])
def test_preconditioned_probe_reaches_the_minimum_where_plain_lbfgs_stops_short(images, dtype):
    """Features that share one dominant direction (as network features do: a 2.5-minute MAE's readout holds 65%
    of its variance in one) make plain L-BFGS stop at ``max_iter`` short of the minimum; in the features'
    eigenbasis it meets the tolerance in far fewer evaluations, at the minimum. Real Fashion-MNIST pixels plus
    one per-image factor shared by every pixel; with fewer images than features (the row-space basis, whose
    weak directions float32 cannot resolve but which the probe must keep) in float32."""
    from diffssl_plugin.eval import probes

    data = load_split("fashion_mnist", "train").balanced_subset(total=images, seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y = data.images.flatten(1).to(dtype) / 255.0, data.labels
    shared = 5 * torch.randn(len(x), 1, generator=gen, dtype=x.dtype)
    x = x + shared * (0.5 + torch.rand(1, x.shape[1], generator=gen, dtype=x.dtype))
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)

    def objective(w, b):  # the solver's per-sample-mean form, C = 1
        return float(nn.functional.cross_entropy(x @ w + b, y) + w.pow(2).sum() / (2 * len(x)))

    minimum = objective(*probes.fit_logistic_regression(x, y, 1.0, 10, max_iter=5000, tol=1e-8))
    result = {}
    for name, basis in (("plain", None), ("eigenbasis", probes.eigenbasis(x))):
        with counted_loss_evaluations() as calls:
            w, b = probes.fit_logistic_regression(x, y, 1.0, 10, max_iter=200, basis=basis)
        result[name] = (len(calls), (objective(w, b) - minimum) / minimum)
    if images > x.shape[1]:
        assert result["plain"][0] >= 200 and result["plain"][1] > 1e-3  # stopped by max_iter, 0.6% above
    assert result["eigenbasis"][0] < 100 and result["eigenbasis"][1] < 1e-4


def test_probe_started_from_an_earlier_probe_reaches_the_same_minimum_in_fewer_evaluations():
    """``linear_probe(start=...)`` (the final probe from the sweep's, a label fraction's from the linear column's):
    each C's fit starts from the earlier probe's solution, re-expressed for this subset's standardisation (same
    logits), in its shared eigenbasis; the objective is unchanged, so the solution, C and accuracies are the cold
    start's to the solver's tolerance, reached with fewer loss evaluations. Real Fashion-MNIST pixels plus a
    shared per-image factor (network-like conditioning); the later probe sees 90% of the earlier one's images."""
    from diffssl_plugin.eval import probes

    data = load_split("fashion_mnist", "train").balanced_subset(total=1500, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = data.images.flatten(1).float()[:, ::2] / 255.0  # 392 features: D < N, the basis is full-rank
    x = x + 5 * torch.randn(len(x), 1, generator=gen, dtype=x.dtype) * (0.5 + torch.rand(1, x.shape[1], generator=gen))
    y = data.labels
    train, val, sub = slice(0, 1000), slice(1000, 1500), slice(0, 900)
    cs = (0.01, 0.1, 1.0)
    earlier = probes.linear_probe(x[train], y[train], x[val], y[val], cs=cs)
    assert earlier.basis_vectors is not None and set(earlier.path) == set(cs)

    # re-expressed for another standardisation, the earlier classifiers give the same logits
    (mean0, std0), sub_x = earlier.standardisation, x[sub]
    mean1, std1 = sub_x.mean(0), sub_x.std(0).clamp_min(1e-6)
    moved = probes._start_path(earlier, (mean1, std1), 10, len(sub_x))
    for c in cs:
        w0, b0 = earlier.path[c]
        torch.testing.assert_close(
            ((sub_x - mean1) / std1) @ moved[c][0] + moved[c][1],
            ((sub_x - mean0) / std0) @ w0 + b0,
            atol=1e-4,
            rtol=1e-4,
        )  # float32 rounding of logits up to ~10

    results = {}
    for name, start in (("cold", None), ("started", earlier)):
        with counted_loss_evaluations() as calls:
            result = probes.linear_probe(sub_x, y[sub], x[val], y[val], cs=cs, start=start)
        results[name] = (result, len(calls))
    (cold, cold_calls), (started, started_calls) = results["cold"], results["started"]
    assert (
        started.params["preconditioner"] == "shared eigenbasis"
        and started.params["warm_start"] == "earlier probe's path"
    )
    assert cold.params["C"] == started.params["C"] and cold.val_acc == pytest.approx(started.val_acc, abs=0.005)
    for c in cs:
        w_cold, w_started = cold.path[c][0], started.path[c][0]
        assert float((w_cold - w_started).norm() / w_cold.norm()) < 0.02
    assert started_calls < 0.8 * cold_calls, (started_calls, cold_calls)
    # a train set of another scale (200 of the earlier 1,000 images) starts cold: at the same C its solution is far
    small = probes.linear_probe(x[:200], y[:200], x[val], y[val], cs=cs, start=earlier)
    assert small.params["warm_start"] == "previous C" and small.params["preconditioner"] == "train-feature eigenbasis"
