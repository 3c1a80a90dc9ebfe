"""Data-parallel training across processes: one run as N processes started by torchrun, each with a full copy of
the model, each computing the gradients of its share of every optimizer step; the gradients are summed across the
processes before the step, so every copy takes the same step. gloo on CPU, NCCL on CUDA (each process on
cuda:base+LOCAL_RANK, where `spec.device` names the base).

Why it stays exact: a step's loss is the mean over every trained token of the whole step (`recipes/sft.py`), so each
process backpropagates (its chunks' loss sum) / (the whole step's trained tokens), and the SUM of the processes'
gradients is the gradient one process would have computed over the whole step. Only the floating-point summation
order changes, so N processes follow a single process's loss curve to float tolerance (fp32: ~1e-6 relative; the
tests ask 1e-4). The resume state (optimizer, scheduler, RNG, step, data position) is the same on every process and
does not depend on N, so a run checkpointed at one world size resumes at any other. One exception to "the same
curve": LoRA dropout draws from each process's own RNG, so with `lora_dropout` > 0 the masks (not the expected
gradient) depend on how a step is shared.

The launcher (`torchrun`, from the local executor) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init` reads them. Without WORLD_SIZE (or with 1) every helper here is a no-op that creates no process group and no
tensor, so a single-process run is exactly what it was before this module existed.

Rank 0 is the run's voice: it alone writes the event stream, the tokenized set, checkpoints and final weights (the
recipe checks `is_main()`); every rank computes. Collectives are called at the same points on every rank, in the
same order: code between them is deterministic and identical across ranks (same data, same seed, same decisions),
which is what keeps them matched.

FSDP (full fine-tuning of models that do not fit one device) would slot in here, and needs:
- a wrapping policy per decoder layer (transformer_auto_wrap_policy on the model's decoder-layer class, or
  `fully_shard` on each layer then the root), applied in `build_model` after the weights load, before the optimizer
  is made over the (now sharded) parameters;
- sharded optimizer state: AdamW over the shards; a checkpoint then gathers it (`get_optimizer_state_dict` with
  full_state_dict=True, cpu_offload=True) so the resume state stays independent of the world size, as now;
- full-state-dict gathering on rank 0 for checkpoints and final weights (`get_model_state_dict` full + offloaded),
  with every rank taking part in the gather (a collective) and only rank 0 writing;
- `all_reduce_grads` would be skipped (FSDP reduce-scatters the gradients itself) and `clip_grad_norm_` becomes the
  FSDP-aware one; the step's sharing of examples, the metrics' reductions and the stop agreement stay as they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

# How long a collective waits for the other ranks. Long: while rank 0 saves and uploads a checkpoint the others wait
# at a barrier, and a large model's upload takes minutes. A rank that dies is noticed sooner: torchrun stops the
# others when one fails, and gloo fails a collective at once when a peer's connection closes.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
# Gradients are summed in flat buckets of at most this many elements (fewer, larger collectives; bounded memory).
BUCKET_ELEMENTS = 1 << 25
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank among `size` processes, and its rank on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


_world = World()
_device = torch.device("cpu")  # where collectives' tensors live: the rank's GPU under NCCL


def from_env() -> World:
    """The world torchrun describes in the environment (a single process when it describes none)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str) -> World:
    """Join the run's process group (gloo on CPU, NCCL on CUDA) as the environment describes; nothing at all for a
    single process. `device` is the spec's: a CUDA rank computes on cuda:(its index + LOCAL_RANK)."""
    global _world, _device
    world = from_env()
    if world.size == 1:
        _world, _device = world, torch.device("cpu")
        return world
    import torch.distributed as dist

    _die_with_launcher()
    target = local_device(torch.device(device), world)
    if target.type == "cuda":
        torch.cuda.set_device(target)
        dist.init_process_group("nccl", rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=target)  # fmt: skip
    else:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT)
    _world, _device = world, target if target.type == "cuda" else torch.device("cpu")
    return world


def teardown() -> None:
    """Leave the process group (a no-op for a single process)."""
    global _world, _device
    if _world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _world, _device = World(), torch.device("cpu")


