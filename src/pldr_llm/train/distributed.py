"""Process groups and FSDP2 sharding.

One code path serves every launch: ``pldr-llm train`` started by ``torchrun`` (one or many nodes)
joins the process group torchrun describes in its environment; started directly, it creates a
one-process group of its own (an in-memory store, no port). Either way the model is sharded with
FSDP2 (``fully_shard``), one unit per decoder layer plus the root (embedding, final layer); with
one process that sharding is the identity, and the numbers are those of the plain model.

The original's FSDP1 sharding strategies map onto FSDP2 like this:

==================== ============================================================================
``FULL_SHARD``       1-D mesh over all ranks, parameters resharded after forward (ZeRO-3)
``SHARD_GRAD_OP``    1-D mesh, parameters kept gathered between forward and backward (ZeRO-2)
``HYBRID_SHARD``     2-D mesh (replicate across nodes, shard within a node), ZeRO-3 inside a node
``_HYBRID_SHARD_ZERO2`` as ``HYBRID_SHARD`` with ZeRO-2 inside a node
``NO_SHARD``         2-D mesh (replicate over all ranks, shard over 1): plain data parallelism
==================== ============================================================================

CPU offload is FSDP2's ``CPUOffloadPolicy``; bf16 mixed precision is ``MixedPrecisionPolicy``
(parameters in bf16 for compute, gradients reduced in ``fsdp_reduce_dtype``). ``backward_prefetch``
and ``auto_size_minimum`` have no FSDP2 counterpart (FSDP2 always prefetches the next unit, and the
unit is always the decoder layer); they are accepted for compatibility and ignored.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pldr_llm.core.errors import PLDRError
from pldr_llm.devices import resolve_device

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_T = TypeVar("_T")

__all__ = [
    "DistEnv",
    "setup_distributed",
    "current_env",
    "cleanup_distributed",
    "resolve_device",
    "shard_model",
    "is_sharded",
    "all_reduce_sum",
    "all_ranks",
    "barrier",
    "broadcast_object",
]

logger = logging.getLogger("pldr_llm.train")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the world, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is active (even a one-process one)."""
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def setup_distributed(device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Join (or create) the process group and pick this rank's device.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) this joins that group: NCCL on
    GPUs, gloo on the CPU. Without it, a one-process group is created on an in-memory store, so the
    rest of the trainer runs exactly as it would on many ranks.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return current_env(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        import datetime

        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU up front (no guessing later)
        dist.init_process_group(backend=backend, **kwargs)
    else:
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs
        )
    return DistEnv(rank, world_size, local_rank, local_world_size, dev, initialized_here=True)


def current_env(device: torch.device | None = None) -> DistEnv:
    """The :class:`DistEnv` of an already initialized process group (or the single-process one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv(device=device or torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if device is None:
        device = resolve_device("auto", local_rank)
    return DistEnv(rank, world, local_rank, local_world, device)


def cleanup_distributed(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def _mesh(strategy: str, env: DistEnv) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    device_type = env.device.type
    world = env.world_size
    if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if strategy == "NO_SHARD":
        return init_device_mesh(device_type, (world, 1), mesh_dim_names=("replicate", "shard"))
    # Hybrid: replicate across nodes, shard inside a node (torchrun's LOCAL_WORLD_SIZE).
    local = env.local_world_size
    if local <= 0 or world % local:
        raise PLDRError(
            f"'fsdp_sharding_strategy' {strategy} needs the world size ({world}) to be a multiple "
            f"of the processes per node ({local})"
        )
    return init_device_mesh(
        device_type, (world // local, local), mesh_dim_names=("replicate", "shard")
    )


def shard_model(
    model: nn.Module,
    env: DistEnv,
    strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    mixed_precision: bool = True,
    reduce_dtype: str = "float32",
    prefetch: str = "PRE",
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer and then to the whole model (in place).

    Parameters are gathered in bf16 (``mixed_precision``) and gradients reduced in
    ``reduce_dtype`` (float32 by default, as the original). ``prefetch`` is the original's
    ``backward_prefetch`` key: ``"NOPREFETCH"`` turns off the explicit backward prefetch.

    ``mixed_precision`` (bf16 compute) and ``cpu_offload`` only apply on GPUs; on the CPU the
    model trains in float32.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = _mesh(strategy, env)
    reshard = strategy in ("FULL_SHARD", "HYBRID_SHARD")
    kwargs: dict = {"mesh": mesh}
    if env.device.type == "cuda" and mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32 if reduce_dtype == "float32" else torch.bfloat16,
        )
    if cpu_offload:
        if env.device.type != "cuda":
            logger.warning("fsdp_cpu_offload has no effect when training on the CPU; ignored")
        else:
            kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = _decoder_layers(model)
    # One FSDP unit per decoder layer, its metric learner included (the learner's small [dk, dk]
    # matmuls then share the layer's one all-gather and one reduce-scatter).
    for index, layer in enumerate(layers):
        # The last layer is the first one backward needs: resharding it after forward would only
        # gather it again at once.
        last = index == len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard and not last, **kwargs)
    # The root (embedding, LM head, whose loss is computed inside forward) stays gathered from
    # forward to the end of backward, as its parameters are needed again at once.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    _explicit_prefetch(layers, backward=prefetch != "NOPREFETCH")
    return model


def _explicit_prefetch(layers: list[nn.Module], backward: bool = True) -> None:
    """Issue each layer's all-gather one layer ahead, in forward and in backward.

    FSDP2's implicit prefetch starts the next layer's all-gather only when the host reaches that
    layer; with compiled layers the host runs ahead of the GPU, so asking for it one layer
    earlier lets the collective overlap the current layer's compute.
    """
    for index, layer in enumerate(layers):
        forward_setter = getattr(layer, "set_modules_to_forward_prefetch", None)
        backward_setter = getattr(layer, "set_modules_to_backward_prefetch", None)
        if forward_setter is not None and index + 1 < len(layers):
            forward_setter([layers[index + 1]])
        if backward and backward_setter is not None and index > 0:
            backward_setter([layers[index - 1]])


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "dec_layers", None)
    if layers is None:
        raise PLDRError("FSDP sharding needs a PLDRModel (decoder.dec_layers not found)")
    return list(layers)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6 is not supported
        return False
    return isinstance(model, FSDPModule)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op without a process group); returns ``tensor``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks(value: bool, device: torch.device) -> bool:
    """Whether ``value`` holds on every rank (one MIN all-reduce; ``value`` itself without a
    multi-process group): e.g. "every rank still has a batch", so that all run the same number
    of forward passes (FSDP's collectives)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if value else 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return value


def barrier() -> None:
    """Wait for every rank (no-op without a multi-process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: _T, src: int = 0) -> _T:
    """Rank ``src``'s ``obj`` on every rank (identity without a multi-process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
