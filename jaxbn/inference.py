"""Inference utilities: fold batch norm into the preceding layer, recalibrate population statistics.

Both are pure functions over parameter and statistics trees: they return new trees and never touch
the model they are given.

* :func:`fold_batch_norm` rewrites ``BN(x @ W + b)`` (or a convolution) in evaluation mode as one
  affine layer, ``W' = W * s`` and ``b' = (b - mean) * s + beta`` with
  ``s = gamma / sqrt(var + eps)`` on the output-channel axis (the last axis of Flax kernels).
* :func:`recalibrate` is PreciseBN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): with
  the weights fixed, it runs the model in training mode over a set of batches and replaces the
  running statistics of every jaxbn batch norm layer by the exact statistics of all those batches
  together (an exact count-weighted merge, not an average of averages and not an EMA).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks
from jaxbn.functional import BatchNormState
from jaxbn.stats import Stats, merge

__all__ = ["fold_batch_norm", "fold_batch_norms", "recalibrate"]

Path = str | Sequence[Hashable]


def _field(fn: str, tree: Any, name: str, arg: str) -> Any:
  if tree is None:
    return None
  if isinstance(tree, BatchNormState):
    return getattr(tree, name)
  if not isinstance(tree, Mapping):
    raise TypeError(f"{fn}: {arg} must be a mapping (a Flax variable dict) or None, got {type(tree).__name__}.")
  return tree.get(name)


def _fold_layout(
  fn: str, kshape: tuple[int, ...], sshape: tuple[int, ...], axis: Any, stack_axes: int | None
) -> tuple[int, tuple[int, ...]]:
  """``(stack_axes, kernel_axes)``: how the statistics' shape lines up with the kernel's axes."""
  if stack_axes is not None and (not _checks.is_int(stack_axes) or not 0 <= stack_axes < max(len(sshape), 1)):
    raise ValueError(
      f"{fn}: stack_axes must be None or an int in [0, {max(len(sshape) - 1, 0)}] (the statistics have "
      f"{len(sshape)} axes and at least one is a feature axis), got {stack_axes!r}."
    )
  stack_axes = None if stack_axes is None else int(stack_axes)
  chosen = None if axis is None else _checks.feature_axes(fn, len(kshape), axis)

  def layout(n: int) -> tuple[int, tuple[int, ...]] | None:
    f = len(sshape) - n
    if f < 1 or kshape[:n] != sshape[:n] or len(kshape) - n <= f:  # a layer's kernel needs an input axis too
      return None
    axes = tuple(range(len(kshape) - f, len(kshape))) if chosen is None else chosen
    if len(axes) != f or min(axes) < n or tuple(kshape[a] for a in axes) != sshape[n:]:
      return None
    return n, axes

  fits = [lay for n in ([stack_axes] if stack_axes is not None else range(len(sshape))) if (lay := layout(n))]
  where = "the trailing axes" if axis is None else f"axis={axis!r}"
  after = "" if stack_axes is None else f", after the {stack_axes} leading stack axes (stack_axes={stack_axes})"
  if not fits:
    raise ValueError(
      f"{fn}: the statistics' shape {sshape} must be the kernel's output-channel axes ({where}){after}, "
      f"got a kernel of shape {kshape}. Flax kernels are (in, out) and HWIO, output channels last; for "
      "another layout pass axis (PyTorch's (out, in) is axis=0), and for layers stacked by nn.scan / "
      "nnx.vmap (kernel (L, in, out), statistics (L, out)) the layer axes lead in the kernel, its bias and "
      "the statistics alike."
    )
  if len(fits) > 1:
    options = ", ".join(f"stack_axes={n} (feature shape {sshape[n:]})" for n, _ in fits)
    raise ValueError(
      f"{fn}: the statistics' shape {sshape} fits a kernel of shape {kshape} in more than one way: {options}. "
      "Pass stack_axes: the number of leading axes that index stacked layers (1 for nn.scan / nnx.vmap "
      "stacks, 0 for a single layer whose batch norm has several feature axes)."
    )
  return fits[0]


def fold_batch_norm(
  kernel: Any,
  bias: Any,
  bn_params: Mapping[str, Any] | None,
  bn_stats: Mapping[str, Any] | BatchNormState,
  *,
  epsilon: float = 1e-5,
  axis: int | Sequence[int] | None = None,
  stack_axes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""Folds an evaluation-mode batch norm into the Dense or Conv layer before it.

  .. math::
     s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \quad W' = W \cdot s, \quad
     b' = (b - \mu)\, s + \beta

  with ``s`` applied along the output-channel axis, by default the LAST axis of the kernel as in
  Flax: ``(in, out)`` for Dense, ``(H, W, in / groups, out)`` (HWIO) for Conv, grouped and
  depthwise convolutions included (batch norm acts on output channels, which grouping does not
  change). A kernel whose output channels sit elsewhere needs ``axis``: PyTorch's ``(out, in)``
  and ``(out, in, kh, kw)`` are ``axis=0``. Without it such a kernel is refused when its last axis
  has another size, but folded along the wrong axis when ``in == out``: no shape can tell.

  Stacked layers (``nn.scan`` with ``variable_axes={"params": 0, "batch_stats": 0}``, layers built
  under ``nnx.vmap``) hold a kernel ``(L, in, out)`` and statistics ``(L, out)``; each of the ``L``
  layers is folded with its own statistics. The leading axes that the kernel, its bias and all
  the batch norm's arrays share are found from the shapes, or given as ``stack_axes`` where the
  shapes allow two readings (``L == in``: a stack of ``L`` layers, or one layer whose batch norm
  has the two feature axes ``(in, out)``); the ambiguous case is refused, never guessed.

  Args:
    kernel: the layer's kernel, output channels last (or at ``axis``); several axes are allowed
      when the batch norm has several feature axes (their sizes must match, in the kernel's order).
    bias: the layer's bias (shaped like the statistics), or None for a layer without one
      (``use_bias=False``, as in ResNets).
    bn_params: the batch norm's params, ``{"scale": gamma, "bias": beta}``; a missing entry (or
      None) means ``use_scale=False`` / ``use_bias=False``.
    bn_stats: its running statistics, ``{"mean": mu, "var": var}`` or a ``BatchNormState``.
    epsilon: the batch norm's epsilon.
    axis: the kernel's output-channel axis or axes (counted on the whole kernel, stack axes
      included); None for the last ones.
    stack_axes: the number of leading axes that index stacked layers (``1`` for ``nn.scan`` /
      ``nnx.vmap`` stacks, ``0`` for one layer); None to find it from the shapes.

  Returns:
    ``(kernel, bias)`` of the folded layer: the kernel in its own dtype, the bias in the given
    bias's dtype (the kernel's when there is none); computed in float32 (float64 for float64
    kernels).

  Raises:
    TypeError: the trees are not mappings, or a kernel that is not a floating array.
    ValueError: missing statistics, shapes that do not match the kernel's output-channel axes (or
      match them in two ways without ``stack_axes``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.inference import fold_batch_norm
    >>> k = jax.random.normal(jax.random.key(0), (4, 3))
    >>> bn_params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])}
    >>> bn_stats = {"mean": jnp.array([0.1, -0.2, 0.3]), "var": jnp.array([1.0, 4.0, 0.25])}
    >>> k2, b2 = fold_batch_norm(k, None, bn_params, bn_stats)
    >>> x = jax.random.normal(jax.random.key(1), (5, 4))
    >>> import jaxbn  # the folded layer gives the batch norm's evaluation output
    >>> state = jaxbn.BatchNormState(bn_stats["mean"], bn_stats["var"], 0)
    >>> ref, _ = jaxbn.batch_norm(x @ k, state, bn_params["scale"], bn_params["bias"], training=False)
    >>> bool(jnp.allclose(x @ k2 + b2[None], ref, atol=1e-5))
    True

    The same layer with a PyTorch ``(out, in)`` kernel, and a stack of two such layers:

    >>> k2_t, _ = fold_batch_norm(k.T, None, bn_params, bn_stats, axis=0)
    >>> bool(jnp.allclose(k2_t, k2.T))
    True
    >>> stacked = {name: jnp.stack([v, v]) for name, v in bn_stats.items()}
    >>> k2_s, b2_s = fold_batch_norm(jnp.stack([k, k]), None, None, stacked)
    >>> k2_s.shape, b2_s.shape
    ((2, 4, 3), (2, 3))
  """
  fn = "jaxbn.fold_batch_norm"
  kernel = _checks.floating_input(fn, kernel, arg="kernel")
  mean, var = _field(fn, bn_stats, "mean", "bn_stats"), _field(fn, bn_stats, "var", "bn_stats")
  if mean is None or var is None:
    raise ValueError(f"{fn}: bn_stats must hold 'mean' and 'var', got {sorted(bn_stats) if bn_stats else bn_stats}.")
  mean, var = _checks.as_array(fn, "bn_stats['mean']", mean), _checks.as_array(fn, "bn_stats['var']", var)
  sshape = mean.shape
  n, axes = _fold_layout(fn, kernel.shape, sshape, axis, stack_axes)
  gamma = _checks.feature_array(fn, "bn_params['scale']", _field(fn, bn_params, "scale", "bn_params"), sshape)
  beta = _checks.feature_array(fn, "bn_params['bias']", _field(fn, bn_params, "bias", "bn_params"), sshape)
  _checks.feature_array(fn, "bn_stats['var']", var, sshape)
  bias = _checks.feature_array(fn, "bias", bias, sshape)
  _checks.positive(fn, "epsilon", epsilon)
  cdt = _checks.stats_dtype(kernel.dtype)
  s = lax.rsqrt(var.astype(cdt) + jnp.asarray(epsilon, cdt))
  if gamma is not None:
    s = s * gamma.astype(cdt)
  # Output-channel axes last, then s (stack + feature shape) broadcasts over the layer's other axes.
  ends = tuple(range(kernel.ndim - len(axes), kernel.ndim))
  k = jnp.moveaxis(kernel.astype(cdt), axes, ends)
  k = k * s.reshape(sshape[:n] + (1,) * (kernel.ndim - n - len(axes)) + sshape[n:])
  new_kernel = jnp.moveaxis(k, ends, axes).astype(kernel.dtype)
  b = -mean.astype(cdt) if bias is None else bias.astype(cdt) - mean.astype(cdt)
  new_bias = b * s
  if beta is not None:
    new_bias = new_bias + beta.astype(cdt)
  return new_kernel, new_bias.astype(kernel.dtype if bias is None else bias.dtype)