def world() -> World:
    return _world


def rank() -> int:
    return _world.rank


def size() -> int:
    return _world.size


def is_main() -> bool:
    """Whether this process speaks for the run (events, checkpoints, outputs): rank 0, or the only process."""
    return _world.rank == 0


def local_device(device: torch.device, of: World | None = None) -> torch.device:
    """The device this rank computes on: CUDA ranks each take their own GPU, counted from the spec's device
    (`cuda` or `cuda:K`: cuda:K+LOCAL_RANK); a CPU device is shared."""
    w = of or _world
    if device.type != "cuda" or w.size == 1:
        return device
    return torch.device("cuda", (device.index or 0) + w.local_rank)


def threads_per_process(requested: int | None) -> int | None:
    """Torch threads for this rank: the run's (`requested`, else every core this process may use) shared among the
    ranks on this machine, at least one each; unchanged (None: all cores) for a single process."""
    if _world.size == 1:
        return requested
    total = requested or len(os.sched_getaffinity(0)) or 1
    return max(1, total // _world.size)


def shard(items: Sequence[int], lengths: Sequence[int], of: World | None = None) -> list[int]:
    """This rank's share of a step's examples (`items`, indices into `lengths`): balanced in tokens, each example
    (longest first) going to the rank with the fewest tokens so far (the lowest rank on a tie). Deterministic, so
    the ranks' shares are disjoint and cover the step. A single process takes `items` as they are, in order."""
    w = of or _world
    if w.size == 1:
        return list(items)
    load = [0] * w.size
    mine: list[int] = []
    for i in sorted(items, key=lambda j: -lengths[j]):
        r = min(range(w.size), key=lambda q: load[q])
        load[r] += lengths[i]
        if r == w.rank:
            mine.append(i)
    return mine


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sums over the ranks of a few numbers (float64: counts stay exact up to 2**53)."""
    if _world.size == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (the stop flag: SIGTERM may reach the ranks a moment apart)."""
    if _world.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def min_over_ranks(value: int) -> int:
    """The smallest of the ranks' `value`s, on every rank (a number each measures, that all must agree on)."""
    if _world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=_device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    """Wait until every rank is here (after rank 0 saves a checkpoint, so none runs ahead of it)."""
    if _world.size == 1:
        return
    import torch.distributed as dist

    if _device.type == "cuda":
        dist.barrier(device_ids=[_device.index or 0])
    else:
        dist.barrier()


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over the ranks, in place, in flat buckets.

    A parameter without a gradient on some rank (that rank had no example touching it, e.g. no example at all in a
    short last step) takes part with zeros; one without a gradient on every rank stays without one, as it would in a
    single process (AdamW then leaves it, and its moments, alone).
    """
    if _world.size == 1:
        return
    import torch.distributed as dist

    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(live):
        grads = [p.grad for p in bucket if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank went away (gloo: its connection reset; NCCL:
    a DistError): the other rank's own error is in the run's log, not here."""
    import torch.distributed as dist

    text = str(exc).lower()
    return _world.size > 1 and (isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text)


def _buckets(params: Iterable[torch.nn.Parameter]) -> Iterable[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype and device, up to BUCKET_ELEMENTS elements a bucket."""
    bucket: list[torch.nn.Parameter] = []
    count = 0
    for p in params:
        if bucket and (count + p.numel() > BUCKET_ELEMENTS or p.dtype != bucket[0].dtype
                       or p.device != bucket[0].device):  # fmt: skip
            yield bucket
            bucket, count = [], 0
        bucket.append(p)
        count += p.numel()
    if bucket:
        yield bucket


def _die_with_launcher() -> None:
    """Ask Linux to SIGKILL this rank when its launcher dies. torchrun starts each rank in a session of its own, so a
    SIGKILL to torchrun (the executor's `kill`, the OOM killer) would otherwise leave the ranks training on, orphans
    (a SIGTERM is different: torchrun passes it on, and the ranks checkpoint and stop)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
