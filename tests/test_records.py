"""Tensors in Flower records: the same bytes for Flower's transport, own copies for every reader."""

from __future__ import annotations

import pickle

import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from dpfl.records import TensorArray, record_tensors, tensor_record

TENSORS = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float64), "steps": torch.tensor(7)}


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name])


def test_a_tensor_record_gives_flowers_transport_the_bytes_flower_would_make():
    kept, flowers = tensor_record(TENSORS), ArrayRecord(TENSORS)
    for name, array in kept.items():
        assert isinstance(array, TensorArray)
        expected = flowers[name]
        assert (array.dtype, array.shape, array.stype, array.data) == (
            expected.dtype, expected.shape, expected.stype, expected.data)  # fmt: skip
    assert kept.object_id == flowers.object_id  # what Flower's messages address and send
    assert_equal(kept.to_torch_state_dict(), TENSORS)
    # What a receiving Flower process rebuilds from the objects sent.
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(kept).items()}
    received = inflate_object_from_contents(kept.object_id, contents)
    assert type(received) is ArrayRecord and all(type(array) is Array for array in received.values())
    assert_equal(record_tensors(received), TENSORS)


def test_readers_get_their_own_copies_of_a_snapshot():
    for build in (tensor_record, ArrayRecord):
        source = {name: t.clone() for name, t in TENSORS.items()}
        record = build(source)
        source["w"].add_(1.0)  # the sender changes its tensor after building the record
        record_tensors(record)["w"].mul_(0)  # a reader changes what it got
        assert_equal(record_tensors(record), TENSORS)


def test_new_bytes_redefine_an_array():
    record = tensor_record(TENSORS)
    record["w"].data = Array(torch.ones(2)).data
    plain = ArrayRecord(TENSORS)
    record_tensors(plain)  # decoded once and kept beside the bytes
    plain["b"].data = Array(torch.zeros(3, dtype=torch.float64)).data
    assert torch.equal(record_tensors(record)["w"], torch.ones(2))
    assert torch.equal(record_tensors(plain)["b"], torch.zeros(3, dtype=torch.float64))


def test_a_tensor_record_crosses_to_another_process_as_tensors_not_bytes():
    record = tensor_record(TENSORS)
    copy = pickle.loads(pickle.dumps(record))
    assert all(isinstance(array, TensorArray) and "_data" not in array.__dict__ for array in copy.values())
    assert_equal(record_tensors(copy), TENSORS)


def test_one_record_pickled_from_many_threads_at_once_sends_every_array():
    # Flower's engine pickles a round's shared arrays record for each message from several
    # threads: a lazily made view must never be seen half made (it once arrived as None).
    import threading

    tensors = {f"layer{i}.weight": torch.randn(3, 5) for i in range(60)}
    for _ in range(20):
        record = tensor_record(tensors)
        start = threading.Barrier(8)
        sent: list[bytes] = []
        failures: list[BaseException] = []

        def send() -> None:
            start.wait()
            try:
                sent.append(pickle.dumps(record))
            except BaseException as error:  # noqa: BLE001 - the failure is the finding
                failures.append(error)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures
        for payload in sent:
            received = record_tensors(pickle.loads(payload))
            assert all(torch.equal(received[name], tensors[name]) for name in tensors)
