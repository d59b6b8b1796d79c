"""Mixed precision follows the hardware: ``precision="auto"`` and ``amp=True`` mean bf16 autocast only where the
device computes bf16 fast. On CPUs without bf16 hardware (AVX2-only, e.g. AMD EPYC) bf16 is emulated, 5-20x
slower than fp32, so they run in fp32; an explicit ``bf16-mixed`` is still honoured."""

from __future__ import annotations

import pytest
import torch

import diffssl_plugin.runtime as runtime
from diffssl_plugin.runtime import Runtime, mixed_precision, precision_name


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_on_the_cpu_follows_its_bf16_hardware(monkeypatch, fast):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    rt = Runtime(accelerator="cpu")
    assert rt.autocast_dtype == (torch.bfloat16 if fast else None)
    assert rt.lightning_precision == ("bf16-mixed" if fast else "32-true")
    assert rt.trainer_kwargs()["precision"] == rt.lightning_precision
    for ctx in (rt.autocast(), mixed_precision("cpu")):
        with ctx:
            assert torch.is_autocast_enabled("cpu") is fast
            y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        assert y.dtype == (torch.bfloat16 if fast else torch.float32)
    with mixed_precision("cpu", enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_explicit_precisions_are_honoured_whatever_the_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert Runtime(accelerator="cpu", precision="bf16-mixed").autocast_dtype is torch.bfloat16
    assert Runtime(accelerator="cpu", precision="32-true").autocast_dtype is None
    assert Runtime(accelerator="cpu", precision="16-mixed").autocast_dtype is torch.float16


@pytest.mark.parametrize("fast", [True, False])
def test_a_configs_bf16_runs_in_fp32_only_on_a_cpu_that_would_emulate_it(monkeypatch, fast):
    """Paper configs ask for bf16-mixed (a GPU recipe); a CPU without bf16 hardware runs it in fp32."""
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    cpu = Runtime(accelerator="cpu")
    assert cpu.with_config_precision("bf16-mixed").lightning_precision == ("bf16-mixed" if fast else "32-true")
    assert cpu.with_config_precision("16-mixed").autocast_dtype is torch.float16
    assert cpu.with_config_precision("32-true").autocast_dtype is None


def test_cpu_bf16_check_answers_on_this_machine():
    assert isinstance(runtime.cpu_has_fast_bf16(), bool)


def test_finetune_records_the_precision_it_ran_in(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert precision_name("cpu", True) == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert precision_name("cpu", True) == "bf16-autocast"
    assert precision_name("cpu", False) == "fp32"


def test_records_name_the_cpu_and_its_bf16_hardware():
    from diffssl_plugin.eval.records import environment

    environment.cache_clear()  # another test may have filled the cache under a monkeypatched bf16 check
    machine = environment()["machine"]
    assert machine["cpu_bf16"] is runtime.cpu_has_fast_bf16()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "cpu" in machine
