"""Helpers shared by the examples: devices, data, checkpoints, progress bars, tables and plots.

Nothing here is part of jaxbn; copy what you need. Importing this module does not initialise JAX's
backend, so :func:`use_devices` can still create virtual CPU devices when called first in ``main``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# Published MNIST-1D test accuracies (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D",
# ICML 2024), in percent.
MNIST1D_PUBLISHED = (
  ("logistic regression", 32.0),
  ("MLP", 68.0),
  ("CNN", 94.0),
  ("GRU", 91.0),
  ("human", 96.0),
)


def output_dir(name: str, out: str | os.PathLike | None) -> pathlib.Path:
  """The folder an example writes to (``runs/<name>/`` by default), created if missing."""
  path = pathlib.Path("runs", name) if out is None else pathlib.Path(out)
  path.mkdir(parents=True, exist_ok=True)
  return path


def use_devices(n: int) -> list[Any]:
  """The first ``n`` JAX devices; on CPU, ``n`` virtual devices are created if JAX has not started yet.

  Args:
    n: number of devices wanted, >= 1.

  Returns:
    A list of ``n`` devices.

  Raises:
    ValueError: fewer than ``n`` devices exist and JAX's backend is already initialised.
  """
  import jax

  if n < 1:
    raise ValueError(f"--devices must be >= 1, got {n}.")
  if n > 1:
    try:
      # Only possible before the first JAX operation; afterwards JAX raises RuntimeError and the
      # devices that exist are all there is.
      jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
    except RuntimeError:
      pass
  devices = jax.devices()
  if len(devices) < n:
    raise ValueError(
      f"--devices {n} asked for more devices than JAX has ({len(devices)} {devices[0].platform} device(s)). "
      "Consider one of the following options: 1. pass --devices "
      f"{len(devices)} or fewer; 2. run the script in a fresh process, so that it can create virtual CPU "
      f"devices; 3. set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python."
    )
  return devices[:n]


def parallel_devices(n: int | None = None) -> list[Any]:
  """Devices for a multi-device demonstration: the accelerators when there are enough, else virtual CPUs.

  Args:
    n: number of devices, >= 1; None for all accelerators when at least two are present, else 8.

  Returns:
    A list of ``n`` devices of one platform: the default backend's when it is not the CPU and has
    ``n`` (or, for None, at least two) devices, otherwise CPU devices (virtual ones are created if
    JAX has not started yet).

  Raises:
    ValueError: ``n < 1``, or fewer than ``n`` CPU devices exist and JAX's backend is already initialised.
  """
  import jax

  if n is not None and n < 1:
    raise ValueError(f"--devices must be >= 1, got {n}.")
  try:
    # Only possible before the first JAX operation; it affects the CPU backend alone.
    jax.config.update("jax_num_cpu_devices", max(n or 8, jax.config.jax_num_cpu_devices))
  except RuntimeError:
    pass
  default = jax.devices()
  if default[0].platform != "cpu" and len(default) >= (n or 2):
    return default[: n or len(default)]
  cpus = jax.devices("cpu")
  if len(cpus) < (n or 8):
    raise ValueError(
      f"--devices {n or 8} asked for more CPU devices than JAX has ({len(cpus)}). Consider one of the "
      f"following options: 1. pass --devices {len(cpus)} or fewer; 2. run the script in a fresh process, so "
      f"that it can create virtual CPU devices; 3. set XLA_FLAGS=--xla_force_host_platform_device_count={n or 8} "
      "before starting Python."
    )
  return cpus[: n or 8]


def load_mnist1d() -> dict[str, np.ndarray]:
  """MNIST-1D built locally: 4000 train and 1000 test sequences of length 40, float32 / int32.

  The data set is the published one (``mnist1d``'s default arguments, seed 42). It is built once per
  process (about 1-2 s) and the arrays are read-only. ``mnist1d.data.make_dataset`` reseeds NumPy's
  global random generator; its state is restored afterwards so that the caller's NumPy randomness is
  unaffected.

  Returns:
    A dict with ``x`` (4000, 40), ``y`` (4000,), ``x_test`` (1000, 40) and ``y_test`` (1000,).
  """
  return dict(_build_mnist1d())


@functools.cache
def _build_mnist1d() -> dict[str, np.ndarray]:
  from mnist1d.data import get_dataset_args, make_dataset

  rng_state = np.random.get_state()  # noqa: NPY002 (mnist1d uses the legacy global RNG)
  try:
    data = make_dataset(get_dataset_args())
  finally:
    np.random.set_state(rng_state)  # noqa: NPY002
  arrays = {
    "x": np.asarray(data["x"], np.float32),
    "y": np.asarray(data["y"], np.int32),
    "x_test": np.asarray(data["x_test"], np.float32),
    "y_test": np.asarray(data["y_test"], np.int32),
  }
  for a in arrays.values():
    a.flags.writeable = False
  return arrays


class UnreadableCheckpoint(Exception):
  """A checkpoint whose arrays do not match the digest recorded when it was written."""


def _digest(tree: Any) -> str:
  """SHA-256 of a pytree's leaves: dtypes, shapes and bytes, in order."""
  import jax

  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


class Checkpoints:
  """The last few checkpoints of a run, in ``<out>/checkpoints/<step>/``, with Orbax's CheckpointManager.

  A checkpoint holds one pytree of arrays (``state``: whatever the run needs to continue exactly, e.g.
  the training state and the metrics so far) and a JSON record (``meta``): the run's configuration,
  which a resuming run must match, and a SHA-256 digest of the arrays, which catches damage that
  Orbax would read back without complaint. Orbax writes a checkpoint into a temporary folder and
  renames it once complete, so a run killed at any moment leaves whole checkpoints only (the
  temporary folder of an interrupted save is removed when the next run opens the folder).

  Args:
    out: the run's output folder.
    config: the settings that determine the run's numbers, as ``{argparse dest: value}`` (JSON types).
    every: save every this many steps, >= 1; the last step is saved too.
    keep: how many of the newest checkpoints to keep.
    fresh: delete the run's existing checkpoints first.
  """

  def __init__(self, out: os.PathLike, config: dict[str, Any], *, every: int, keep: int = 3, fresh: bool = False):
    import orbax.checkpoint as ocp

    self.directory = pathlib.Path(out, "checkpoints").absolute()
    self.config = json.loads(json.dumps(config))  # as it reads back: tuples become lists
    self.every = every
    if fresh and self.directory.exists():
      shutil.rmtree(self.directory)
      print(f"--fresh: deleted the checkpoints in {self.directory}")
    # Synchronous saves: a jitted step that donates the state's buffers must not run while a save
    # still reads them (a small model's checkpoint takes ~0.1 s).
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, *, last: bool = False) -> bool:
    """Saves ``state`` as the checkpoint of ``step`` if ``step`` is a multiple of ``every`` or ``last``.

    Returns:
      Whether a checkpoint was written; it is on disk when the call returns.
    """
    import orbax.checkpoint as ocp

    if step % self.every and not last:
      return False
    meta = {"config": self.config, "step": step, "digest": _digest(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=True)

  def restore(self, like: Any) -> tuple[int, Any] | None:
    """The newest checkpoint that reads back intact, as ``(step, state)``; None when there is none.

    A checkpoint that cannot be restored (truncated, missing files, digest mismatch) is reported and
    the one before it is tried; once one is restored, the unreadable newer ones are moved to
    ``<out>/checkpoints_unreadable/`` so that the run can write those steps again.

    Args:
      like: a pytree with the saved state's structure, shapes, dtypes and shardings.

    Raises:
      ValueError: the checkpoints were written with another configuration, or none of them can be restored.
    """
    import jax
    import orbax.checkpoint as ocp

    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    unreadable = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as err:  # Orbax and TensorStore raise many types for a damaged file
        unreadable.append(self._report(step, err))
        continue
      self._check_config(step, meta.get("config"))
      try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        state = self._manager.restore(step, args=args)["state"]
        if _digest(state) != meta["digest"]:
          raise UnreadableCheckpoint("its arrays differ from those it was written with")
      except Exception as err:
        unreadable.append(self._report(step, err))
        continue
      aside = self.directory.with_name("checkpoints_unreadable")
      for bad in unreadable:
        aside.mkdir(exist_ok=True)
        shutil.rmtree(aside / str(bad), ignore_errors=True)
        shutil.move(self.directory / str(bad), aside / str(bad))
        print(f"moved the unreadable checkpoint of step {bad} to {aside / str(bad)}")
      self._manager.reload()
      return step, state
    if unreadable:
      self.close()
      raise ValueError(
        f"None of the checkpoints in {self.directory} (steps {sorted(unreadable)}) can be restored. Consider one of "
        "the following options: 1. pass --fresh to delete them and start over; 2. pass another --out."
      )
    return None

  def _report(self, step: int, err: Exception) -> int:
    reason = (str(err).strip().splitlines() or [""])[0]
    reason = reason if len(reason) <= 200 else reason[:200] + "..."
    print(
      f"the checkpoint of step {step} in {self.directory} cannot be restored ({type(err).__name__}: {reason}); "
      "trying the previous one"
    )
    return step

  def _check_config(self, step: int, saved: Any) -> None:
    if saved == self.config:
      return
    self.close()
    saved = saved if isinstance(saved, dict) else {}
    flag = lambda k, v: f"--{k.replace('_', '-')} {v}"
    keys = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
    raise ValueError(
      f"The checkpoint of step {step} in {self.directory} was written by a run with "
      f"{' '.join(flag(k, saved.get(k)) for k in keys)}; this run has "
      f"{' '.join(flag(k, self.config.get(k)) for k in keys)}. Consider one of the following options: 1. rerun "
      "with the checkpoint's settings to resume it; 2. pass --fresh to delete its checkpoints and start over; "
      "3. pass another --out."
    )

  def close(self) -> None:
    """Waits for pending work and releases Orbax's resources."""
    self._manager.close()


def progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool = True, initial: int = 0) -> Any:
  """A tqdm progress bar over ``iterable`` (or ``iterable`` itself when disabled), starting at ``initial``."""
  from tqdm.auto import tqdm

  return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with right-aligned columns except the first."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

  def line(row):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """The lines of a Markdown table: ``| a | b |`` rows under a header and its rule."""
  line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
  return [line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]


