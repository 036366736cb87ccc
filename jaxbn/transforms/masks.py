"""Masks derived from the model: which parameters belong to batch norms, which kernels feed one.

``batch_norm_mask`` marks the batch-norm parameters (e.g. to keep them out of weight decay) and
``scale_invariant_mask`` the kernels whose output goes unchanged into a batch norm, found by tracing the
model's dataflow abstractly (a ``_Dataflow`` records the calls: ``flax.linen.intercept_methods`` for linen,
recording subclasses from ``_recording_class`` on a traced copy for nnx). ``register_batch_norm`` adds classes
to those that count as batch norms. The masks are pytrees of Python bools for ``optax.masked`` and
``optax.partition``.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxbn import _checks
from jaxbn.transforms._common import NAME

__all__ = ["batch_norm_mask", "register_batch_norm", "scale_invariant_mask"]

_REGISTERED_BATCH_NORMS: list[type] = []
_LOCK = threading.Lock()


def register_batch_norm(cls: type) -> type:
  """Makes ``batch_norm_mask`` and ``scale_invariant_mask`` treat ``cls`` (a linen or nnx module class) as a batch norm.

  Subclasses of the registered classes count too. Flax's ``BatchNorm`` classes and jaxbn's are registered
  already. Usable as a class decorator.

  Args:
    cls: a module class whose ``__call__(x, ...)`` normalizes ``x`` with batch statistics over all axes but
      its ``axis`` attribute (-1 when it has none).

  Returns:
    ``cls`` unchanged.

  Raises:
    TypeError: when ``cls`` is not a class.

  Examples:
    >>> import flax.linen as nn
    >>> from jaxbn import transforms
    >>> @transforms.register_batch_norm
    ... class MyNorm(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return (x - x.mean(0)) / x.std(0)
  """
  if not isinstance(cls, type):
    raise TypeError(f"{NAME}.register_batch_norm: cls must be a module class, got {cls!r}.")
  with _LOCK:
    if cls not in _REGISTERED_BATCH_NORMS:
      _REGISTERED_BATCH_NORMS.append(cls)
  return cls


def _batch_norm_types(fn: str, batch_norm_types: Sequence[type] | None) -> tuple[type, ...]:
  if batch_norm_types is not None:
    types = tuple(batch_norm_types) if not isinstance(batch_norm_types, type) else (batch_norm_types,)
    if not types or not all(isinstance(t, type) for t in types):
      raise TypeError(f"{fn}: batch_norm_types must be a non-empty tuple of module classes, got {batch_norm_types!r}.")
    return types
  import importlib

  import flax.linen as nn
  from flax import nnx

  defaults: list[type] = [nn.BatchNorm, nnx.BatchNorm]
  for module_name in ("jaxbn.linen", "jaxbn.nnx"):
    try:
      cls = getattr(importlib.import_module(module_name), "BatchNorm", None)
    except ImportError:
      cls = None
    if isinstance(cls, type):
      defaults.append(cls)
  with _LOCK:
    defaults.extend(_REGISTERED_BATCH_NORMS)
  return tuple(dict.fromkeys(defaults))


def _key_names(path: tuple[Any, ...]) -> tuple[Hashable, ...]:
  """A pytree key path as plain names/indices: (DictKey('a'), SequenceKey(0)) -> ('a', 0)."""
  names = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        names.append(getattr(k, attr))
        break
    else:
      names.append(k)
  return tuple(names)


def _mask_by_path(tree: Any, predicate: Callable[[tuple[Hashable, ...]], bool]) -> Any:
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(predicate(_key_names(path))), tree)


def _nnx_params(model: Any) -> Any:
  from flax import nnx

  return nnx.as_pure(nnx.state(model, nnx.Param))


def _is_nnx_module(obj: Any) -> bool:
  from flax import nnx

  return isinstance(obj, nnx.Module)


def _is_linen_module(obj: Any) -> bool:
  import flax.linen as nn

  return isinstance(obj, nn.Module)


def batch_norm_mask(params: Any, batch_stats: Any = None, *, batch_norm_types: Sequence[type] | None = None) -> Any:
  """A boolean pytree marking the batch-norm parameters (scale and bias), e.g. to exclude them from weight decay.

  Found from the model, not from names:

  * ``batch_norm_mask(nnx_model)``: the ``nnx.Param`` leaves of the submodules that are instances of
    ``batch_norm_types`` (by default ``flax.nnx.BatchNorm``, ``jaxbn.nnx.BatchNorm`` and the classes given
    to ``register_batch_norm``, subclasses included). The mask has the structure of
    ``nnx.as_pure(nnx.state(model, nnx.Param))``, which is what ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
    hands to ``tx``.
  * ``batch_norm_mask(variables)`` or ``batch_norm_mask(variables["params"], variables["batch_stats"])``
    (linen): the parameters of the modules that keep running statistics, i.e. whose ``batch_stats``
    collection holds ``mean`` and ``var`` (the variables of ``flax.linen.BatchNorm`` and
    ``jaxbn.linen.BatchNorm``). The mask has the structure of ``variables["params"]`` in both forms.

  Parameters alone cannot tell a batch norm from a layer norm; a ``ValueError`` says so.

  Args:
    params: an ``nnx.Module``, linen ``variables`` (with ``"params"`` and ``"batch_stats"``), or linen
      ``params`` together with ``batch_stats``.
    batch_stats: the linen ``batch_stats`` collection when ``params`` is the ``params`` collection.
    batch_norm_types: for nnx, the module classes that count as batch norms (replaces the defaults).

  Returns:
    A pytree of Python bools, True on batch-norm scale and bias leaves.

  Raises:
    TypeError: when ``params`` or ``batch_stats`` is neither a model nor a mapping.
    ValueError: when the batch-norm modules cannot be found from what was passed.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> from jaxbn import transforms
    >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False), nn.Dense(1)])
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((8, 3)))  # shapes are enough
    >>> bn = transforms.batch_norm_mask(variables)  # the structure of variables["params"]
    >>> bn["layers_1"], bn["layers_0"]["kernel"]
    ({'bias': True, 'scale': True}, False)
    >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=jax.tree.map(lambda m: not m, bn))
  """
  fn = f"{NAME}.batch_norm_mask"
  if _is_nnx_module(params):
    if batch_stats is not None:
      raise ValueError(
        f"{fn}: with an nnx model pass no batch_stats (they live in the model), got {type(batch_stats)}."
      )
    from flax import nnx

    types = _batch_norm_types(fn, batch_norm_types)
    bn_paths = {tuple(path) for path, m in nnx.iter_modules(params) if isinstance(m, types)}
    return _mask_by_path(_nnx_params(params), lambda path: path[:-1] in bn_paths)
  if not isinstance(params, Mapping):
    raise TypeError(
      f"{fn}: params must be an nnx.Module, linen variables (with 'params' and 'batch_stats') or the linen "
      f"'params' collection, got {type(params).__name__}."
    )
  if batch_stats is None and "params" in params:
    params, batch_stats = params["params"], params.get("batch_stats")
  if batch_stats is not None and not isinstance(batch_stats, Mapping):
    raise TypeError(
      f"{fn}: batch_stats must be the linen 'batch_stats' collection (a mapping), got {type(batch_stats).__name__}."
    )
  if batch_stats is None:
    raise ValueError(
      f"{fn}: cannot tell batch-norm parameters from parameters alone (a LayerNorm has the same scale and bias). "
      "Consider one of the following options:\n"
      "  1. pass the full linen variables: batch_norm_mask(variables) with variables['batch_stats'];\n"
      "  2. pass the collections separately: batch_norm_mask(variables['params'], variables['batch_stats']);\n"
      "  3. pass the nnx model: batch_norm_mask(model)."
    )
  bn_paths: set[tuple[Hashable, ...]] = set()

  def walk(node: Any, path: tuple[Hashable, ...]) -> None:
    if not isinstance(node, Mapping):
      return
    if "mean" in node and "var" in node and not isinstance(node["mean"], Mapping):
      bn_paths.add(path)
    for k, v in node.items():
      walk(v, (*path, k))

  walk(batch_stats, ())
  return _mask_by_path(params, lambda path: path[:-1] in bn_paths)


class _Dataflow:
  """What a traced call of the model showed: kernel-module outputs and batch-norm inputs."""

  def __init__(self) -> None:
    self.kernel_calls: list[tuple[Hashable, Any, int]] = []  # (module key, output, bias ndim or 0)
    self.bn_inputs: list[tuple[Any, frozenset[int] | None]] = []  # (input, feature axes; None: running stats)

  def invariant(self) -> set[Hashable]:
    """Keys of the kernel modules every output of which goes, unchanged, into a batch norm that uses batch
    statistics and, when the module adds a bias, normalizes per the bias's axes."""
    calls: dict[Hashable, list[tuple[Any, int]]] = {}
    for key, out, bias_ndim in self.kernel_calls:
      calls.setdefault(key, []).append((out, bias_ndim))
    keys = set()
    for key, outs in calls.items():
      ok = True
      for out, bias_ndim in outs:
        consumers = [axes for x, axes in self.bn_inputs if x is out]
        bias_axes = set(range(out.ndim - bias_ndim, out.ndim))
        if not consumers or any(axes is None or not bias_axes <= axes for axes in consumers):
          ok = False
          break
      if ok:
        keys.add(key)
    return keys


