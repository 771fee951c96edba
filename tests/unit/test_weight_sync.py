"""The collective weight-sync protocol over a real gloo group, one thread per rank in this process."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from rltrain.dist.weight_sync import SyncChannel, receive_weights, send_weights

WEIGHTS = {
    "embed.weight": torch.randn(7, 5),
    "norm.weight": torch.randn(5, dtype=torch.bfloat16),
    "scalar": torch.tensor(3.5, dtype=torch.float64),
    "steps": torch.arange(3, dtype=torch.int64),
    "empty": torch.zeros(0, 4),
    "transposed": torch.randn(4, 3).t(),  # not contiguous
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_group(world_size: int, sender, receiver) -> dict[int, object]:
    """Rank 0 runs ``sender(channel)``, the others ``receiver(channel)``; returns each rank's result or exception."""
    address = ("127.0.0.1", free_port())
    results: dict[int, object] = {}

    def member(rank: int) -> None:
        channel = SyncChannel(address, rank, world_size, "gloo", timeout_s=20)
        try:
            results[rank] = sender(channel) if rank == 0 else receiver(channel)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[rank] = exc

    threads = [threading.Thread(target=member, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank hung"
    return results


def received_copy(channel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in receive_weights(channel)}


@pytest.mark.parametrize("bucket_bytes", [1, 64, 1 << 20])
def test_every_receiver_gets_every_tensor_bit_exact(bucket_bytes):
    results = run_group(3, lambda ch: send_weights(ch, WEIGHTS.items(), bucket_bytes), received_copy)
    stats = results[0]
    assert stats.tensors == len(WEIGHTS)
    # bucket_bytes=1: every tensor alone (the bigger-than-bucket rule); 1 MiB: all in one bucket.
    assert stats.buckets == {1: len(WEIGHTS), 64: 3, 1 << 20: 1}[bucket_bytes]
    for rank in (1, 2):
        got = results[rank]
        assert list(got) == list(WEIGHTS)
        for name, tensor in WEIGHTS.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
            assert torch.equal(got[name], tensor)


def test_a_receiver_whose_load_fails_still_drains_so_nobody_hangs():
    from rltrain.dist.weight_sync import drain

    def failing_load(channel):
        stream = receive_weights(channel)
        try:
            next(stream)
            raise KeyError("unknown parameter")
        finally:
            drain(stream)

    results = run_group(3, lambda ch: send_weights(ch, WEIGHTS.items(), 1), failing_load)
    assert results[0].tensors == len(WEIGHTS)
    assert isinstance(results[1], KeyError) and isinstance(results[2], KeyError)


def test_two_syncs_in_a_row_stay_in_step():
    second = {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in WEIGHTS.items()}

    def send_twice(channel):
        send_weights(channel, WEIGHTS.items(), 64)
        return send_weights(channel, second.items(), 64)

    results = run_group(2, send_twice, lambda ch: (received_copy(ch), received_copy(ch)))
    first_got, second_got = results[1]
    assert all(torch.equal(first_got[n], WEIGHTS[n]) for n in WEIGHTS)
    assert all(torch.equal(second_got[n], second[n]) for n in second)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="world_size"):
        SyncChannel(("127.0.0.1", free_port()), 0, 1, "gloo", 5)
    with pytest.raises(ValueError, match="bucket_bytes"):
        send_weights(None, [], 0)
