"""Heads on frozen diffusion features: attention head, DifFormer, DifFeed (and the backbone edits it needs),
the head-training protocol, and the harness protocols on a tiny config."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F

from diffssl_plugin.backbones import DDAEBackbone
from diffssl_plugin.errors import InputError, UnknownNameError
from diffssl_plugin.eval import EvalConfig, EvalContext, Readout, evaluate
from diffssl_plugin.heads import (
    AttentionHead,
    DifFeed,
    DifFormer,
    HeadTraining,
    PreLayer,
    auto_feedback_blocks,
    dict_rows,
    image_rows,
    tensor_rows,
    train_head,
    training_preset,
)

SMALL = {"dim": 16, "pool_size": 4, "depth": 2, "num_heads": 8, "mlp_ratio": 2.0}


@pytest.fixture
def x8(real_batch):
    return real_batch[:6]


def _maps(backbone, x, timesteps, blocks):
    with torch.no_grad():
        return backbone.extract(x, timesteps, blocks, pool=None)


def _unet_state(backbone):
    return {k: v.detach().clone() for k, v in backbone.unet.state_dict().items()}


# ================================================================ attention head
@pytest.mark.parametrize("block,t", [("down0", 0), ("mid", 10), ("up0.0", 50), ("up0", 10), ("up1", 200)])
def test_attention_head_shapes(tiny_backbone, x8, block, t):
    fmap = _maps(tiny_backbone, x8, [t], [block])[(t, block)]
    shape = tiny_backbone.block_shapes[block]
    head = AttentionHead(shape, 5, **SMALL).eval()
    assert head.pre.num_tokens == min(shape[1], 4) ** 2
    assert head.forward_features(fmap).shape == (6, 16)
    assert head(fmap).shape == (6, 5)
    # a map pooled to the head's s × s beforehand (a cached feature) gives the same logits
    pooled = F.adaptive_avg_pool2d(fmap, head.pre.size)
    torch.testing.assert_close(head(pooled), head(fmap))


def test_attention_head_is_order_invariant_without_positions():
    """No positional embedding: permuting the tokens (the spatial cells) leaves the CLS output unchanged."""
    torch.manual_seed(0)
    head = AttentionHead((3, 4, 4), 2, **SMALL).eval()
    x = torch.randn(2, 3, 4, 4)
    perm = torch.randperm(16)
    x_perm = x.flatten(2)[:, :, perm].view(2, 3, 4, 4)
    norm = head.pre.norm  # the LayerNorm's affine weights are per position: permute them too
    with torch.no_grad():
        norm.weight.fill_(1.0), norm.bias.zero_()
    torch.testing.assert_close(head(x), head(x_perm), rtol=1e-4, atol=1e-5)
    assert head.transformer.cls_token.requires_grad  # the CLS token is learnt (zero-initialised)
    assert torch.equal(head.transformer.cls_token, torch.zeros(1, 1, 16))


def test_attention_head_presets_and_bad_sizes():
    paper = AttentionHead.from_preset("paper", (64, 32, 32), 1000)
    assert paper.pre.size == (16, 16) and paper.pre.proj.out_channels == 1024
    assert len(paper.transformer.blocks) == 2 and paper.transformer.blocks[0].attn.num_heads == 8
    assert paper.transformer.blocks[0].attn.qkv.bias is None
    assert paper.fc.in_features == 1024
    with pytest.raises(UnknownNameError, match="cpu"):
        AttentionHead.from_preset("huge", (64, 8, 8), 10)
    with pytest.raises(InputError, match="divisible"):
        AttentionHead((8, 4, 4), 3, dim=20, num_heads=8)
    head = AttentionHead((8, 4, 4), 3, **SMALL)
    with pytest.raises(InputError, match=r"\(B, 8, 4, 4\)"):
        head(torch.zeros(2, 7, 4, 4))


def test_prelayer_layernorm_over_c_h_w():
    pre = PreLayer((3, 10, 10), dim=8, pool_size=5)
    assert pre.size == (5, 5) and tuple(pre.norm.normalized_shape) == (3, 5, 5)
    assert pre(torch.randn(2, 3, 10, 10)).shape == (2, 25, 8)
    assert PreLayer((3, 4, 4), dim=8, pool_size=16).size == (4, 4)  # never upsampled


# ================================================================ DifFormer
@pytest.mark.parametrize(
    "blocks,timesteps", [(["mid"], [10]), (["mid", "up0"], [0, 50]), (["down1", "up0.1", "up1"], [0, 10, 300])]
)
def test_difformer_shapes(tiny_backbone, x8, blocks, timesteps):
    feats = _maps(tiny_backbone, x8, timesteps, blocks)
    head = DifFormer({b: tiny_backbone.block_shapes[b] for b in blocks}, timesteps, 4, **SMALL).eval()
    assert head.num_tokens == sum(min(tiny_backbone.block_shapes[b][1], 4) ** 2 for b in blocks)
    assert head.forward_features(feats).shape == (6, 16 * len(timesteps))
    assert head(feats).shape == (6, 4)
    assert head.fc.in_features == 16 * len(timesteps)


def test_difformer_shares_the_transformer_across_timesteps(tiny_backbone, x8):
    """The CLS of each timestep is one transformer run on [CLS] + that timestep's tokens of all blocks."""
    blocks, timesteps = ["mid", "up0"], [0, 100]
    feats = _maps(tiny_backbone, x8, timesteps, blocks)
    head = DifFormer({b: tiny_backbone.block_shapes[b] for b in blocks}, timesteps, 3, **SMALL).eval()
    with torch.no_grad():
        per_t = [
            head.transformer(torch.cat([pre(feats[(t, b)]) for pre, b in zip(head.pre, blocks)], 1)) for t in timesteps
        ]
        torch.testing.assert_close(head.forward_features(feats), torch.cat(per_t, 1), rtol=1e-4, atol=1e-5)
    assert len(head.pre) == len(blocks)  # one pre-layer per block, not per (block, timestep)
    with pytest.raises(InputError, match="needs features"):
        head({k: v for k, v in feats.items() if k != (100, "up0")})


