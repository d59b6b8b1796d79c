"""One place for hardware: ``--accelerator/--devices/--strategy/--num-nodes/--precision`` → what every command
needs (this process's device, the autocast dtype, rank and world size), and the collectives that make a
multi-process run behave like one process.

Processes are started by Lightning (Fabric's launcher, the same one ``Trainer(strategy="ddp")`` uses) or by
an outside launcher (``torchrun``, SLURM): :meth:`Runtime.launch` starts them once, at the top of a command,
and initialises ``torch.distributed``; every later Lightning ``Trainer`` then finds the processes and the
process group already there and joins them. Everything after ``launch`` runs on every rank; work that must
happen once (probes, records, pictures, exports) is guarded by :attr:`Runtime.is_global_zero`, and its
results reach the other ranks through :meth:`Runtime.broadcast`.

On one process (the default, and every CPU run unless ``--devices N`` asks for more) nothing here starts
a process group, and the collectives are identities.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from .errors import InputError, check_name

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32-true", "32", "bf16", "16")


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions and matmuls in hardware (oneDNN's check: AVX512-BF16, AMX, or
    AVX512 cores). Elsewhere, e.g. AVX2-only AMD EPYC and older Intel CPUs, bf16 autocast is emulated: measured on
    a 2-core AVX2 EPYC, a CIFAR ResNet-18 ran at 5 img/s under bf16 autocast against 107 img/s in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN or without this check
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def auto_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The mixed-precision dtype that speeds ``device_type`` up: bf16 on CPUs that compute it in hardware and on
    GPUs that support it, fp16 on older GPUs, None (fp32) on CPUs that would only emulate bf16."""
    if device_type == "cuda":
        return torch.bfloat16 if _cuda_bf16() else torch.float16
    if device_type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return torch.bfloat16


