"""Data on the host or on disk, streamed to the devices one micro-batch at a time (:class:`HostData`).

A full-batch step normally slices its micro-batches out of ``data`` resident in device memory. With a
:class:`HostData`, each of the host loop's per-micro-batch programs receives its micro-batch's rows
as an argument instead (:class:`Rows`), read from the host-side source and put on the devices while
the program for the micro-batch before runs (:class:`Stream`): device memory holds at most two
micro-batches of data, and no compiled program sees more than one. The micro-batches, their masks
and weights are those of the in-memory step on the same rows and devices (:mod:`jaxbn.training.sweep`),
so the numbers are those of the host loop on the rows in device memory, bit for bit.

Row layout: with the rows split over ``d`` devices (``sharding``), device ``j`` holds block ``j`` of
``n / d`` rows, as ``jax.device_put(data, sharding)`` would put them, and each micro-batch takes
``m`` rows of every block (``micro_batch_size // d``, at least 1); the last one, when ``m`` does not
divide ``n / d``, re-reads rows of the one before and masks them. With several processes each
process's source holds its own devices' blocks, in the order of ``jaxbn.parallel.global_batch``, and
each process reads only those.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxbn._sharding import mesh_axis_names


class HostData:
  """A data set on the host (NumPy arrays, memory-mapped files, a Grain source) for a step to stream.

  ``full_batch_step``'s step (and :func:`jaxbn.training.sharpness`) take it in place of ``data``: every
  sweep over the micro-batches reads them from ``source`` and puts each on the devices while the one
  before is computed, so device memory holds the parameters, the optimizer state and at most two
  micro-batches, whatever the data set's size. The numbers are those of the step on the same rows
  in device memory (``jax.device_put(source, sharding)``). Streaming runs on the host loop
  (``loop="host"``, which ``loop="auto"`` picks for a ``HostData`` on every backend); exact batch norm
  reads the data once per sweep, ``2L + 1`` times per step for ``L`` batch-norm layers.

  Args:
    source: the rows, along the leading axis: a pytree of NumPy arrays sharing their leading
      dimension (``np.memmap`` and ``np.load(path, mmap_mode="r")`` arrays read only the rows a
      micro-batch needs), or any object with ``len(source)`` rows whose ``source[start:stop]``
      returns those rows as a pytree of arrays (e.g. a Grain data source that supports slices).
      With several processes: this process's own rows, as for ``jaxbn.parallel.global_batch``;
      every process builds its ``HostData`` at the same point (one small all-gather checks that
      they hold the same number of rows).
    sharding: where the micro-batches go: None (the default device), a ``jax.Device``, or a
      ``NamedSharding`` whose spec splits the leading axis over mesh axes (``P("batch")``), which
      must divide the rows evenly.

  Raises:
    ValueError: a source with no rows or leaves, leaves without a leading axis or whose leading
      dimensions differ, a sharding that splits anything but the rows or whose devices cannot split
      the rows evenly, or processes holding different numbers of rows.
    TypeError: a source that is neither NumPy arrays nor sliceable, a JAX array in it (already on a
      device: pass it to the step directly), or a sharding of another kind.

  Examples:
    >>> import numpy as np, jaxbn
    >>> data = jaxbn.training.HostData({"x": np.ones((10, 3), np.float32), "y": np.arange(10)})
    >>> len(data)
    10
  """

  def __init__(self, source: Any, *, sharding: Any = None) -> None:
    fn = "jaxbn.training.HostData"
    self.source = source
    self._sliced = _is_sliceable(source)
    local, example = _local_rows(fn, source, self._sliced)
    self.sharding, self.axes, local_blocks, blocks = _placement(fn, sharding)
    if local % local_blocks:
      raise ValueError(
        f"{fn}: the source holds {local} rows, which the {local_blocks} device(s) of sharding cannot split "
        f"evenly; give it a multiple of {local_blocks} rows (drop the last {local % local_blocks})."
      )
    self.blocks = blocks
    self.local_rows = local
    self.rows = _global_rows(fn, local // local_blocks) * blocks
    self._example = example  # one row: the micro-batches' structure, trailing shapes and dtypes
    self._local_blocks = _local_block_indices(self.sharding, blocks) if self.axes else [0]
    self._pending: dict[tuple[int, int], Any] = {}  # rows put on the devices ahead of their program

  def __len__(self) -> int:
    return self.rows

  def __repr__(self) -> str:
    return f"HostData({self.rows} rows in {self.blocks} block(s), source={type(self.source).__name__})"

  def read(self, start: int, size: int) -> Any:
    """Rows ``start .. start + size - 1`` of every block on the devices, as global arrays (asynchronous)."""
    key = (start, size)
    if key in self._pending:
      return self._pending.pop(key)
    per = self.local_rows // len(self._local_blocks)
    parts = [self._slice(b * per + start, b * per + start + size) for b in range(len(self._local_blocks))]
    local = parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: np.concatenate(a), *parts)
    if self.axes:
      return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(self.sharding, a, (self.blocks * size, *np.shape(a)[1:])),
        local,
      )
    return jax.device_put(local, self.sharding)

  def prefetch(self, start: int, size: int) -> None:
    """Starts putting rows ``start .. start + size - 1`` of every block on the devices, for :meth:`read`."""
    self._pending.clear()  # at most one micro-batch ahead
    self._pending[(start, size)] = self.read(start, size)

  def abstract(self, size: int) -> Any:
    """The types of :meth:`read`'s result (``jax.ShapeDtypeStruct`` with the sharding)."""
    sharding = self.sharding if self.axes else None
    return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((self.blocks * size, *np.shape(a)[1:]), a.dtype, sharding=sharding),
      self._example,
    )

  def take(self, indices: Any) -> Any:
    """The rows at ``indices`` (positions among all rows, in that order) on the devices, for one mini-batch.

    On the sharding's devices: split over them like the data where their number divides the rows taken,
    otherwise a copy on each. One process only: with several, a process holds its own rows alone.
    """
    indices = np.asarray(indices)
    if self._sliced:  # a source that only slices: one row at a time
      rows = [self._slice(int(i), int(i) + 1) for i in indices]
      local = jax.tree.map(lambda *a: np.concatenate(a), *rows)
    else:
      local = jax.tree.map(lambda a: np.asarray(a[indices]), self.source)
    if not self.axes:
      return jax.device_put(local, self.sharding)
    assert isinstance(self.sharding, NamedSharding)
    split = len(indices) % self.blocks == 0
    sharding = self.sharding if split else NamedSharding(self.sharding.mesh, PartitionSpec())
    return jax.device_put(local, sharding)

  def _slice(self, start: int, stop: int) -> Any:
    if self._sliced:
      rows = self.source[start:stop]
      got = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in jax.tree.leaves(rows)}
      if got != {stop - start} or jax.tree.structure(rows) != jax.tree.structure(self._example):
        raise ValueError(
          f"jaxbn.training.HostData: source[{start}:{stop}] returned {jax.tree.structure(rows)} with leading "
          f"sizes {sorted(got)}; expected {stop - start} rows of {jax.tree.structure(self._example)}."
        )
      return jax.tree.map(lambda a: _aligned_copy(a) if _misaligned(a) else a, jax.tree.map(np.asarray, rows))
    return jax.tree.map(lambda a: _copy_rows(a, start, stop), self.source)


