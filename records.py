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

A flat update (:class:`dpfl.flat.FlatTensors`, named views of one vector) is
snapshotted as one vector, its arrays views of that snapshot, and read back as one
vector too: one copy each way, not one per tensor, while the record is as it was built.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from dpfl.flat import FlatTensors, Layout

# Where a plain Array keeps its decoded tensor, beside the bytes it was decoded from.
_DECODED = "_dpfl_decoded"


class TensorArray(Array):
    """A Flower ``Array`` that holds its tensor and serialises it on first read of ``data``.

    :meth:`part_of` makes one that holds a stretch of a snapshot vector instead, its
    tensor (a view) made only when something reads it.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().clone()
        # Set directly: Array's setter would mark the (not yet built) bytes as changed.
        self.__dict__.update(dtype=_numpy_dtype_name(tensor.dtype), shape=tuple(tensor.shape), stype=SType.NUMPY,
                             _tensor=tensor)  # fmt: skip

    @classmethod
    def part_of(cls, vector: torch.Tensor, offset: int, shape: tuple[int, ...]) -> TensorArray:
        """The array of ``vector[offset : offset + ∏shape]`` viewed as ``shape``; ``vector`` is a
        snapshot no one else writes to (a flat update's, :func:`tensor_record`)."""
        array = cls.__new__(cls)
        array.__dict__.update(dtype=_numpy_dtype_name(vector.dtype), shape=tuple(shape), stype=SType.NUMPY,
                              _part=(vector, offset))  # fmt: skip
        return array

    def kept_tensor(self) -> torch.Tensor | None:
        """The tensor this array holds (made now from its stretch of a snapshot, if it has one
        and nothing has yet), or None once new bytes have replaced it."""
        # Never a pop-then-set: one round's arrays record is shared by all its messages, and
        # Flower's engine pickles them from several threads at once; a reader between the
        # two steps found neither and sent None. Two threads here make equal views.
        held = self.__dict__
        tensor = held.get("_tensor")
        if tensor is None and "_part" in held:
            vector, offset = held["_part"]
            tensor = held["_tensor"] = vector[offset : offset + math.prod(self.shape)].view(self.shape)
        return tensor

    @property
    def data(self) -> bytes:
        if "_data" not in self.__dict__:
            self.__dict__["_data"] = Array.from_torch_tensor(self.kept_tensor()).data
        return self.__dict__["_data"]

    @data.setter
    def data(self, value: bytes) -> None:
        # New bytes define the array from now on (Array.__setattr__ has reset its caches).
        self.__dict__["_data"] = value
        self.__dict__.pop("_tensor", None)
        self.__dict__.pop("_part", None)

    def __reduce__(self):
        # To another process (the in-process engine's workers) as a NumPy array: pickled
        # as its raw buffer, where a tensor's own pickling goes through torch.save.
        tensor = self.kept_tensor()
        if tensor is not None:
            return _tensor_array, (tensor.numpy(),)
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
        offsets = itertools.accumulate(layout.sizes, initial=0)
        # Straight into the record's dict: Flower's per-item type check (str key, Array value,
        # both certain here) builds typing aliases on every call and cost more than the arrays.
        record.__dict__["_data"].update((name, TensorArray.part_of(vector, offset, shape))
                                        for (name, shape), offset in zip(layout.shapes.items(), offsets))  # fmt: skip
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
    """A copy of the one vector whose consecutive stretches the record's arrays still hold, in
    the record's order and covering all of it (a record :func:`tensor_record` built from
    tensors of one dtype, no array replaced or given other bytes since); None for any other."""
    base, end = None, 0
    for array in record.values():
        stretch = _stretch(array)
        if stretch is None:
            return None
        vector, offset, size = stretch
        if base is None:
            base = vector
        if vector is not base or offset != end:
            return None
        end += size
    if base is None or end != base.numel():
        return None
    return FlatTensors(Layout.of({name: array.shape for name, array in record.items()}, base.dtype), base.clone())


def _stretch(array: Array) -> tuple[torch.Tensor, int, int] | None:
    """(the 1-D snapshot vector, offset, size) of the stretch of it that ``array`` holds, if it holds one."""
    held = array.__dict__
    if "_part" in held:
        vector, offset = held["_part"]
        return vector, offset, math.prod(array.shape)
    tensor = held.get("_tensor")
    base = tensor._base if tensor is not None else None
    if base is None or base.dim() != 1 or base.storage_offset() != 0 or not tensor.is_contiguous() \
            or tuple(tensor.shape) != tuple(array.shape):  # fmt: skip
        return None
    return base, tensor.storage_offset(), tensor.numel()


def _tensor_of(array: Array) -> torch.Tensor:
    kept = array.kept_tensor() if isinstance(array, TensorArray) else None
    if kept is not None:
        return kept
    data = array.data
    decoded = array.__dict__.get(_DECODED)
    if decoded is None or decoded[0] is not data:  # first read, or the bytes were replaced
        decoded = array.__dict__[_DECODED] = (data, torch.from_numpy(array.numpy()))
    return decoded[1]
