"""Every registered backbone: forwards without host syncs, timm's ``set_grad_checkpointing``; and a DDAE forward
that ``torch.compile(fullgraph=True)`` traces."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_UNET
from torch.profiler import ProfilerActivity, profile

from diffssl_plugin.backbones import DDAEBackbone
from diffssl_plugin.backbones.timm_contract import registered_models

#: every model this package registers with timm
OURS = registered_models()
#: smaller versions of the big ones, where the constructor allows it
SMALL = {"mdsm_ebm_fmnist": {"width": 4}, "mdsm_ebm_cifar10": {"width": 4}, "mae_vit_tiny_p4": {"depth": 2}}
#: a module that gradient checkpointing recomputes in the backward (None: the model has no blocks)
RECOMPUTED = {
    "ddae_unet_cifar10": "unet.down_blocks.0.resnets.0",
    "ddae_unet_fmnist": "unet.down_blocks.0.resnets.0",
    "raw_pixels": None,
    "drl_encoder_fmnist": "encoder.blocks.1",
    "drl_time_encoder_fmnist": "encoder.blocks.1",
    "vdrl_time_encoder_fmnist": "encoder.blocks.1",
    "drl_encoder_cifar10": "encoder.blocks.1",
    "drl_time_encoder_cifar10": "encoder.blocks.1",
    "vdrl_time_encoder_cifar10": "encoder.blocks.1",
    "mdsm_ebm_cifar10": "stages.0",
    "mdsm_ebm_fmnist": "stages.0",
    "mae_vit_tiny_p4": "blocks.0",
    "simclr_resnet18_cifar": "layer1.0",
}
#: ops that copy a tensor's value to the host (a device sync on a GPU)
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero")


def test_every_registered_model_is_covered():
    assert sorted(OURS) == sorted(RECOMPUTED)


def _model_and_batch(name: str, batch: int = 2, device: str = "cpu"):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL.get(name, {})).eval().to(device)
    cfg = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    x = (torch.rand(batch, *cfg["input_size"]) - mean) / std  # images in [0, 1], normalised as the harness does
    return model, x.to(device)


def _hot_calls(model, x):
    """The calls of the feature hot path: the forward, and ``extract`` over two blocks where the model has it."""
    calls = [lambda: model(x)]
    if hasattr(model, "extract"):
        blocks = list(model.block_names)[-2:]
        calls.append(lambda: model.extract(x, [0, 10], blocks, pool="avg"))
    return calls


@pytest.mark.parametrize("name", OURS)
def test_forward_reads_no_value_on_the_host(name):
    """No ``.item()``/``bool(tensor)``/``nonzero`` in a forward: each would wait for the GPU."""
    model, x = _model_and_batch(name)
    with torch.no_grad():
        for call in _hot_calls(model, x):
            call()  # first call: caches (the DDAE backbone's shared noise) fill here
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
            assert not [e.name for e in prof.events() if e.name in HOST_READS]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", OURS)
def test_cuda_forward_never_synchronises(name):
    """On a GPU, CUDA's sync debug mode turns every synchronising call (value reads, copies from pageable host
    memory, ``.cpu()``) into an error."""
    model, x = _model_and_batch(name, device="cuda")
    with torch.no_grad():
        for call in _hot_calls(model, x):
            call()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("name", OURS)
def test_grad_checkpointing_gives_the_same_gradients(name):
    """timm's ``set_grad_checkpointing``: the same output and gradients (eval mode: no dropout), and the
    checkpointed blocks run again in the backward."""
    model, x = _model_and_batch(name)
    out, x_grad, grads = _grads(model, x)
    model.set_grad_checkpointing(True)
    calls = []
    path = RECOMPUTED[name]
    handle = model.get_submodule(path).register_forward_pre_hook(lambda *a: calls.append(1)) if path else None
    out_ckpt, x_grad_ckpt, grads_ckpt = _grads(model, x)
    if handle is not None:
        handle.remove()
        assert len(calls) == 2  # the forward, and the recomputation in the backward
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(x_grad_ckpt, x_grad)
    assert grads_ckpt.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], msg=n)
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(_grads(model, x)[2], grads)


# ================================================================ torch.compile
def _tiny_ddae(block: str) -> DDAEBackbone:
    torch.manual_seed(0)
    return DDAEBackbone(unet_config=dict(TINY_UNET), block=block, pool="avg2x2").eval()


def _compiled_matches_eager(model, backend: str) -> None:
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(compiled(x.flip(0)), model(x.flip(0)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block", ["mid", "up1.0", "down0"])
def test_ddae_forward_traces_as_one_graph(block):
    """Dynamo traces the whole forward (checks, shared noise, the U-Net view that ends at ``block``) with no
    graph break: ``aot_eager`` runs the traced graph without generating code, so this stays fast."""
    torch._dynamo.reset()
    _compiled_matches_eager(_tiny_ddae(block), "aot_eager")


@pytest.mark.slow
def test_ddae_compiles_with_inductor():
    """The default backend (generated C++ on the CPU; about a minute here) matches the eager forward."""
    torch._dynamo.reset()
    _compiled_matches_eager(_tiny_ddae("up1.0"), "inductor")