@jax.tree_util.register_pytree_node_class
class Stream:
  """A :class:`HostData` as one step's sweeps read it: the micro-batch layout fixed, no arrays of its own.

  A pytree node without children, so it travels through the Python side of a step (``jax.jvp``
  included) as structure; the host loop replaces it by :meth:`micro_batch` ``i`` in the
  arguments of the program for micro-batch ``i`` (:mod:`jaxbn.training.loops`).

  Attributes:
    data: the host data.
    size: rows of each block in every micro-batch (``m``).
    count: micro-batches (``k``).
  """

  def __init__(self, data: HostData, size: int, count: int) -> None:
    self.data, self.size, self.count = data, size, count

  @property
  def rows(self) -> int:
    return self.data.rows

  @property
  def blocks(self) -> int:
    return self.data.blocks

  def tree_flatten(self) -> tuple[tuple[()], Stream]:
    return (), self

  @classmethod
  def tree_unflatten(cls, aux: Stream, children: Any) -> Stream:
    del children
    return aux

  def start(self, i: int) -> int:
    """The first row of micro-batch ``i`` in every block (the last one ends at the block's end)."""
    return min(i * self.size, self.rows // self.blocks - self.size)

  def micro_batch(self, i: int) -> Rows:
    """Micro-batch ``i``'s rows on the devices (already on their way if :meth:`prefetch` asked for them)."""
    return Rows(self.data.read(self.start(i), self.size), self.rows, self.blocks)

  def prefetch(self, i: int) -> None:
    """Starts putting the micro-batch after ``i`` on the devices (micro-batch 0 after the last, for the next
    sweep), while the program for ``i`` runs."""
    self.data.prefetch(self.start((i + 1) % self.count), self.size)

  def abstract(self) -> Rows:
    """The types of a micro-batch (``jax.ShapeDtypeStruct`` leaves), to trace the loss ahead of the data."""
    return Rows(self.data.abstract(self.size), self.rows, self.blocks)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Rows:
  """One micro-batch's rows already cut from the data (a program's argument), and the data's size.

  Attributes:
    batch: the micro-batch: ``blocks * m`` rows, ``m`` of each block, blocks in order.
    rows: the rows of the whole data set (all blocks, all processes).
    blocks: the blocks the rows are split into (devices along the data's mesh axes).
  """

  batch: Any
  rows: int
  blocks: int

  def tree_flatten(self) -> tuple[tuple[Any], tuple[int, int]]:
    return (self.batch,), (self.rows, self.blocks)

  @classmethod
  def tree_unflatten(cls, aux: tuple[int, int], children: Any) -> Rows:
    return cls(children[0], *aux)


class HostDataRouted:
  """A scanned-loop function ``fn(state, data, ...)`` (a step, a sharpness) that sends a :class:`HostData`, which
  only the host loop can stream, to the host-loop function ``streamed()`` builds at its first use
  (``loop="auto"``), or refuses it with a message naming the options (``streamed`` None).

  Everything else (``lower``, ``trace``, attributes) is ``fn``'s own.
  """

  loop: str

  def __init__(
    self, name: str, fn: Callable[..., Any], streamed: Callable[[], Callable[..., Any]] | None, requested: str
  ) -> None:
    functools.update_wrapper(self, fn)  # first: it copies fn's attributes, whose names may be these
    self._name, self._fn, self._streamed, self._requested = name, fn, streamed, requested
    self._host: Callable[..., Any] | None = None

  def __call__(self, state: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
    if not isinstance(data, HostData):
      return self._fn(state, data, *args, **kwargs)
    if self._streamed is None:
      how = "loop='scan'" if self._requested == "scan" else "axis_name=... or jit=False"
      raise ValueError(
        f"{self._name}: data is a jaxbn.training.HostData, which only the host loop can stream (it puts each "
        f"micro-batch on the devices from Python), and this function was built with {how}. Consider one of "
        "the following options:\n"
        "  1. build it with loop='host' or loop='auto' (and jit=True, no axis_name);\n"
        "  2. pass arrays already on the devices instead: jax.device_put(source, sharding)."
      )
    if self._host is None:
      self._host = self._streamed()
    return self._host(state, data, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._fn, name)


def is_stream(x: Any) -> bool:
  return isinstance(x, Stream)


def prefetch(tree: Any, i: int, running: Any) -> None:
  """Starts the transfer of the micro-batch after ``i`` of every :class:`Stream` in ``tree``, then waits for
  ``running`` (the results of the program for micro-batch ``i``): reading overlaps that program, and reads
  no further ahead, so the devices hold two micro-batches at most."""
  streams = [s for s in jax.tree.leaves(tree, is_leaf=is_stream) if is_stream(s)]
  for s in streams:
    s.prefetch(i)
  if streams:
    jax.block_until_ready(running)


def fed(tree: Any, i: int | None) -> Any:
  """``tree`` with every :class:`Stream` replaced by its micro-batch ``i`` (None: its abstract micro-batch)."""
  return jax.tree.map(
    lambda s: (s.abstract() if i is None else s.micro_batch(i)) if is_stream(s) else s, tree, is_leaf=is_stream
  )


def _copy_rows(a: np.ndarray, start: int, stop: int) -> np.ndarray:
  """Rows ``start .. stop - 1`` of ``a`` as an array of their own; read from a memory-mapped file, their pages
  leave this process's memory afterwards (the operating system's page cache keeps them for the next read), so
  that a pass over the file does not leave it all resident."""
  mapped = getattr(a, "_mmap", None)  # np.memmap's mapping (np.load(..., mmap_mode="r") returns one)
  if not isinstance(mapped, mmap.mmap):
    rows = np.asarray(a[start:stop])
    return _aligned_copy(rows) if _misaligned(rows) else rows
  rows = _aligned_copy(a[start:stop])
  if hasattr(mapped, "madvise") and a.flags.c_contiguous and a.ndim:
    base = np.frombuffer(mapped, np.uint8).ctypes.data
    row = a.strides[0]
    lo = a.ctypes.data - base + start * row
    hi = a.ctypes.data - base + stop * row
    lo -= lo % mmap.PAGESIZE
    if hi > lo:
      mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
  return rows


# On the CPU backend, jax.device_put uses an array's memory in place when it is aligned like this (one copy
# less than an unaligned array takes: the largest share of a streamed step's overhead there).
_ALIGNMENT = 64


def _misaligned(a: np.ndarray) -> bool:
  return a.ctypes.data % _ALIGNMENT != 0 or not a.flags.c_contiguous


def _aligned_copy(a: np.ndarray) -> np.ndarray:
  """A C-contiguous copy of ``a`` in memory aligned to ``_ALIGNMENT`` bytes."""
  raw = np.empty(a.nbytes + _ALIGNMENT, np.uint8)
  skip = -raw.ctypes.data % _ALIGNMENT
  out = raw[skip : skip + a.nbytes].view(a.dtype).reshape(a.shape)
  np.copyto(out, a)
  return out


def _is_sliceable(source: Any) -> bool:
  """Whether ``source`` is read by slicing it (an object with rows), rather than a pytree of NumPy arrays."""
  leaves = jax.tree.leaves(source)
  if leaves and all(isinstance(a, np.ndarray) for a in leaves):
    return False
  if any(isinstance(a, jax.Array) for a in leaves):
    raise TypeError(
      "jaxbn.training.HostData: source holds JAX arrays, which are already on a device; pass them to the step "
      "directly (as data), or give HostData their NumPy arrays (np.asarray) to stream them."
    )
  text = isinstance(source, (str, bytes))  # sliceable, but rows of characters are no data set
  if len(leaves) == 1 and hasattr(source, "__len__") and hasattr(source, "__getitem__") and not text:
    return True
  raise TypeError(
    "jaxbn.training.HostData: source must be a pytree of NumPy arrays sharing their leading (row) dimension "
    "(np.memmap and np.load(..., mmap_mode='r') arrays included), or an object with len(source) rows whose "
    f"source[start:stop] returns them as a pytree of arrays; got {type(source).__name__}."
  )


def _local_rows(fn: str, source: Any, sliced: bool) -> tuple[int, Any]:
  """This process's rows in ``source`` and one row of it (``[0:1]``), checked."""
  if sliced:
    n = len(source)
    if n == 0:
      raise ValueError(f"{fn}: source has no rows (len(source) == 0); a full-batch step needs at least one.")
    example = source[0:1]
    what = "source[0:1]"
  else:
    example, what = source, "source"
  leaves = jax.tree.leaves(example)
  if not leaves:
    raise ValueError(f"{fn}: {what} has no arrays; it must be a non-empty pytree of arrays with a leading row axis.")
  sizes = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
  if -1 in sizes:
    raise ValueError(f"{fn}: every leaf of {what} needs a leading (row) axis; a scalar leaf has none.")
  if len(sizes) != 1:
    raise ValueError(f"{fn}: the leaves of {what} disagree in their number of rows: leading sizes {sorted(sizes)}.")
  if not sliced:
    n = sizes.pop()
    if n == 0:
      raise ValueError(f"{fn}: source has no rows (every leaf's leading dimension is 0); a step needs at least one.")
    example = jax.tree.map(lambda a: np.asarray(a[:1]), source)
  elif sizes != {1}:
    raise ValueError(f"{fn}: source[0:1] returned {sorted(sizes)} rows, not 1: its slices must count rows.")
  return n, jax.tree.map(np.asarray, example)


def _placement(fn: str, sharding: Any) -> tuple[Any, tuple[str, ...], int, int]:
  """``(sharding, axes, local blocks, blocks)``: where the micro-batches go, the mesh axes their rows split
  over (none on one device), and the blocks of rows this process's devices and all devices hold."""
  if sharding is None:
    return jax.devices()[0], (), 1, 1
  if isinstance(sharding, jax.Device):
    return sharding, (), 1, 1
  if isinstance(sharding, SingleDeviceSharding):
    return next(iter(sharding.device_set)), (), 1, 1
  if not isinstance(sharding, NamedSharding):
    raise TypeError(
      f"{fn}: sharding must be None, a jax.Device or a NamedSharding that splits the rows over mesh axes "
      f"(NamedSharding(mesh, P('batch'))), got {type(sharding).__name__}."
    )
  spec = tuple(sharding.spec)
  if not spec or spec[0] is None or any(e is not None for e in spec[1:]):
    raise ValueError(
      f"{fn}: sharding must split the leading (row) axis over mesh axes and nothing else, e.g. "
      f"NamedSharding(mesh, P('batch')); got spec {sharding.spec}."
    )
  axes = mesh_axis_names(spec[0])
  blocks = math.prod(sharding.mesh.shape[a] for a in axes)
  return sharding, axes, len(_local_block_indices(sharding, blocks)), blocks


def _local_block_indices(sharding: NamedSharding, blocks: int) -> list[int]:
  """The blocks of rows (in global order) that this process's devices hold."""
  index = sharding.addressable_devices_indices_map((blocks,))
  return sorted({(s[0].start or 0) if s else 0 for s in index.values()})


def _global_rows(fn: str, per_block: int) -> int:
  """Rows per block, the same in every process (one small all-gather where there are several)."""
  if jax.process_count() == 1:
    return per_block
  from jax.experimental import multihost_utils

  counts = np.asarray(multihost_utils.process_allgather(np.array([per_block], np.int64))).ravel()
  if len(set(counts.tolist())) != 1 or not counts.all():
    raise ValueError(
      f"{fn}: the processes' sources hold different numbers of rows per device ({counts.tolist()}, one entry "
      "per process; 0: a process that holds no rows): each process must hold the same number of its own rows."
    )
  return per_block