def _path(fn: str, path: Path) -> tuple[Hashable, ...]:
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  return tuple(path)


def _get(fn: str, tree: Any, path: tuple[Hashable, ...], what: str) -> Any:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      have = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(f"{fn}: {what} path {'/'.join(map(str, path))!r} not found: no {key!r} at level {i} ({have}).")
    node = node[key]
  return node


def _set(tree: Mapping, path: tuple[Hashable, ...], value: Any) -> dict:
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
  return out


def _delete(tree: Mapping, path: tuple[Hashable, ...]) -> dict:
  out = dict(tree)
  if path[0] not in out:
    return out
  if len(path) == 1:
    del out[path[0]]
  else:
    child = _delete(out[path[0]], path[1:])
    if child:
      out[path[0]] = child
    else:
      del out[path[0]]
  return out


def fold_batch_norms(
  variables: Mapping[str, Any],
  pairs: Iterable[tuple[Path, Path]],
  *,
  epsilon: float = 1e-5,
  axis: int | Sequence[int] | None = None,
  stack_axes: int | None = None,
) -> dict:
  """Folds every ``(layer, batch_norm)`` pair of a model's variables; see :func:`fold_batch_norm`.

  Two layouts are understood:

  * Flax linen: ``{"params": ..., "batch_stats": ...}``. The layer's ``kernel`` and ``bias`` are
    replaced (a bias is added where the layer had none) and the batch norm's entries are removed
    from both collections.
  * Flax NNX, as a pure dict (``nnx.to_pure_dict(nnx.state(model))``): the batch norm's
    ``scale``/``bias``/``mean``/``var`` sit together under its path; the entry is removed.

  The result is the variables of the same model with each folded batch norm replaced by nothing
  and each folded layer given a bias (for example ``nn.Conv(..., use_bias=True)`` followed by no
  norm), whose evaluation output equals the original's up to float rounding.

  Layers stacked by ``nn.scan`` (``variable_axes={"params": 0, "batch_stats": 0}``) or built under
  ``nnx.vmap`` are folded layer by layer: their kernels ``(L, in, out)`` and statistics ``(L, out)``
  share the leading layer axis (see ``stack_axes`` of :func:`fold_batch_norm`).

  Args:
    variables: the model's variables.
    pairs: ``(layer_path, bn_path)`` pairs; a path is a tuple of keys or a ``"/"``-joined string,
      relative to ``params``/``batch_stats`` (linen) or to the root (NNX).
    epsilon: the batch norms' epsilon.
    axis: the kernels' output-channel axis or axes; None for the last ones (Flax's layout).
    stack_axes: the number of leading axes that index stacked layers; None to find it from the
      shapes of each pair.

  Returns:
    A new variable dict; ``variables`` is not modified.

  Raises:
    TypeError: ``variables`` is not a mapping, or ``pairs`` is not an iterable.
    ValueError: a pair that is not two paths, a path that does not exist, a bad ``epsilon``, or shapes
      :func:`fold_batch_norm` refuses.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxbn.linen import BatchNorm
    >>> from jaxbn.inference import fold_batch_norms
    >>> class Net(nn.Module):
    ...   folded: bool = False
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.Conv(4, (3, 3), use_bias=self.folded, name="conv")(x)
    ...     return x if self.folded else BatchNorm(use_running_average=True, name="bn")(x)
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    >>> variables = Net().init(jax.random.key(1), x)
    >>> variables["batch_stats"]["bn"]["mean"] = jnp.arange(4.0)
    >>> folded = fold_batch_norms(variables, [("conv", "bn")])
    >>> jax.tree.map(jnp.shape, folded)
    {'batch_stats': {}, 'params': {'conv': {'bias': (4,), 'kernel': (3, 3, 3, 4)}}}
    >>> bool(jnp.allclose(Net(folded=True).apply(folded, x), Net().apply(variables, x), atol=1e-5))
    True
  """
  fn = "jaxbn.fold_batch_norms"
  linen = "params" in _checks.mapping(fn, "variables", variables)
  _checks.positive(fn, "epsilon", epsilon)
  out = dict(variables)
  for layer_path, bn_path in _pairs(fn, pairs):
    lp, bp = _path(fn, layer_path), _path(fn, bn_path)
    if linen:
      layer = _get(fn, out["params"], lp, "layer")
      bn_params = _get(fn, out["params"], bp, "batch norm") if _has(out["params"], bp) else {}
      bn_stats = _get(fn, out.get("batch_stats", {}), bp, "batch norm statistics")
    else:
      layer = _get(fn, out, lp, "layer")
      bn_params = bn_stats = _get(fn, out, bp, "batch norm")
    if "kernel" not in layer:
      raise ValueError(f"{fn}: layer {'/'.join(map(str, lp))!r} has no 'kernel' (it holds {sorted(layer)}).")
    k, b = fold_batch_norm(
      layer["kernel"], layer.get("bias"), bn_params, bn_stats, epsilon=epsilon, axis=axis, stack_axes=stack_axes
    )
    new_layer = {**layer, "kernel": k, "bias": b}
    if linen:
      params = _delete(_set(out["params"], lp, new_layer), bp)
      out = {**out, "params": params, "batch_stats": _delete(out.get("batch_stats", {}), bp)}
    else:
      out = _delete(_set(out, lp, new_layer), bp)
  return out