def _bn_feature_axes(module: Any, args: tuple, kwargs: dict, ndim: int) -> frozenset[int] | None:
  """The feature axes a batch-norm call keeps, or None when it normalizes with its running statistics."""
  ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  if ura is None:
    ura = getattr(module, "use_running_average", False)
  # Batch renormalization (jaxbn's renorm=True) corrects towards the running statistics: its output
  # changes with the kernel's scale even though its gradient stays orthogonal to the kernel.
  if ura or getattr(module, "renorm", False):
    return None
  axis: Any = getattr(module, "axis", -1)  # an int or a sequence of ints
  axes = (axis,) if _checks.is_int(axis) else tuple(axis)
  return frozenset(int(a) % ndim for a in axes)


def _linear_bias_ndim(own_params: Mapping[str, Any]) -> int | None:
  """For a module's own parameters: None unless it is a linear map (a ``kernel``, at most a ``bias``);
  else the bias's ndim (0 without a bias)."""
  kernel = own_params.get("kernel")
  if kernel is None or np.ndim(kernel) < 2 or not set(own_params) <= {"kernel", "bias"}:
    return None
  return int(np.ndim(own_params["bias"])) if own_params.get("bias") is not None else 0


_DYNAMIC = (jax.Array, np.ndarray, jax.ShapeDtypeStruct)


