"""Tensors in Flower ``ArrayRecord``s, turned into bytes only when a transport needs bytes.

Flower's ``Array`` serialises a tensor with ``np.save`` when it is built, and
``ArrayRecord.to_torch_state_dict`` parses every array back with ``np.load`` (its
header through ``ast.literal_eval``). For a small model that per-array work cost
more than a client's training whenever sender and receiver share a process (the
in-process engine). :func:`tensor_record` builds a record whose arrays keep their
tensor and produce their bytes only when something reads them (Flower's own
transport, which still gets exactly the bytes it would have got);
:func:`record_tensors` reads any record back, from the kept tensors when it has
them, else from the bytes, decoded once per array and bytes object.

Either way each side gets its own copy, as a serialising transport would give it:
a record snapshots its tensors when it is built, and every reader gets fresh
tensors, so no reader can change what the sender or another reader holds.
Neither function knows or asks which engine carries the record.

A flat update (:class:`dpfl.privacy.flat.FlatTensors`, named views of one vector) is
snapshotted as one vector, its arrays views of that snapshot, and read back as one
vector too: one copy each way, not one per tensor, while the record is as it was built.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from dpfl.privacy.flat import FlatTensors, Layout

# Where a plain Array keeps its decoded tensor, beside the bytes it was decoded from.
_DECODED = "_dpfl_decoded"


class TensorArray(Array):
    """A Flower ``Array`` that holds its tensor and serialises it on first read of ``data``."""

    def __init__(self, tensor: torch.Tensor, snapshot: bool = True) -> None:
        # ``snapshot`` False: ``tensor`` is already a copy no one else holds (a view of a flat snapshot).
        tensor = tensor.detach().cpu().clone() if snapshot else tensor
        # Set directly: Array's setter would mark the (not yet built) bytes as changed.
        self.__dict__.update(dtype=_numpy_dtype_name(tensor.dtype), shape=tuple(tensor.shape), stype=SType.NUMPY,
                             _tensor=tensor)  # fmt: skip

    @property
    def data(self) -> bytes:
        if "_data" not in self.__dict__:
            self.__dict__["_data"] = Array.from_torch_tensor(self.__dict__["_tensor"]).data
        return self.__dict__["_data"]

    @data.setter
    def data(self, value: bytes) -> None:
        # New bytes define the array from now on (Array.__setattr__ has reset its caches).
        self.__dict__["_data"] = value
        self.__dict__.pop("_tensor", None)

    def __reduce__(self):
        # To another process (the in-process engine's workers) as a NumPy array: pickled
        # as its raw buffer, where a tensor's own pickling goes through torch.save.
        if "_tensor" in self.__dict__:
            return _tensor_array, (self.__dict__["_tensor"].numpy(),)
        return Array, (self.dtype, self.shape, self.stype, self.data)


# Flower's transport names an object by its class's qualified name and rebuilds it as the
# class registered under that name: on the wire a TensorArray is an Array.
TensorArray.__qualname__ = Array.__qualname__


def _tensor_array(values: np.ndarray) -> TensorArray:
    # Unpickled from another process's buffer (Ray's), the array may be read-only, which
    # torch warns about wrapping; copied then (TensorArray keeps a copy of its own anyway).
    return TensorArray(torch.from_numpy(values if values.flags.writeable else values.copy()))


@functools.cache
def _numpy_dtype_name(dtype: torch.dtype) -> str:
    """What Flower's ``Array`` records as the dtype of a tensor of ``dtype`` (e.g. "float32")."""
    return str(torch.empty(0, dtype=dtype).numpy().dtype)


def tensor_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``tensors`` (snapshotted now), serialised only if a transport asks.

    Tensors of one dtype (a model's) are snapshotted as one vector, the arrays views of it,
    so that :func:`record_tensors` reads them back as one copy too."""
    record = ArrayRecord()
    layout = tensors.layout if isinstance(tensors, FlatTensors) else Layout(tensors)
    if layout.uniform and layout.shapes:
        vector = tensors.vector.detach().cpu().clone() if isinstance(tensors, FlatTensors) else (
            layout.flatten({name: t.detach() for name, t in tensors.items()}).cpu())  # a new tensor: torch.cat's
        snapshot = FlatTensors(layout, vector)
        # Straight into the record's dict: Flower's per-item type check (str key, Array value,
        # both certain here) builds typing aliases on every call and cost more than the arrays.
        record.__dict__["_data"].update((name, TensorArray(t, snapshot=False)) for name, t in snapshot.items())
        return record
    for name, tensor in tensors.items():
        record[name] = TensorArray(tensor)
    return record


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor] | FlatTensors:
    """The record's arrays as tensors of the caller's own, like ``to_torch_state_dict``
    (a flat update's as one copy of its vector, while its arrays are as they were built)."""
    flat = _flat_snapshot(record)
    if flat is not None:
        return flat
    return {name: _tensor_of(array).clone() for name, array in record.items()}


def _flat_snapshot(record: ArrayRecord) -> FlatTensors | None:
    """A copy of the one vector whose consecutive views the record's arrays still hold, in
    the record's order and covering all of it (a record :func:`tensor_record` built from a
    flat update, no array replaced or given other bytes since); None for any other record."""
    tensors = [array.__dict__.get("_tensor") for array in record.values()]
    base = tensors[0]._base if tensors and tensors[0] is not None else None
    if base is None or base.dim() != 1:
        return None
    offset = base.storage_offset()
    for tensor in tensors:
        if tensor is None or tensor._base is not base or tensor.storage_offset() != offset or not tensor.is_contiguous():
            return None
        offset += tensor.numel()
    if offset != base.storage_offset() + base.numel():
        return None
    return FlatTensors(Layout(dict(zip(record.keys(), tensors))), base.clone())


def _tensor_of(array: Array) -> torch.Tensor:
    if "_tensor" in array.__dict__:
        return array.__dict__["_tensor"]
    data = array.data
    decoded = array.__dict__.get(_DECODED)
    if decoded is None or decoded[0] is not data:  # first read, or the bytes were replaced
        decoded = array.__dict__[_DECODED] = (data, torch.from_numpy(array.numpy()))
    return decoded[1]