def _pairs(fn: str, pairs: Any) -> list[tuple[Path, Path]]:
  """``pairs`` as a list of ``(layer_path, bn_path)``."""
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
    raise TypeError(f"{fn}: pairs must be an iterable of (layer_path, bn_path) pairs, got {type(pairs).__name__}.")
  pairs = list(pairs)
  for pair in pairs:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"{fn}: pairs must hold (layer_path, bn_path) pairs, got {pair!r}.")
  return pairs


def _has(tree: Mapping, path: tuple[Hashable, ...]) -> bool:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return False
    node = node[key]
  return True


def _is_moments(node: Any) -> bool:
  return isinstance(node, Mapping) and set(node) - {"calls"} == {"count", "mean", "m2"}


def _moment_leaves(tree: Any, prefix: tuple = ()) -> dict[tuple, Stats]:
  """``{path: Stats}`` for every layer entry of a linen ``MOMENTS`` collection."""
  if _is_moments(tree):
    return {prefix: Stats(tree["count"], tree["mean"], tree["m2"])}
  out = {}
  for k, v in tree.items():
    out.update(_moment_leaves(v, (*prefix, k)))
  return out


def _stat_layers(tree: Any, prefix: tuple = ()) -> list[tuple]:
  """Paths of the layers of a linen ``batch_stats`` tree: the entries that hold ``mean`` and ``var``."""
  if not isinstance(tree, Mapping):
    return []
  if "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping):
    return [prefix]
  return [path for k, v in tree.items() for path in _stat_layers(v, (*prefix, k))]


