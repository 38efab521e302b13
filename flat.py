"""Named tensors as one contiguous vector, and back as named views.

A model update is a dict of some sixty small tensors; clipping, noise, screening and
the sum each looped over them, one float64 copy per tensor, and the dispatch cost more
than the arithmetic. Laid out as one vector, each is a few operations on the whole
update. :class:`Layout` records the names, shapes and dtypes of a model's tensors
(the order of its state dict) and where each sits in the vector; the named tensors a
strategy or Flower needs are views into it, not copies.

Pure tensor bookkeeping: no Flower, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

Tensors = Mapping[str, torch.Tensor]


class Layout:
    """Where each of some named tensors sits in one vector, in their (mapping) order.

    A leading batch shape is allowed (a vectorised cohort keeps one row per client).
    The vector's dtype is the tensors' own when they share one, else float64.
    """

    def __init__(self, tensors: Tensors) -> None:
        self.shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        self.dtypes = {name: t.dtype for name, t in tensors.items()}
        self.sizes = [math.prod(shape) for shape in self.shapes.values()]
        self.size = sum(self.sizes)
        kinds = set(self.dtypes.values())
        self.dtype = kinds.pop() if len(kinds) == 1 else torch.float64
        self.uniform = not kinds

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> Layout:
        """The layout of tensors of ``shapes`` (in order), all of ``dtype``, without the tensors."""
        layout = cls({})
        layout.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        layout.dtypes = dict.fromkeys(layout.shapes, dtype)
        layout.sizes = [math.prod(shape) for shape in layout.shapes.values()]
        layout.size, layout.dtype, layout.uniform = sum(layout.sizes), dtype, True
        return layout

    def __eq__(self, other: object) -> bool:
        """Same names, in the same order, with the same shapes and dtypes."""
        if not isinstance(other, Layout):
            return NotImplemented
        return list(self.shapes.items()) == list(other.shapes.items()) and self.dtypes == other.dtypes

    __hash__ = None  # mutable-looking: compared by value, never a key

    def flatten(self, tensors: Tensors) -> torch.Tensor:
        """The tensors (named as this layout's, any leading batch shape) as one vector [..., size]."""
        if isinstance(tensors, FlatTensors) and tensors.vector.dim() == 1 and tensors.layout == self:
            return tensors.vector  # already laid out as this layout's vector (never copied here)
        first = next(iter(self.shapes), None)
        if first is None:
            return torch.zeros(0, dtype=self.dtype)
        lead = tensors[first].shape[: tensors[first].dim() - len(self.shapes[first])]
        flat_shape = (*lead, -1)
        if self.uniform:  # one conversion of the whole, not one per tensor
            return torch.cat([tensors[name].reshape(flat_shape) for name in self.shapes], dim=-1).to(self.dtype)
        return torch.cat([tensors[name].reshape(flat_shape).to(self.dtype) for name in self.shapes], dim=-1)

    def views(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of ``vector`` [..., size] in its own dtype, without copying."""
        lead = vector.shape[:-1]
        parts = vector.split(self.sizes, dim=-1)
        return {name: part.view((*lead, *shape)) for (name, shape), part in zip(self.shapes.items(), parts)}

    def cast(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` rounded as the named tensors hold it: in their dtype when they share
        one, else each part through its own dtype (kept in float64)."""
        if self.uniform:
            return vector.to(self.dtype)
        return self.flatten({name: t.to(self.dtypes[name]) for name, t in self.views(vector).items()})

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named tensors of ``vector`` in their own dtypes: views when they share ``vector``'s."""
        named = self.views(self.cast(vector))
        return named if self.uniform else {name: t.to(self.dtypes[name]) for name, t in named.items()}


class FlatTensors(Mapping[str, torch.Tensor]):
    """Named tensors that are views of one vector of a (uniform-dtype) :class:`Layout`.

    What a flat update travels as: a strategy or Flower reads it by name, and the
    mechanism (:meth:`Layout.flatten`) takes its vector as it is, without one copy per
    tensor. Read-only as a mapping (a name cannot be rebound to another tensor, which
    would leave the vector behind); writing into a view writes into the vector.
    """

    def __init__(self, layout: Layout, vector: torch.Tensor) -> None:
        if not layout.uniform or vector.shape != (layout.size,) or vector.dtype != layout.dtype:
            raise ValueError(f"a vector of shape {tuple(vector.shape)} and dtype {vector.dtype} is not "
                             f"the layout's ({layout.size},) {layout.dtype}")  # fmt: skip
        self.layout = layout
        self.vector = vector
        self._views: dict[str, torch.Tensor] | None = None  # made on first read by name
        self._norm: tuple[int, float] | None = None  # (the vector's version, its norm)

    def norm(self) -> float:
        """‖vector‖ in float64, computed once while the vector is unchanged: any in-place
        write, through the vector or a view of it, moves its version counter."""
        if self._norm is None or self._norm[0] != self.vector._version:
            self._norm = (self.vector._version, float(torch.linalg.vector_norm(self.vector.double())))
        return self._norm[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._views is None:
            self._views = self.layout.views(self.vector)
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.shapes)

    def __len__(self) -> int:
        return len(self.layout.shapes)


def flat_tensors(layout: Layout, vector: torch.Tensor) -> Tensors:
    """``vector`` as named tensors: views of it (:class:`FlatTensors`) when the layout has
    one dtype, else each part in its own dtype (:meth:`Layout.unflatten`)."""
    vector = layout.cast(vector)
    return FlatTensors(layout, vector) if layout.uniform else layout.unflatten(vector)


def float64_norm(tensors: Tensors, layout: Layout | None = None) -> float:
    """The L2 norm of ``tensors`` as one vector (``layout``'s, default their own), in float64;
    a flat update's computed once (:meth:`FlatTensors.norm`)."""
    if isinstance(tensors, FlatTensors) and (layout is None or tensors.layout == layout):
        return tensors.norm()
    return float(torch.linalg.vector_norm((layout or Layout(tensors)).flatten(tensors).double()))