def pyplot():
  """matplotlib's pyplot on the non-interactive Agg backend (works without a display)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_curve(
  path: os.PathLike,
  curves: dict[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
  *,
  title: str,
  xlabel: str = "step",
  ylabel: str,
  logy: bool = False,
  hlines: dict[str, float] | None = None,
  markers: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> pathlib.Path:
  """Writes a PNG with one line per entry of ``curves``, plus optional labelled horizontal lines and markers.

  Each curve is either its y values (plotted at x = 0, 1, ...) or an ``(xs, ys)`` pair; each entry of
  ``markers`` is an ``(xs, ys)`` pair drawn as unconnected points (listed in the legend even when empty).
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  for label, curve in curves.items():
    xs, ys = curve if isinstance(curve, tuple) else (np.arange(len(curve)), curve)
    ax.plot(np.asarray(xs), np.asarray(ys, np.float64), label=label, linewidth=1.5)
  styles = ("--", ":", "-.", (0, (5, 1, 1, 1)))
  for i, (label, y) in enumerate((hlines or {}).items()):
    ax.axhline(y, linestyle=styles[i % len(styles)], linewidth=1.0, color="gray", label=label)
  for i, (label, (xs, ys)) in enumerate((markers or {}).items()):
    color = f"C{(len(curves) + i) % 10}"  # after the curves' colors
    ax.scatter(
      np.asarray(xs), np.asarray(ys, np.float64), marker="ov^sD"[i % 5], s=24, zorder=3, color=color, label=label
    )
  if logy:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if len(curves) + len(hlines or {}) + len(markers or {}) > 1:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return pathlib.Path(path)