def _population(stats: Stats, old_mean: Any, old_var: Any, unbiased_var: bool) -> tuple[jax.Array, jax.Array]:
  valid = stats.count > 0
  denom = jnp.maximum(stats.count - 1, 1) if unbiased_var else jnp.maximum(stats.count, 1)
  mean = jnp.where(valid, stats.mean, old_mean).astype(jnp.asarray(old_mean).dtype)
  var = jnp.where(valid, stats.m2 / denom, old_var).astype(jnp.asarray(old_var).dtype)
  return mean, var


def _no_layers(fn: str) -> ValueError:
  return ValueError(
    f"{fn}: no jaxbn batch norm layer computed batch statistics, so there is nothing to recalibrate. "
    "Consider one of the following options:\n"
    "  1. build the model with jaxbn.linen.BatchNorm / jaxbn.nnx.BatchNorm (flax's own BatchNorm is not seen);\n"
    "  2. pass the call arguments that put the model in training mode, e.g. train=True (linen)."
  )


def _unreported(fn: str, paths: list[str]) -> ValueError:
  shown = ", ".join(paths[:10]) + (f" (and {len(paths) - 10} more)" if len(paths) > 10 else "")
  return ValueError(
    f"{fn}: these batch norm layers hold running statistics but reported no batch statistics, so they "
    f"would keep their old ones: {shown}. Consider one of the following options:\n"
    "  1. for a jaxbn.linen.BatchNorm inside nn.scan / nn.vmap (or another lifted transform that lists "
    "its collections), add jaxbn.linen.MOMENTS to the transform's variable_axes with the axis of "
    "'batch_stats', e.g. variable_axes={'params': 0, 'batch_stats': 0, jaxbn.linen.MOMENTS: 0};\n"
    "  2. for a flax.linen.BatchNorm, use jaxbn.linen.BatchNorm instead (same arguments and variables);\n"
    "  3. for a layer that is never called in training mode, pass the call arguments that put it in "
    "training mode (e.g. train=True), or strict=False to keep the statistics of layers frozen on purpose."
  )