# ================================================================ backbone edits and mirrors (DifFeed hooks)
def test_mirror_is_the_skip_each_decoder_unit_consumes(tiny_backbone, x8):
    """For every decoder unit, the skip it concatenates is exactly its mirrored encoder unit's output."""
    unet, names = tiny_backbone.unet, tiny_backbone.unit_names
    consumed = {}

    def keep(name, skip_channels):
        def pre_hook(module, args):
            consumed[name] = args[0][:, -skip_channels:]

        return pre_hook

    handles = []
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            skip = tiny_backbone.unit_shapes[tiny_backbone.mirror_block(f"up{i}.{j}")][0]
            handles.append(resnet.register_forward_pre_hook(keep(f"up{i}.{j}", skip)))
    x_t = x8.clone()
    try:
        with torch.no_grad():
            outs = tiny_backbone._capture(x_t, 10, names)
    finally:
        for h in handles:
            h.remove()
    assert set(consumed) == {n for n in names if n.startswith("up") and "." in n}
    for dec, skip in consumed.items():
        assert torch.equal(skip, outs[tiny_backbone.mirror_block(dec)]), dec
    assert tiny_backbone.mirror_block("up1.1") == "conv_in"
    assert tiny_backbone.mirror_block("up0") == tiny_backbone.mirror_block("up0.1")
    with pytest.raises(UnknownNameError, match="decoder block"):
        tiny_backbone.mirror_block("down0")