def mixed_precision(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast on ``device`` at :func:`auto_autocast_dtype` when ``enabled`` (a no-op context for fp32): what
    code that runs outside a :class:`Runtime` (``amp=True`` arguments) uses."""
    device_type = torch.device(device).type
    dtype = auto_autocast_dtype(device_type) if enabled else None
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def similarity_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype kNN cosine similarities are computed in: float64 (float32 on MPS, which has none). Features that
    share one large direction (MDSM's energy features) have cosines that differ below float32's resolution."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


#: images per forward where a frozen model is only read (feature extraction, scoring), by device type. On the CPU
#: a batch of 256 28×28 images gives U-Net and ResNet maps of 51 MB (256 × 64 × 28 × 28 floats); glibc serves
#: every allocation above 32 MB with a fresh mmap, so each such map is page-faulted in and unmapped again, batch
#: after batch. At 64 images extraction ran 10–60% faster on the 2-core AMD EPYC (fp32, 1,536 images, runs
#: alternated; DDAE sweep 107–137 → 131–162 img/s, DRL 133–136 → 207–229, MAE 156–184 → 203–222, SimCLR
#: 155–161 → 174–178, MDSM unchanged).
INFERENCE_BATCH = {"cpu": 64}
DEFAULT_INFERENCE_BATCH = 256


def inference_batch_size(device: torch.device | str, requested: int | None = None) -> int:
    """``requested`` if given, else the device type's batch for read-only forwards (:data:`INFERENCE_BATCH`)."""
    if requested is not None:
        return requested
    return INFERENCE_BATCH.get(torch.device(device).type, DEFAULT_INFERENCE_BATCH)


def precision_name(device: torch.device | str, enabled: bool = True) -> str:
    """What :func:`mixed_precision` runs on ``device``, for records: ``"bf16-autocast"``, ``"fp16-autocast"`` or
    ``"fp32"``."""
    dtype = auto_autocast_dtype(torch.device(device).type) if enabled else None
    return {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast", None: "fp32"}[dtype]


@dataclass(frozen=True)
class Runtime:
    """Hardware settings of one command (the Lightning ``Trainer`` arguments of the same names).

    ``precision="auto"`` means bf16 autocast where the device computes it in hardware (Ampere and newer GPUs;
    CPUs with AVX512-BF16/AMX, see :func:`cpu_has_fast_bf16`), fp16 autocast on older GPUs, and fp32 on CPUs that
    would only emulate bf16; it is what evaluation uses by default.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    sync_batchnorm: bool = False

    def __post_init__(self):
        check_name("accelerator", self.accelerator, ACCELERATORS)
        check_name("precision", str(self.precision), PRECISIONS)
        if isinstance(self.devices, int) and self.devices < 1:
            raise InputError(f"--devices must be a positive number or 'auto', got {self.devices}")
        if self.num_nodes < 1:
            raise InputError(f"--num-nodes must be ≥ 1, got {self.num_nodes}")

    # ------------------------------------------------------------------ what this process runs on
    @property
    def device_type(self) -> str:
        """``"cuda"``, ``"mps"`` or ``"cpu"``: the accelerator asked for, if this machine has it."""
        if self.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return "cuda"
        if (
            self.accelerator in ("mps", "auto")
            and getattr(torch.backends, "mps", None)
            and torch.backends.mps.is_available()
        ):
            return "mps"
        if self.accelerator in ("gpu", "cuda"):
            raise InputError(
                "--accelerator gpu was asked for, but torch sees no CUDA device here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
            )
        return "cpu"

    @property
    def device(self) -> torch.device:
        """This process's device (``cuda:LOCAL_RANK`` on GPUs)."""
        kind = self.device_type
        if kind == "cuda":
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return torch.device(kind)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of this runtime's precision on its device (None: full fp32)."""
        p = str(self.precision)
        if p in ("32-true", "32"):
            return None
        if p in ("16-mixed", "16"):
            return torch.float16
        if p in ("bf16-mixed", "bf16"):
            return torch.bfloat16
        return auto_autocast_dtype(self.device_type)

    def with_config_precision(self, precision: str) -> Runtime:
        """This runtime at a paper config's precision (e.g. ``bf16-mixed``, a GPU recipe), except on a CPU that
        would only emulate bf16 (:func:`cpu_has_fast_bf16`): there the config's bf16 runs in fp32, the same math
        far faster (one step of ``ddae_cifar10``'s 35.7M-parameter U-Net, batch 2, on a 2-core AVX2 EPYC: 16.3 s
        in emulated bf16, 0.9 s in fp32; ``diffssl reproduce ddae_cifar10 --dry-run``)."""
        if str(precision) in ("bf16-mixed", "bf16") and self.device_type == "cpu" and not cpu_has_fast_bf16():
            precision = "32-true"
        return replace(self, precision=precision)

    def precision_of(self, model: torch.nn.Module) -> str:
        """The Lightning precision ``model`` computes in under this runtime, for records: ``32-true`` when a module
        of it opts out of autocast (``computes_in_fp32``: MDSM's energy network), else :attr:`lightning_precision`."""
        if any(getattr(m, "computes_in_fp32", False) for m in model.modules()):
            return "32-true"
        return self.lightning_precision

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """``torch.autocast`` on this device at :attr:`autocast_dtype` (a no-op context for fp32)."""
        dtype = self.autocast_dtype
        if not enabled or dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    @property
    def lightning_precision(self) -> str:
        """The ``Trainer(precision=...)`` string of this runtime."""
        return {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", None: "32-true"}[self.autocast_dtype]

    # ------------------------------------------------------------------ processes
    @property
    def requested_world_size(self) -> int:
        """Processes this runtime asks for: devices per node × nodes."""
        devices = self.devices
        if devices in ("auto", "-1", -1):
            devices = torch.cuda.device_count() if self.device_type == "cuda" else 1
        elif isinstance(devices, str):
            devices = len([d for d in devices.split(",") if d]) if "," in devices else int(devices)
        return max(1, int(devices)) * self.num_nodes

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments for ``pytorch_lightning.Trainer`` (hardware and precision only)."""
        accelerator = {"cuda": "gpu"}.get(self.accelerator, self.accelerator)
        return {
            "accelerator": accelerator,
            "devices": self.devices,
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
            "precision": self.lightning_precision,
            "sync_batchnorm": self.sync_batchnorm and self.requested_world_size > 1,
        }

    def launch(self) -> Runtime:
        """Start this runtime's processes (once; a no-op on one process or when they already run) and
        initialise the process group, with Lightning Fabric's launcher: the command re-runs itself in one
        process per extra device, or joins the processes ``torchrun``/SLURM started."""
        if self.requested_world_size <= 1 or (dist.is_available() and dist.is_initialized()):
            return self
        from lightning_fabric import Fabric

        strategy = "ddp" if self.strategy == "auto" else self.strategy
        accelerator = {"cuda": "gpu"}.get(self.accelerator, self.accelerator)
        fabric = Fabric(accelerator=accelerator, devices=self.devices, strategy=strategy, num_nodes=self.num_nodes)
        fabric.launch()
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device)
        return self

    # ------------------------------------------------------------------ collectives (identities on one process)
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a file), then the other ranks (which then read it)."""
        if not self.is_global_zero:
            self.barrier()
        yield
        if self.is_global_zero:
            self.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it, on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def shard(self, n: int, multiple: int = 1) -> range:
        """This rank's contiguous part of ``range(n)`` (see :func:`shard_range`; boundaries on multiples of
        ``multiple``)."""
        if not self.distributed:
            return range(n)
        return shard_range(n, self.rank, self.world_size, multiple)

    def gather_shards(self, local: torch.Tensor, n: int, multiple: int = 1) -> torch.Tensor:
        """Concatenate every rank's :meth:`shard` rows (``local`` holds this rank's; the same ``multiple``) into the
        (n, …) tensor, in order, on every rank; each row was computed by exactly one rank."""
        if not self.distributed:
            return local
        sizes = [len(shard_range(n, r, self.world_size, multiple)) for r in range(self.world_size)]
        if sizes[self.rank] != local.shape[0]:
            raise InputError(f"rank {self.rank} holds {local.shape[0]} rows, its shard has {sizes[self.rank]}")
        comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=comm_device)
        padded[: sizes[self.rank]] = local.to(comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(local.device)


def shard_range(n: int, rank: int, world_size: int, multiple: int = 1) -> range:
    """Rank ``rank``'s contiguous part of ``range(n)`` among ``world_size`` ranks: whole blocks of ``multiple``
    items (the last block may be shorter), spread so that the ranks' block counts differ by at most one.

    With ``multiple`` = the batch size, every rank's batches are exactly the batches one process would run
    (``[0, b)``, ``[b, 2b)``, …), so per-batch kernels see the same inputs and features do not depend on the
    number of processes, bit for bit (with shards cut mid-batch, the odd-sized batches picked other convolution
    kernels, features moved by ~1e-7, and the linear probes fit on them by up to their tolerance)."""
    blocks = -(-n // multiple)
    per, extra = divmod(blocks, world_size)
    first = rank * per + min(rank, extra)
    last = first + per + (rank < extra)
    return range(min(n, first * multiple), min(n, last * multiple))


#: the runtime of the running command (set by :func:`use`; a one-process CPU/auto runtime otherwise)
_CURRENT: list[Runtime] = [Runtime()]


def current() -> Runtime:
    """The runtime the running command set up (one process, ``accelerator="auto"`` if none did)."""
    return _CURRENT[-1]


@contextlib.contextmanager
def use(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` the :func:`current` one inside the block (launching its processes first)."""
    runtime.launch()
    _CURRENT.append(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.pop()


# ---------------------------------------------------------------------------------------------- command line
def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """The hardware options of every command that computes (pretrain, eval, bench, reproduce), each checked
    where it is parsed."""

    def positive_int(text: str) -> int:
        if not str(text).strip().isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        return int(text)

    def devices(text: str) -> int | str:
        """A positive count, ``auto``, ``-1`` (all), or device indices ``0,1``."""
        text = str(text).strip()
        if text in ("auto", "-1") or (text.isdigit() and int(text) > 0):
            return int(text) if text.isdigit() else text
        if "," in text and all(p.strip().isdigit() for p in text.split(",")):
            return text
        raise argparse.ArgumentTypeError(f"expected a positive count, 'auto', -1 or indices like 0,1; got {text!r}")

    p.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="hardware (Lightning)")
    p.add_argument(
        "--devices",
        type=devices,
        default="1",
        help="devices per node (Lightning), e.g. 8, auto, or a list 0,1; more than one starts one "
        "process per device (DDP)",
    )
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (auto: ddp for several devices)")
    p.add_argument(
        "--num-nodes",
        type=positive_int,
        default=1,
        help="nodes (each node's processes started by this command, torchrun or SLURM)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 autocast where supported, else fp16",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def from_args(args: argparse.Namespace) -> Runtime | None:
    """The :class:`Runtime` of a parsed command line (None for a command without hardware options)."""
    if not hasattr(args, "accelerator"):
        return None
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    return Runtime(
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=args.precision,
    )