def _accumulate(fn: str, moments_fn: Callable, batches: Iterable[Any], *args) -> dict:
  merge_all = jax.jit(lambda a, b: jax.tree.map(merge, a, b, is_leaf=lambda n: isinstance(n, Stats)))
  acc = None
  for batch in batches:
    m = moments_fn(*args, batch)
    acc = m if acc is None else merge_all(acc, m)
  if acc is None:
    raise ValueError(f"{fn}: batches is empty; give at least one batch of model inputs.")
  return acc


def recalibrate(
  model: Any,
  batches: Iterable[Any],
  variables: Mapping[str, Any] | None = None,
  *,
  unbiased_var: bool = False,
  strict: bool = True,
  **call_kwargs: Any,
) -> Any:
  """PreciseBN: recomputes the population statistics of every jaxbn batch norm layer over ``batches``.

  With the weights fixed, each batch goes through the model in training mode (so every layer sees
  the inputs it sees in training), every :class:`jaxbn.linen.BatchNorm` / :class:`jaxbn.nnx.BatchNorm`
  reports its exact batch statistics (count, mean, sum of squared deviations; masked elements
  excluded; merged over devices when it has an ``axis_name``; all ghost batches together), and
  the statistics of all batches are merged exactly by count. The running mean and variance become
  those of the union of all batches, as if it were a single batch. Each step is ``jax.jit``-ed, so
  batches sharded over devices give global statistics with no further code.

  Layers that saw no valid element keep their statistics; ``count`` variables are left as they
  are. The model and ``variables`` are not modified.

  Layers inside lifted transforms:

  * NNX: nothing to do. Layers called under ``nnx.remat``, ``nnx.jit``, ``nnx.scan`` /
    ``nnx.vmap`` (stacked layers: statistics ``(L, C)``, one row per layer) report their
    statistics as model state. A layer never called in training mode keeps its statistics;
    ``flax.nnx.BatchNorm`` layers are refused.
  * Linen: a transform that names its collections (``nn.scan``, ``nn.vmap``) must carry
    :data:`jaxbn.linen.MOMENTS` on the axis of ``batch_stats``, e.g.
    ``nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0, jaxbn.linen.MOMENTS: 0}, ...)``;
    ``nn.remat`` and ``nn.jit`` need nothing. Every layer with ``batch_stats`` (``mean``, ``var``)
    must report statistics, so a layer that did not (a transform without ``MOMENTS``, a
    ``flax.linen.BatchNorm``, a layer not called in training mode) is an error naming it, never a
    silently stale layer.

  Args:
    model: a ``flax.linen.Module``; or a function with the signature of ``Module.apply``
      (``apply_fn(variables, batch, mutable=..., **call_kwargs)``), e.g. one wrapping ``model.apply``
      in ``jax.shard_map`` for layers with an ``axis_name``; or a ``flax.nnx.Module``.
    batches: an iterable of model inputs, each passed as the single positional argument.
    variables: the linen variables (``{"params": ..., "batch_stats": ...}``); None for NNX.
    unbiased_var: store the 1/(N-1) variance of the union instead of the 1/N one, for every
      layer whatever its own ``unbiased_running_var``.
    strict: linen only: a layer with ``batch_stats`` that reports no statistics is an error (the
      default); False leaves such layers as they are, for layers kept in evaluation mode on
      purpose (a frozen backbone).
    **call_kwargs: further arguments of every call, e.g. ``train=True`` for a linen model that
      chooses ``use_running_average`` from it. jaxbn NNX batch norms are switched to batch
      statistics by this function.

  Returns:
    For linen, new variables with ``batch_stats`` recalibrated. For NNX, a new ``nnx.State`` of the
    model's ``nnx.BatchStat`` variables; apply it with ``nnx.update(model, new_stats)``.

  Raises:
    ValueError: ``batches`` is empty; no jaxbn batch norm layer computed statistics (none in the
      model, or the calls were not in training mode); a linen layer with ``batch_stats`` reported
      none (see above); the NNX model holds ``flax.nnx.BatchNorm`` layers; or ``variables`` is
      missing for linen.
    TypeError: ``batches`` is not an iterable, ``variables`` not a mapping, ``unbiased_var`` or
      ``strict`` not a bool, or ``call_kwargs`` that the model's ``__call__`` does not take.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxbn.linen import BatchNorm
    >>> from jaxbn.inference import recalibrate
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     return BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
    >>> model = Net()
    >>> batches = [jax.random.normal(jax.random.key(i), (16, 2)) + i for i in range(4)]
    >>> variables = model.init(jax.random.key(9), batches[0], train=False)
    >>> new = recalibrate(model, batches, variables, train=True)
    >>> h = nn.Dense(3).apply({"params": variables["params"]["Dense_0"]}, jnp.concatenate(batches))
    >>> bool(jnp.allclose(new["batch_stats"]["BatchNorm_0"]["var"], h.var(0), rtol=1e-5))
    True

  References:
    Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021.
  """
  from flax import linen as nn
  from flax import nnx

  fn = "jaxbn.recalibrate"
  if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
    raise TypeError(f"{fn}: batches must be an iterable of model inputs, got {type(batches).__name__}.")
  unbiased_var = _checks.static_bool(fn, "unbiased_var", unbiased_var)
  strict = _checks.static_bool(fn, "strict", strict)
  if isinstance(model, (nn.Module, nnx.Module)):
    _checks.call_kwargs(fn, model.__call__, call_kwargs, f"the model's __call__ ({type(model).__name__})")
  if isinstance(model, nnx.Module):
    return _recalibrate_nnx(fn, model, batches, unbiased_var, call_kwargs)
  if variables is None:
    raise ValueError(f"{fn}: a linen model needs its variables: recalibrate(model, batches, variables, ...).")
  _checks.mapping(fn, "variables", variables)
  from jaxbn.linen import MOMENTS

  apply_fn: Callable[..., Any] = model.apply if isinstance(model, nn.Module) else model
  if not callable(apply_fn):
    raise TypeError(f"{fn}: model must be a flax.linen.Module, an apply function or a flax.nnx.Module, got {model!r}.")

  @jax.jit
  def moments(variables, batch):
    _, mutated = apply_fn(variables, batch, mutable=["batch_stats", MOMENTS], **call_kwargs)
    return {"/".join(map(str, p)): s for p, s in _moment_leaves(mutated.get(MOMENTS, {})).items()}

  variables = dict(variables)
  acc = _accumulate(fn, moments, batches, variables)
  batch_stats = variables.get("batch_stats", {})
  missing = [key for key in ("/".join(map(str, p)) for p in _stat_layers(batch_stats)) if key not in acc]
  if missing and strict:
    raise _unreported(fn, missing)
  if not acc:
    raise _no_layers(fn)
  for key, stats in acc.items():
    path = tuple(key.split("/"))
    layer = _get(fn, batch_stats, path, "batch norm statistics")
    mean, var = _population(stats, layer["mean"], layer["var"], unbiased_var)
    batch_stats = _set(batch_stats, path, {**layer, "mean": mean, "var": var})
  return {**variables, "batch_stats": batch_stats}