def test_edit_of_a_down_block_reaches_next_block_and_skip(tiny_backbone, x8):
    plain = _maps(tiny_backbone, x8, [10], ["down0", "down1", "up1"])
    noise = tiny_backbone.draw_noise(x8)
    with torch.no_grad():
        edited = tiny_backbone.extract(
            x8, [10], ["down0", "down1", "up1"], pool=None, noise=noise, edits={"down0": lambda h: h + 1.0}
        )
    torch.testing.assert_close(edited[(10, "down0")], plain[(10, "down0")] + 1.0)
    assert not torch.allclose(edited[(10, "down1")], plain[(10, "down1")])  # the next block saw it
    # the skip of down0 is read by up0.1 (before up1's upsample): check it through a pre-hook
    seen = {}

    def keep_skip(module, args):  # returns None: only looks
        seen["in"] = args[0][:, -tiny_backbone.unit_shapes["down0"][0] :]

    h = tiny_backbone.unet.up_blocks[0].resnets[1].register_forward_pre_hook(keep_skip)
    try:
        with torch.no_grad():
            got = tiny_backbone.extract(x8, [10], ["up0"], pool=None, edits={"down0": lambda t: t * 0 + 3.0})
    finally:
        h.remove()
    assert torch.all(seen["in"] == 3.0)
    assert got[(10, "up0")].shape == (6, *tiny_backbone.block_shapes["up0"])
    assert all(not m._forward_hooks for m in tiny_backbone.unet.modules())


def test_edit_errors(tiny_backbone, x8):
    with pytest.raises(UnknownNameError, match="edit target"):
        tiny_backbone.extract(x8, [10], ["mid"], edits={"nope": lambda h: h})
    with pytest.raises(InputError, match="shape"):
        tiny_backbone.extract(x8, [10], ["mid"], edits={"down0.0": lambda h: h[:, :1]})
    with pytest.raises(InputError, match="noise"):
        tiny_backbone.extract(x8, [10], ["mid"], noise=torch.zeros(1, 1, 8, 8))
    assert all(not m._forward_hooks for m in tiny_backbone.unet.modules())


def test_noise_argument_fixes_x_t(tiny_backbone, x8):
    fresh = tiny_backbone.with_settings(noise_seed=None)
    noise = torch.randn_like(x8)
    with torch.no_grad():
        a = fresh.extract(x8, [300], ["mid"], pool=None, noise=noise)[(300, "mid")]
        b = fresh.extract(x8, [300], ["mid"], pool=None, noise=noise)[(300, "mid")]
    assert torch.equal(a, b)


# ================================================================ DifFeed
def test_auto_feedback_follows_diffssl_rule():
    """With two residual blocks per level (as ADM), the sources are each up level's second unit (21, 24…)."""
    m = timm.create_model("ddae_unet_cifar10")
    sources = auto_feedback_blocks(m)
    assert sources == ["up0.1", "up1.1", "up2.1", "up3.1"]
    assert [m.mirror_block(b) for b in sources] == ["down3.0", "down2.0", "down1.0", "down0.0"]
    small = timm.create_model("ddae_unet_fmnist")  # one residual block per level
    assert [small.mirror_block(b) for b in auto_feedback_blocks(small)] == ["down2", "down1.0", "down0.0"]


