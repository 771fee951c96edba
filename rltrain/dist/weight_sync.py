"""Collective weight sync: the learner's exporting rank broadcasts HF-named tensors to every rollout worker.

One stateless torch.distributed group per run (rank 0 = the learner rank that exports, ranks 1..N = the
rollout workers) on its own ``TCPStore``, so it lives beside the default groups that vLLM and DeepSpeed
create in the same processes instead of replacing them. NCCL between GPUs; gloo on CPU, which runs the same
protocol, so CI exercises it.

Protocol of one sync: the sender cuts the stream of tensors into buckets of at most ``bucket_bytes``; a
bucket is a size broadcast (int64 ``[header bytes, payload bytes]``), a header broadcast (JSON list of
``[name, dtype, shape, offset, nbytes]`` as uint8) and one uint8 payload broadcast; sizes ``[0, 0]`` end
the sync. Receivers need no plan in advance, and a learner whose export is itself a stream (DeepSpeed
ZeRO-3 gathers bucket by bucket) holds at most one bucket on either side.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import socket
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

_ALIGN = 16  # every tensor starts 16-byte aligned in the payload, so a uint8 slice can be viewed as its dtype


@dataclasses.dataclass
class SyncStats:
    """What one sync moved: tensors, buckets, payload bytes (the sender's view)."""

    tensors: int = 0
    buckets: int = 0
    bytes: int = 0


def free_address() -> tuple[str, int]:
    """(this node's IP, a free port) for the sync group's store, hosted by the sender."""
    import ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class SyncChannel:
    """One process's member of the sync group: ``broadcast`` from rank 0 on ``device``.

    ``backend`` is ``nccl`` (tensors on this process's current CUDA device) or ``gloo`` (CPU). Every
    collective fails after ``timeout_s`` instead of hanging when a peer has died.
    """

    def __init__(self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float):
        import torch.distributed as dist

        if world_size < 2 or not 0 <= rank < world_size:
            raise ValueError(f"sync group: need 0 <= rank < world_size and world_size >= 2, got {rank}/{world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        host, port = address
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        elif backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            raise ValueError(f"sync group: backend must be gloo or nccl, got {backend!r}")
        self._store = store  # the group keeps using the store; it must outlive it
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, tensor: Tensor) -> None:
        """In place: rank 0's ``tensor`` overwrites everyone else's (same shape and dtype everywhere)."""
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def close(self) -> None:
        """Release the group (best effort: a peer may already be gone)."""
        group = self.__dict__.pop("group", None)
        if group is not None and hasattr(group, "abort"):
            try:
                group.abort()
            except RuntimeError:
                pass


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _send_bucket(channel: SyncChannel, bucket: list[tuple[str, Tensor]]) -> int:
    """Pack ``bucket`` into one uint8 payload and broadcast sizes, header and payload; returns payload bytes."""
    layout, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        layout.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, nbytes])
        offset += _aligned(nbytes)
    payload = torch.empty(offset, dtype=torch.uint8, device=channel.device)
    for (_, tensor), (_, _, _, start, nbytes) in zip(bucket, layout):
        payload[start : start + nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    header = torch.frombuffer(bytearray(json.dumps(layout).encode()), dtype=torch.uint8).to(channel.device)
    channel.broadcast(torch.tensor([header.numel(), offset], dtype=torch.int64, device=channel.device))
    channel.broadcast(header)
    channel.broadcast(payload)
    return offset


def send_weights(channel: SyncChannel, named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> SyncStats:
    """Rank 0: broadcast every (name, tensor) in buckets of at most ``bucket_bytes`` (a bigger tensor goes alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    stats = SyncStats()
    bucket: list[tuple[str, Tensor]] = []
    filled = 0
    for name, tensor in named_tensors:
        size = _aligned(tensor.numel() * tensor.element_size())
        if bucket and filled + size > bucket_bytes:
            stats.bytes += _send_bucket(channel, bucket)
            stats.buckets += 1
            bucket, filled = [], 0
        bucket.append((name, tensor))
        filled += size
        stats.tensors += 1
    if bucket:
        stats.bytes += _send_bucket(channel, bucket)
        stats.buckets += 1
    channel.broadcast(torch.zeros(2, dtype=torch.int64, device=channel.device))
    return stats


def receive_weights(channel: SyncChannel) -> Iterator[tuple[str, Tensor]]:
    """Ranks > 0: yield (name, tensor) as buckets arrive, until the sender's end marker.

    The tensors of a bucket are views of its payload on ``channel.device``; a consumer that keeps them
    beyond the next bucket keeps that payload alive.
    """
    while True:
        sizes = torch.zeros(2, dtype=torch.int64, device=channel.device)
        channel.broadcast(sizes)
        header_bytes, payload_bytes = (int(v) for v in sizes.tolist())
        if header_bytes == 0:
            return
        header = torch.empty(header_bytes, dtype=torch.uint8, device=channel.device)
        channel.broadcast(header)
        payload = torch.empty(payload_bytes, dtype=torch.uint8, device=channel.device)
        channel.broadcast(payload)
        for name, dtype, shape, start, nbytes in json.loads(header.cpu().numpy().tobytes()):
            yield name, payload[start : start + nbytes].view(getattr(torch, dtype)).reshape(shape)


def drain(stream: Iterator) -> None:
    """Receive the rest of a sync without using it: the sender and the other receivers broadcast to the end
    regardless of what this process does with the tensors."""
    for _ in stream:
        pass


class _SyncMember:
    """An actor's membership of the sync group: its channel, opened and closed by the driver."""

    sync_channel: SyncChannel | None = None

    def _join(self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float) -> bool:
        self.close_weight_sync()
        self.sync_channel = SyncChannel(address, rank, world_size, backend, timeout_s)
        return True

    def close_weight_sync(self) -> None:
        if self.sync_channel is not None:
            self.sync_channel.close()
            self.sync_channel = None


class WeightSender(_SyncMember):
    """Learner-actor mixin (``self.learner`` has ``export_weights()``): rank 0 of the sync group.

    Every learner rank runs ``broadcast_weights``, because exporting is collective under ZeRO-3; only the
    rank that opened the group sends.
    """

    def weight_sync_address(self) -> tuple[str, int]:
        return free_address()

    def open_weight_sync(self, address: tuple[str, int], world_size: int, backend: str, timeout_s: float) -> bool:
        return self._join(address, 0, world_size, backend, timeout_s)

    def broadcast_weights(self, bucket_mb: int) -> dict[str, int]:
        weights = iter(self.learner.export_weights())
        if self.sync_channel is None:
            drain(weights)  # a DeepSpeed rank other than 0: takes part in the parameter gathers only
            return {}
        try:
            return dataclasses.asdict(send_weights(self.sync_channel, weights, bucket_mb << 20))
        except Exception:
            drain(weights)  # finish the export's own collectives so the other learner ranks are not left waiting
            raise


class WeightReceiver(_SyncMember):
    """Rollout-actor mixin (``self.generator`` is a Generator): rank ``1 + slot`` of the sync group."""

    def open_weight_sync(
        self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float
    ) -> bool:
        return self._join(address, rank, world_size, backend, timeout_s)

    def receive_weights(self, version: int) -> int:
        """Load the broadcast weights as version ``version``; returns the engine's policy version."""
        if self.sync_channel is None:
            raise RuntimeError("receive_weights: this rollout worker has not joined a weight-sync group")
        stream = receive_weights(self.sync_channel)
        try:
            self.generator.load_weights(stream, version)
        finally:
            drain(stream)  # a load that failed part-way still receives the rest, so no peer blocks
        return self.generator.policy_version