def _recalibrate_nnx(fn: str, model: Any, batches: Iterable[Any], unbiased_var: bool, call_kwargs: dict) -> Any:
  from flax import nnx

  from jaxbn.nnx import BatchNorm, collect_moments

  foreign = ["/".join(map(str, p)) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]
  if foreign:
    raise ValueError(
      f"{fn}: the batch norm layers at {', '.join(foreign)} are flax.nnx.BatchNorm, whose batch statistics "
      "jaxbn cannot collect; replace them with jaxbn.nnx.BatchNorm (same arguments and variables)."
    )
  paths = {"/".join(map(str, p)): tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, BatchNorm)}
  graphdef, state = nnx.split(model)

  @jax.jit
  def moments(state, batch):
    m = nnx.merge(graphdef, state)
    m.set_attributes(BatchNorm, use_running_average=False, raise_if_not_found=False)
    # The moments are model state, so they also come back from nnx.remat / nnx.scan / nnx.vmap.
    with collect_moments(m) as read:
      m(batch, **call_kwargs)
      stats = read()
    return {"/".join(map(str, p)): s for p, s in stats.items()}

  acc = _accumulate(fn, moments, batches, state)
  if not any(bool(jnp.any(s.count > 0)) for s in acc.values()):
    raise _no_layers(fn)
  stat_state = nnx.state(model, nnx.BatchStat)
  pure = nnx.to_pure_dict(stat_state)
  for key, stats in acc.items():  # layers that saw nothing (count 0) keep their statistics
    layer = _get(fn, pure, paths[key], "batch norm")
    mean, var = _population(stats, layer["mean"], layer["var"], unbiased_var)
    pure = _set(pure, paths[key], {**layer, "mean": mean, "var": var})
  nnx.replace_by_pure_dict(stat_state, pure)  # nnx.state made a copy: the model is untouched
  return stat_state