def _trace(f: Callable[..., None], tree: Any, args: tuple, kwargs: dict) -> None:
  """Traces ``f(tree, args, kwargs)`` abstractly; non-array arguments (flags) stay Python values."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_dyn = [isinstance(x, _DYNAMIC) for x in leaves]
  dyn = [x for x, d in zip(leaves, is_dyn, strict=True) if d]

  def g(tree, dyn):
    it = iter(dyn)
    a, k = treedef.unflatten([next(it) if d else x for x, d in zip(leaves, is_dyn, strict=True)])
    f(tree, a, k)
    return ()

  jax.eval_shape(g, tree, dyn)


_RECORDER: contextvars.ContextVar[_Dataflow | None] = contextvars.ContextVar("jaxbn_dataflow", default=None)
_RECORDING_CLASSES: dict[tuple[type, str], type] = {}


def _recording_class(cls: type, role: str) -> type:
  """A subclass of an nnx module class whose ``__call__`` reports to the active ``_Dataflow``.

  nnx has no method interceptors, so the traced copy of the model gets its instances' classes swapped;
  the user's model and the original classes are never touched.
  """
  with _LOCK:
    sub = _RECORDING_CLASSES.get((cls, role))
    if sub is not None:
      return sub

    def __call__(self, *args, **kwargs):
      flow = _RECORDER.get()
      if flow is not None and role == "bn" and args and isinstance(args[0], jax.Array):
        flow.bn_inputs.append((args[0], _bn_feature_axes(self, args, kwargs, args[0].ndim)))
      out = cls.__call__(self, *args, **kwargs)
      if flow is not None and role == "kernel" and isinstance(out, jax.Array):
        bias_ndim = _linear_bias_ndim(_nnx_own_params(self))
        if bias_ndim is not None:  # always: only linear modules get the "kernel" role
          flow.kernel_calls.append((id(self), out, bias_ndim))
      return out

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    _RECORDING_CLASSES[(cls, role)] = sub
    return sub


def _nnx_own_params(module: Any) -> dict[str, Any]:
  from flax import nnx

  return {k: v.get_value() for k, v in vars(module).items() if isinstance(v, nnx.Param)}


def scale_invariant_mask(model: Any, *args: Any, batch_norm_types: Sequence[type] | None = None, **kwargs: Any) -> Any:
  r"""A boolean pytree marking the kernels that feed a batch norm, found by tracing the model's dataflow.

  The model is traced abstractly (``jax.eval_shape``: no computation, nothing in the model changes) on the
  given inputs, recording which linear modules (those owning a ``kernel`` and at most a ``bias``:
  ``Dense``, ``DenseGeneral``, ``Conv``, ``ConvTranspose``, ``Einsum``, ``nnx.Linear``, ``nnx.Conv``, ...)
  pass their output *unchanged* to a batch norm (an instance of ``batch_norm_types``, by default Flax's and
  jaxbn's ``BatchNorm`` and the classes given to ``register_batch_norm``). Linen calls are observed with
  ``flax.linen.intercept_methods``; nnx calls on a traced copy of the model. A kernel is marked when every
  one of its calls feeds a batch norm that uses batch statistics (so trace with the flags of a training
  step): then :math:`\text{BN}(x \cdot \alpha W) = \text{BN}(x W)` for :math:`\alpha > 0` and the training
  loss does not depend on the kernel's norm.

  A bias before the batch norm. :math:`\text{BN}(\alpha x W + b)` subtracts the batch mean of every
  normalized feature, which removes a bias that is constant along the reduced axes, so the kernel alone is
  still exactly scale-invariant (and the bias gets a zero gradient) when the bias's axes are among the
  batch norm's feature axes: ``Conv(use_bias=True)`` then ``BatchNorm(axis=-1)`` is marked. When they are
  not (e.g. a ``Dense`` on ``(batch, time, features)`` followed by a batch norm over ``axis=1``), the bias
  does change the normalized output as :math:`W` scales, and the kernel is not marked.

  Batch norms that normalize with running statistics (``use_running_average=True``, or batch
  renormalization, ``renorm=True`` in jaxbn's modules) make nothing scale-invariant. Not detected (so not
  marked): an output that passes through other operations first, even positively
  homogeneous ones (ReLU, pooling, reshape), and modules called inside ``nn.scan``/``nnx.scan`` and
  similar lifted transforms. Uses of a marked output outside module calls (e.g. in a residual sum next to
  the batch norm) are not seen either.

  Args:
    model: a ``flax.linen.Module`` or an ``nnx.Module``.
    *args: linen: ``variables`` (with ``"params"``) then the inputs of ``model.apply``; nnx: the inputs of
      ``model(...)``. Arrays or ``jax.ShapeDtypeStruct``; other values (flags) are passed as they are.
    batch_norm_types: the module classes that count as batch norms (replaces the defaults).
    **kwargs: keyword arguments of ``model.apply`` (linen, e.g. ``train=True``) or of ``model(...)`` (nnx).

  Returns:
    A pytree of Python bools with the structure of ``variables["params"]`` (linen) or of
    ``nnx.as_pure(nnx.state(model, nnx.Param))`` (nnx), True on the scale-invariant kernels.

  Raises:
    TypeError: when ``model`` is not a Flax module, linen variables are missing, or ``kwargs`` that the
      model's ``__call__`` does not take.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> from jaxbn import transforms
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = True):
    ...     x = nn.Conv(8, (3, 3))(x)
    ...     x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    ...     return nn.Dense(10)(x.mean((1, 2)))
    >>> x = jnp.ones((4, 8, 8, 3))
    >>> variables = jax.eval_shape(Net().init, jax.random.key(0), x)  # shapes are enough
    >>> mask = transforms.scale_invariant_mask(Net(), variables, x, train=True)
    >>> mask["Conv_0"]["kernel"], mask["Conv_0"]["bias"], mask["Dense_0"]["kernel"]
    (True, False, False)
    >>> labels = jax.tree.map(lambda m: "invariant" if m else "other", mask)
    >>> tx = optax.partition(
    ...   {"invariant": transforms.sgdp(0.1, 0.9, weight_decay=5e-4), "other": optax.sgd(0.1, 0.9)}, labels)

  References:
    Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models",
    NeurIPS 2017.
  """
  fn = f"{NAME}.scale_invariant_mask"
  types = _batch_norm_types(fn, batch_norm_types)
  if _is_linen_module(model) or _is_nnx_module(model):
    _checks.call_kwargs(fn, model.__call__, kwargs, f"the model's __call__ ({type(model).__name__})")
  flow = _Dataflow()
  if _is_linen_module(model):
    import flax.linen as nn

    if not args or not isinstance(args[0], Mapping) or "params" not in args[0]:
      raise TypeError(
        f"{fn}: for a linen model pass its variables (a dict with 'params') first, then its inputs: "
        f"scale_invariant_mask(model, variables, x, ...); got {type(args[0]).__name__ if args else 'nothing'}."
      )
    variables, inputs = args[0], args[1:]
    invariant: set[Hashable] = set()

    def interceptor(next_fun, a, k, context):
      module = context.module
      if isinstance(module, types):
        if a and isinstance(a[0], jax.Array):
          flow.bn_inputs.append((a[0], _bn_feature_axes(module, a, k, a[0].ndim)))
        return next_fun(*a, **k)
      out = next_fun(*a, **k)
      if isinstance(out, jax.Array):
        own = {n: v for n, v in module.variables.get("params", {}).items() if not isinstance(v, Mapping)}
        bias_ndim = _linear_bias_ndim(own)
        if bias_ndim is not None:
          flow.kernel_calls.append((tuple(module.path), out, bias_ndim))
      return out

    def run_linen(variables, a, k):
      with nn.intercept_methods(interceptor):
        model.apply(variables, *a, mutable=True, **k)
      invariant.update(flow.invariant())

    _trace(run_linen, variables, inputs, kwargs)
    return _mask_by_path(variables["params"], lambda path: path[-1] == "kernel" and tuple(path[:-1]) in invariant)

  if _is_nnx_module(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    invariant_paths: set[tuple[Hashable, ...]] = set()

    def run_nnx(state, a, k):
      copy = nnx.merge(graphdef, state)
      paths = {}
      for path, module in nnx.iter_modules(copy):
        if isinstance(module, types):
          object.__setattr__(module, "__class__", _recording_class(type(module), "bn"))
        elif _linear_bias_ndim(_nnx_own_params(module)) is not None:
          object.__setattr__(module, "__class__", _recording_class(type(module), "kernel"))
          paths[id(module)] = tuple(path)
      token = _RECORDER.set(flow)
      try:
        copy(*a, **k)
      finally:
        _RECORDER.reset(token)
      invariant_paths.update(paths[key] for key in flow.invariant() if key in paths)

    _trace(run_nnx, state, args, kwargs)
    return _mask_by_path(_nnx_params(model), lambda path: path[-1] == "kernel" and tuple(path[:-1]) in invariant_paths)
  raise TypeError(f"{fn}: model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}.")