@pytest.mark.parametrize("block,feedback", [("mid", "auto"), ("up0", "auto"), ("up1.0", ["up0.0", "up1.1"])])
def test_diffeed_shapes(tiny_backbone, x8, block, feedback):
    net = DifFeed(tiny_backbone, 4, block=block, feedback_blocks=feedback, **SMALL)
    assert net(x8).shape == (6, 4)
    assert net.forward_features(x8).shape == (6, *tiny_backbone.block_shapes[block])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_diffeed_zero_feedback_equals_plain_pass(tiny_backbone, x8, mode):
    net = DifFeed(tiny_backbone, 4, timestep=50, block="up0", **SMALL)
    assert net.targets == ["down1", "down0.0"]
    net.train(mode == "train")
    with torch.no_grad():
        plain = tiny_backbone.extract(x8, [50], ["up0"], pool=None)[(50, "up0")]
        before = net.forward_features(x8)
        for fb in net.feedback:
            fb[0].weight.zero_()
        after = net.forward_features(x8)
    torch.testing.assert_close(after, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(before, plain, atol=1e-3)  # with its (non-zero) feedback, pass 2 differs


def test_diffeed_gradients_reach_feedback_through_frozen_unet(tiny_backbone, x8):
    net = DifFeed(tiny_backbone, 4, block="up0", **SMALL)
    F.cross_entropy(net(x8), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    for fb in net.feedback:
        assert fb[0].weight.grad is not None and fb[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.unet.parameters())


def test_diffeed_bad_settings(tiny_backbone):
    with pytest.raises(InputError, match="after the readout"):
        DifFeed(tiny_backbone, 3, block="down0", feedback_blocks=["up0.0"], **SMALL)  # up0.0 feeds down1
    with pytest.raises(UnknownNameError, match="decoder block"):
        DifFeed(tiny_backbone, 3, feedback_blocks=["mid"], **SMALL)
    with pytest.raises(InputError, match="diffusion backbone"):
        DifFeed(timm.create_model("raw_pixels"), 3)


# ================================================================ training: only the head moves
def test_training_updates_only_head_and_feedback(tiny_backbone, fmnist_uint8):
    images = F.interpolate(fmnist_uint8[:48].float(), size=(8, 8), mode="area").round().to(torch.uint8)
    labels = torch.arange(48) % 3
    net = DifFeed(tiny_backbone, 3, block="up0", **SMALL)
    unet_before = _unet_state(tiny_backbone)
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    fb_before = net.feedback[0][0].weight.detach().clone()
    rows = image_rows(images, labels, lambda x: x * 2 - 1)
    cfg = HeadTraining(epochs=2, batch_size=16, lr=1e-2, amp=False)
    res = train_head(net, rows, rows, cfg)
    assert all(n.startswith(("head.", "feedback.")) for n in res.param_names)
    assert any(n.startswith("feedback.") for n in res.param_names) and "head.fc.weight" in res.param_names
    head_and_feedback = [*net.head.parameters(), *net.feedback.parameters()]
    assert res.trainable_params == sum(p.numel() for p in head_and_feedback)
    for k, v in tiny_backbone.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k  # the U-Net never changed
    assert not torch.equal(net.feedback[0][0].weight, fb_before)
    assert any(not torch.equal(v, head_before[k]) for k, v in net.head.state_dict().items())
    assert res.images_seen == 2 * 48 and res.images_per_second > 0 and 0 <= res.val_acc <= 1


def test_attention_head_learns_cached_maps(tiny_backbone, real_batch, fmnist_uint8):
    """On 64 real images, a few epochs fit the training maps well above chance (the head really trains)."""
    from diffssl_plugin.data import load_split

    labels = load_split("fashion_mnist", "test", download=False).labels[:64]
    maps = _maps(tiny_backbone, real_batch, [10], ["mid"])[(10, "mid")]
    head = AttentionHead(maps.shape[1:], 10, **SMALL)
    rows = tensor_rows(maps, labels)
    res = train_head(
        head, rows, rows, HeadTraining(epochs=30, batch_size=32, lr=1e-2, weight_decay=0.0, warmup_epochs=0, amp=False)
    )
    assert res.val_acc > 0.25  # chance is 0.1 (± 0.04 on 64 images); random tiny U-Net features
    assert res.history[-1]["loss"] < 0.8 * res.history[0]["loss"]


@pytest.mark.parametrize("amp", [True, False])
def test_head_training_and_prediction_use_the_math_attention_backend_under_bf16(sdpa_flash_allowed, amp, monkeypatch):
    """In bf16 the fused CPU attention kernel is ~3× slower for these short token sequences, in fp32 faster
    (backbones/sdpa.py): the math backend is chosen under bf16 autocast only (``amp`` means bf16 on a CPU with
    bf16 hardware; one is assumed here so the test runs the same on every CPU)."""
    import diffssl_plugin.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    head = AttentionHead((8, 7, 7), 10, **SMALL)
    rows = tensor_rows(torch.randn(16, 8, 7, 7), torch.arange(16) % 10)
    train_head(head, rows, rows, HeadTraining(epochs=1, batch_size=8, warmup_epochs=0, amp=amp))
    assert sdpa_flash_allowed and all(flash_allowed is not amp for flash_allowed in sdpa_flash_allowed)


def test_dict_rows_and_training_presets():
    feats = {(0, "a"): torch.arange(10).float().view(10, 1), (5, "a"): torch.zeros(10, 2)}
    rows = dict_rows(feats, torch.zeros(10, dtype=torch.long))
    got = rows.get(torch.tensor([3, 7]))
    assert got[(0, "a")].flatten().tolist() == [3.0, 7.0] and got[(5, "a")].shape == (2, 2)
    paper = training_preset("paper")
    assert (paper.optimizer, paper.lr, paper.momentum, paper.weight_decay) == ("sgd", 5e-2, 0.0, 0.0)
    assert (paper.epochs, paper.schedule, paper.step_epochs, paper.gamma) == (28, "step", 7, 0.1)
    assert training_preset("paper_diffeed").batch_size == 16
    assert training_preset(epochs=3).epochs == 3
    with pytest.raises(InputError, match="unknown head-training settings"):
        training_preset(epochz=3)
    with pytest.raises(UnknownNameError, match="optimizer"):
        HeadTraining(optimizer="lamb")


def test_step_schedule_decays_every_step_epochs():
    from diffssl_plugin.heads.training import make_optimizer

    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = make_optimizer([p], training_preset("paper", epochs=21), steps_per_epoch=2)
    lrs = []
    for _ in range(42):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] == pytest.approx(5e-2) and lrs[13] == pytest.approx(5e-2)
    assert lrs[14] == pytest.approx(5e-3) and lrs[28] == pytest.approx(5e-4)


# ================================================================ harness protocols
_FAST = {"head_kwargs": {"dim": 16, "pool_size": 4}, "training_kwargs": {"epochs": 2, "batch_size": 50}}
TINY_EXTRA = {
    "attention": _FAST,
    "difformer": {**_FAST, "blocks": ("mid", "up0")},
    "diffeed": {
        "head_kwargs": {"dim": 16, "pool_size": 4},
        "train_images": 60,
        "training_kwargs": {"epochs": 1, "batch_size": 20},
    },
}


def _tiny_config(**kw):
    return EvalConfig(
        train_images=100,
        val_images=50,
        test_images=60,
        timesteps=(0, 10),
        blocks=("mid",),
        pools=("avg",),
        sweep_cs=(1.0,),
        final_cs=(1.0,),
        knn_ks=(20,),
        extra=TINY_EXTRA,
        **kw,
    )


def test_protocols_on_a_tiny_ddae(tiny_unet_config, tmp_path):
    torch.manual_seed(0)
    model = DDAEBackbone(unet_config=tiny_unet_config, timestep=10, block="mid", dynamic_img_size=True).eval()
    before = _unet_state(model)
    protocols = ("linear", "attention", "difformer", "diffeed")
    records = evaluate(
        model, "tiny", "tiny_ddae", _tiny_config(), protocols=protocols, cache_dir=tmp_path / "cache", progress=False
    )
    by_name = {r["protocol"]["name"]: r for r in records if r["split"] == "test"}
    assert {"linear", "attention", "difformer", "diffeed"} <= set(by_name)
    for name in ("attention", "difformer", "diffeed"):
        r = by_name[name]
        assert 0.0 <= r["value"] <= 1.0 and r["trainable_params"] > 0 and r["train_images_per_s"] > 0
        assert r["cost"]["peak_memory_mb"] > 0
    attention_readout = by_name["attention"]["readout"]
    assert attention_readout["block"] == "mid" and attention_readout["pool"] == "none"
    assert attention_readout["timestep"] == by_name["linear"]["readout"]["timestep"]
    assert by_name["difformer"]["protocol"]["blocks"] == ["mid", "up0"]
    assert by_name["difformer"]["protocol"]["timesteps"] == [0, 10]
    assert by_name["diffeed"]["cost"]["feature_cache_mb"] is None  # trains on images: nothing cached
    assert by_name["diffeed"]["head_train_images"] == 60
    assert by_name["attention"]["cost"]["feature_cache_mb"] > 0
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.unet.parameters())  # DifFeed gave the flags back


def test_cached_unpooled_maps_round_trip(tiny_unet_config, tmp_path):
    """extract_features caches pool='none' readouts as (N, C, H, W) maps and reads them back unchanged."""
    model = DDAEBackbone(unet_config=tiny_unet_config, dynamic_img_size=True).eval()
    ctx = EvalContext(model, "tiny", "tiny", _tiny_config(), cache_dir=tmp_path, progress=False)
    _, val, _ = ctx.splits()
    r = Readout(10, "up0", "none")
    first = ctx.features(val, [r])[r]
    assert first.shape == (len(val), 16, 28, 28) and first.dtype == torch.float32
    assert list(tmp_path.rglob("*.safetensors"))
    again = ctx.features(val, [r])[r]
    assert torch.equal(first, again)


def test_protocols_on_a_timm_backbone(caplog, tmp_path):
    """Attention works on any backbone with forward_intermediates; DifFormer and DifFeed skip at once."""
    model = timm.create_model("raw_pixels")
    with caplog.at_level(logging.WARNING):
        records = evaluate(
            model,
            "raw",
            "raw_pixels",
            _tiny_config(),
            protocols=("attention", "difformer", "diffeed"),
            cache_dir=tmp_path,
            progress=False,
        )
    assert [r["protocol"]["name"] for r in records] == ["attention"]
    assert records[0]["protocol"]["input"] == "forward_intermediates[-1]"
    assert "difformer" in caplog.text and "diffeed" in caplog.text and "skipped" in caplog.text


def test_unknown_protocol_setting(tiny_backbone, tmp_path):
    cfg = _tiny_config()
    cfg.extra = {"attention": {"heads": 4}}
    with pytest.raises(InputError, match="unknown attention settings"):
        evaluate(tiny_backbone, "tiny", "tiny", cfg, protocols=("attention",), progress=False)


def test_protocol_settings_merge_kwargs(tiny_backbone):
    from diffssl_plugin.eval.heads_protocols import PROTOCOL_DEFAULTS, protocol_settings

    cfg = _tiny_config()
    cfg.extra = {"diffeed": {"training_kwargs": {"epochs": 1}, "train_images": 10}}
    got = protocol_settings(EvalContext(tiny_backbone, "t", "t", cfg), "diffeed")
    assert got["training_kwargs"] == {**PROTOCOL_DEFAULTS["diffeed"]["training_kwargs"], "epochs": 1}
    assert got["train_images"] == 10 and got["feedback_blocks"] == "auto"


def test_paper_diffeed_freezes_the_feedback_batchnorm_from_epoch_7():
    """diffssl's feedback training runs BatchNorm in eval mode from epoch 7 on: the running statistics stop
    after 7 epochs of steps (the affine weights keep training), whatever mode switches validation makes."""
    assert training_preset("paper_diffeed").freeze_bn_epoch == 7
    torch.manual_seed(0)
    x, y = torch.randn(64, 6) * 3 + 1, torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    cfg = HeadTraining(epochs=4, batch_size=16, freeze_bn_epoch=2, eval_every=1, warmup_epochs=0.0)
    bn = model[0]
    batch_stat_steps = []  # forwards that normalise with (and update) the batch statistics
    bn.register_forward_hook(lambda m, args, out: batch_stat_steps.append(1) if m.training else None)
    train_head(model, tensor_rows(x, y), tensor_rows(x, y), cfg)
    # (the kept head is the best epoch's: its running statistics may be an earlier epoch's, so count forwards)
    assert len(batch_stat_steps) == 2 * 4  # 2 epochs of 4 steps, then frozen
    assert not torch.allclose(bn.weight, torch.ones(6))  # still trained after the freeze
    with pytest.raises(InputError, match="freeze_bn_epoch"):
        HeadTraining(freeze_bn_epoch=-1)
