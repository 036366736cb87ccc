"""Stability diagnostics: per-layer norms, sharpness (top Hessian eigenvalue) and its stability threshold.

Full-batch gradient descent with learning rate ``lr`` on a quadratic is stable only while the
largest Hessian eigenvalue (the *sharpness*) stays below ``2 / lr``. Cohen et al. (2021) found that
on neural networks the sharpness first rises ("progressive sharpening") until it reaches that
threshold and then hovers at or just above it ("edge of stability"), while the loss keeps falling
non-monotonically. Watching the sharpness beside :func:`stability_threshold` shows which regime a run
is in; :func:`norms_by_layer` on the gradients and weights shows where an explosion starts.

The sharpness is computed from Hessian-vector products alone, ``H v = d/de grad(params + e v)``,
evaluated by forward-over-reverse autodiff on the caller's gradient function: the same function
that accumulates the full-batch gradient over micro-batches and devices gives the full-batch
Hessian's products at the cost of about two gradient evaluations each, and the dense Hessian is
never formed.

References:
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability", ICLR 2021.
  Lanczos, "An Iteration Method for the Solution of the Eigenvalue Problem of Linear Differential
  and Integral Operators", Journal of Research of the National Bureau of Standards, 1950.
  Ghorbani, Krishnan & Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
  Density", ICML 2019 (Lanczos on Hessian-vector products of neural networks).
  Parlett, "The Symmetric Eigenvalue Problem", 1980 (full reorthogonalization, "twice is enough").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxbn import _checks, _conv_layout

__all__ = ["hessian_vector_product", "norms_by_layer", "stability_threshold", "top_hessian_eigenvalue"]

_NORMS = "jaxbn.norms_by_layer"
_HVP = "jaxbn.hessian_vector_product"
_TOP = "jaxbn.top_hessian_eigenvalue"
_THRESHOLD = "jaxbn.stability_threshold"
_METHODS = ("lanczos", "power")
_MODES = ("forward", "reverse")


# ---- per-layer norms ------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  """One path entry as text: a dict key, an attribute name or a sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _named_path(path: tuple[Any, ...]) -> tuple[str, ...]:
  names = [_key_name(k) for k in path]
  # An nnx.State leaf sits under the Variable's ``value`` attribute: drop it, so that the parameter
  # is named as in linen ('Linear_0/kernel', not 'Linear_0/kernel/value').
  while len(path) > 1 and isinstance(path[len(names) - 1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return tuple(names)


def norms_by_layer(tree: Any, *, per_leaf: bool = False) -> dict[str, jax.Array]:
  """The L2 norm of each layer's leaves (or of each leaf) of a pytree of parameters or gradients.

  A *layer* is the parent path of the leaves: the leaves ``Conv_0/kernel`` and ``Conv_0/bias`` form
  the layer ``Conv_0``, whose norm is ``sqrt(|kernel|^2 + |bias|^2)``. Path entries are joined with
  ``'/'`` (dict keys, attribute names, list indices as numbers); the ``value`` attribute under which
  an ``nnx.State`` stores each Variable is dropped, so linen parameter dicts and nnx states of the
  same network give the same names. A leaf directly at the root is its own group, named by its key
  (``''`` for a bare array). Pass ``state.params`` rather than ``{'params': ...}`` to avoid a
  ``params/`` prefix on every name.

  Use it as a cheap step metric: gradient norms per layer show which layer an explosion starts in,
  weight norms show the slow growth behind it. Sums of squares accumulate in float32 (float64 for
  float64 leaves); the squares of the layer norms add up to the squared global norm.

  Args:
    tree: a pytree of arrays (``flax.linen`` parameter dict, ``nnx.State``, any nested dict/list).
    per_leaf: one norm per leaf, named by its full path (``Conv_0/kernel``), instead of per layer.

  Returns:
    A dict from names to scalar norms, in the pytree's flattening order.

  Raises:
    TypeError: a leaf is not a real or complex numeric array, or ``per_leaf`` is not a bool.
    ValueError: ``tree`` has no leaves, or two different paths map to the same name.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import diagnostics
    >>> params = {"Dense_0": {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.zeros(2)},
    ...           "BatchNorm_0": {"scale": jnp.full(4, 2.0), "bias": jnp.zeros(4)}}
    >>> {k: float(v) for k, v in diagnostics.norms_by_layer(params).items()}
    {'BatchNorm_0': 4.0, 'Dense_0': 2.0}
    >>> {k: float(v) for k, v in diagnostics.norms_by_layer(params, per_leaf=True).items()}
    {'BatchNorm_0/bias': 0.0, 'BatchNorm_0/scale': 4.0, 'Dense_0/bias': 0.0, 'Dense_0/kernel': 2.0}
  """
  per_leaf = _checks.static_bool(_NORMS, "per_leaf", per_leaf)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise ValueError(f"{_NORMS}: tree must have at least one array leaf, got {tree!r}.")
  squares: dict[str, list[jax.Array]] = {}
  owner: dict[str, tuple[str, ...]] = {}
  for path, leaf in leaves:
    where = f"tree{jax.tree_util.keystr(path)}"
    x = _checks.as_array(_NORMS, where, leaf)
    if not (jnp.issubdtype(x.dtype, jnp.number)):
      raise TypeError(f"{_NORMS}: every leaf must be a numeric array, got dtype {x.dtype} at {where}.")
    names = _named_path(path)
    group = names if per_leaf or len(names) <= 1 else names[:-1]
    name = "/".join(group)
    if owner.setdefault(name, group) != group:
      raise ValueError(
        f"{_NORMS}: the paths {owner[name]} and {group} are both named {name!r}; rename the key containing '/'."
      )
    dtype = jnp.float64 if jnp.dtype(x.dtype) in (jnp.float64, jnp.complex128) else jnp.float32
    magnitude = jnp.abs(x) if jnp.iscomplexobj(x) else x
    squares.setdefault(name, []).append(jnp.sum(jnp.square(magnitude.astype(dtype))))
  return {name: jnp.sqrt(sum(parts[1:], parts[0])) for name, parts in squares.items()}


# ---- Hessian-vector products ----------------------------------------------------------------


def _check_like(fn: str, arg: str, tree: Any, like: Any, like_name: str = "params") -> None:
  """``tree`` must have ``like``'s structure and leaf shapes."""
  s_tree, s_like = jax.tree.structure(tree), jax.tree.structure(like)
  if s_tree != s_like:
    raise ValueError(f"{fn}: {arg} must have the same tree structure as {like_name}, got {s_tree} for {s_like}.")
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(like)):
    if np.shape(a) != np.shape(b):
      raise ValueError(
        f"{fn}: {arg} must have the same leaf shapes as {like_name}, got a leaf of shape {np.shape(a)} "
        f"where {like_name} has {np.shape(b)}."
      )


def _check_params(fn: str, params: Any) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(f"{fn}: params must be a pytree with at least one array leaf, got {params!r}.")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = _checks.as_array(fn, f"params{jax.tree_util.keystr(path)}", leaf).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"{fn}: every leaf of params must have a real floating dtype, got {dtype} at "
        f"{jax.tree_util.keystr(path) or 'the root'}. Differentiate only with respect to the "
        "floating parameters, e.g. pass state.params without integer counters."
      )


def _hvp(fn: str, grad_fn: Callable[[Any], Any], params: Any, vector: Any, mode: str) -> Any:
  if mode == "forward":
    out = jax.jvp(grad_fn, (params,), (vector,))[1]
  else:
    # H is symmetric, so the vector-Jacobian product of the gradient is H v as well.
    grads, vjp = jax.vjp(grad_fn, params)
    _check_like(fn, "grad_fn(params)", grads, params)
    out = vjp(jax.tree.map(lambda v, g: jnp.asarray(v).astype(jnp.result_type(g)), vector, grads))[0]
  _check_like(fn, "grad_fn(params)", out, params)
  return out


def _check_mode(fn: str, mode: Any) -> None:
  if mode not in _MODES:
    raise ValueError(f"{fn}: mode must be one of {_MODES}, got {mode!r}.")


def hessian_vector_product(grad_fn: Callable[[Any], Any], params: Any, vector: Any, *, mode: str = "forward") -> Any:
  """The Hessian of the objective whose gradient is ``grad_fn`` at ``params``, times ``vector``.

  ``H v = d/de grad_fn(params + e v)`` at ``e = 0``, by forward-over-reverse autodiff
  (``jax.jvp`` of ``grad_fn``): about the cost of two gradient evaluations and the memory of one.

  Args:
    grad_fn: ``grad_fn(params) -> grads``, the gradient of a scalar objective (e.g. the full-batch
      loss, accumulated over micro-batches and devices however the caller likes).
    params: the point, a pytree of floating arrays.
    vector: a pytree like ``params`` (same structure and shapes, same dtypes for ``mode="forward"``).
    mode: ``"forward"`` (default, forward-over-reverse) or ``"reverse"`` (reverse-over-reverse,
      ``jax.vjp`` of ``grad_fn``: for objectives containing a ``jax.custom_vjp`` without forward
      mode, at the cost of keeping the gradient's residuals).

  Returns:
    ``H v``, a pytree like ``params``.

  Raises:
    TypeError: ``grad_fn`` is not callable, or a leaf of ``params`` is not floating.
    ValueError: ``mode`` is unknown, or ``vector`` or ``grad_fn(params)`` is not shaped like ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn import diagnostics
    >>> loss = lambda p: p["x"] ** 2 * p["y"]             # H = [[2y, 2x], [2x, 0]]
    >>> p = {"x": jnp.array(1.0), "y": jnp.array(3.0)}
    >>> hv = diagnostics.hessian_vector_product(jax.grad(loss), p, {"x": 1.0, "y": 0.0})
    >>> {k: float(v) for k, v in hv.items()}
    {'x': 6.0, 'y': 2.0}
  """
  _checks.callable_arg(_HVP, "grad_fn", grad_fn)
  _check_mode(_HVP, mode)
  _check_params(_HVP, params)
  _check_like(_HVP, "vector", vector, params)
  vector = jax.tree.map(lambda v, p: jnp.asarray(v, jnp.result_type(p)), vector, params)
  return _hvp(_HVP, grad_fn, params, vector, mode)


# ---- top eigenvalue ---------------------------------------------------------------------------


def _top_of_tridiagonal(alpha: jax.Array, beta: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Largest eigenvalue and its unit eigenvector of the leading ``k x k`` block of a tridiagonal matrix.

  The matrix is held at its full size ``m`` with the unused diagonal entries set below every
  eigenvalue of the block (an eigenvalue of the block is at least its smallest diagonal entry) and
  their couplings zeroed, so the top eigenpair is the block's and the eigenvector is zero outside it.
  """
  m = alpha.shape[0]
  idx = jnp.arange(m)
  used = idx < k
  lowest = jnp.min(jnp.where(used, alpha, jnp.inf))
  diag = jnp.where(used, alpha, lowest - 1 - jnp.abs(lowest))
  off = jnp.where(idx[:-1] < k - 1, beta[:-1], 0)
  t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
  values, vectors = jnp.linalg.eigh(t)
  return values[-1], vectors[:, -1]


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 precision: reorthogonalization in TF32/bfloat16 passes (the GPU/TPU default for
  # float32 matmuls) would leave the basis non-orthogonal at the 1e-3 level.
  return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _lanczos(matvec, v0, num_iters, tol, while_loop=lax.while_loop):
  m, n, dtype = num_iters, v0.shape[0], v0.dtype
  noise = jnp.sqrt(jnp.asarray(n, dtype)) * jnp.finfo(dtype).eps

  def body(carry):
    j, q, basis, alpha, beta, scale, _, _, _ = carry
    basis = basis.at[j].set(q)
    w = matvec(q)
    scale = jnp.maximum(scale, jnp.linalg.norm(w))
    a = jnp.vdot(q, w)
    # Full reorthogonalization against every Lanczos vector so far (q itself and its predecessor
    # included, which is the three-term recurrence), done twice: one classical Gram-Schmidt pass
    # loses orthogonality when w is nearly in the span, the second restores it to rounding.
    w = w - _dot(basis.T, _dot(basis, w))
    w = w - _dot(basis.T, _dot(basis, w))
    b = jnp.linalg.norm(w)
    alpha, beta = alpha.at[j].set(a), beta.at[j].set(b)
    theta, y = _top_of_tridiagonal(alpha, beta, j + 1)
    # ||H V y - theta V y|| = |b y_j|: the Ritz pair's residual, without another product.
    converged = jnp.abs(b * y[j]) <= tol * jnp.abs(theta)
    # An invariant subspace (b ~ 0): T's eigenvalues are exact; stop instead of normalizing rounding
    # noise. Products of n-vectors carry rounding of about sqrt(n) eps relative to their size.
    breakdown = b <= noise * scale
    q = jnp.where(breakdown, q, w / jnp.where(breakdown, 1, b))
    return j + 1, q, basis, alpha, beta, scale, theta, y, converged | breakdown

  def cond(carry):
    j, *_, done = carry
    return (j < m) & ~done

  zero = jnp.zeros((), dtype)
  init = (
    jnp.zeros((), jnp.int32),
    v0,
    jnp.zeros((m, n), dtype),
    jnp.zeros(m, dtype),
    jnp.zeros(m, dtype),
    zero,
    zero,
    jnp.zeros(m, dtype),
    jnp.zeros((), bool),
  )
  _, _, basis, _, _, _, theta, y, _ = while_loop(cond, body, init)
  vector = _dot(basis.T, y)
  return theta, vector / jnp.maximum(jnp.linalg.norm(vector), jnp.finfo(dtype).tiny)


def _power(matvec, v0, num_iters, tol, while_loop=lax.while_loop):
  def body(carry):
    j, v, _, _, _ = carry
    w = matvec(v)
    theta = jnp.vdot(v, w)
    size = jnp.linalg.norm(w)
    converged = jnp.linalg.norm(w - theta * v) <= tol * jnp.abs(theta)
    stuck = size == 0  # H v = 0: v is an eigenvector for 0
    following = jnp.where(stuck, v, w / jnp.where(stuck, 1, size))
    return j + 1, following, v, theta, converged | stuck

  def cond(carry):
    j, *_, done = carry
    return (j < num_iters) & ~done

  init = (jnp.zeros((), jnp.int32), v0, v0, jnp.zeros((), v0.dtype), jnp.zeros((), bool))
  _, _, v, theta, _ = while_loop(cond, body, init)
  return theta, v


def top_hessian_eigenvalue(
  grad_fn: Callable[[Any], Any],
  params: Any,
  *,
  num_iters: int = 20,
  method: str = "lanczos",
  tol: float = 1e-4,
  key: jax.Array | None = None,
  init: Any = None,
  mode: str = "forward",
  jit: bool = True,
) -> tuple[jax.Array, Any]:
  """The sharpness: the largest eigenvalue of the Hessian whose gradient is ``grad_fn``, and its eigenvector.

  Only Hessian-vector products are used (:func:`hessian_vector_product`), one per iteration, so the
  full-batch Hessian is never formed: pass the same ``grad_fn`` the training step differentiates
  (accumulated over micro-batches, reduced over devices) and the result is the sharpness of that
  full-batch objective, the quantity Cohen et al. (2021) compare with ``2 / lr``
  (:func:`stability_threshold`).

  Methods:

  * ``"lanczos"`` (default): Lanczos iteration (Lanczos 1950; on neural networks, Ghorbani et al.
    2019) with full reorthogonalization, on the parameters raveled into one vector. After ``k``
    products it returns the largest eigenvalue of the ``k x k`` tridiagonal projection ``T``, the
    largest *algebraic* eigenvalue of the Hessian (the sharpness, even where large negative
    eigenvalues exist), typically accurate to float32 rounding within 20 products. Memory:
    ``num_iters`` vectors the size of the parameters. If the Krylov space becomes invariant
    (a zero next vector), the iteration stops with ``T``'s eigenvalues exact.
  * ``"power"``: power iteration; memory of two parameter vectors, slower convergence (rate
    ``|lambda_2 / lambda_1|`` per product; give it more ``num_iters``). It finds the eigenvalue of
    largest *magnitude*, returned with its sign (the Rayleigh quotient): near a minimum that is the
    sharpness, but where a negative eigenvalue is larger in magnitude than every positive one it
    returns the negative one, so use ``"lanczos"`` when that can happen.

  Both stop early once the residual of the estimate, ``||H v - lambda v||``, is at most
  ``tol * |lambda|``; for a symmetric matrix an eigenvalue lies within the residual of ``lambda``.
  The vectors are held and combined in float32 (float64 when a parameter is float64); the products
  themselves run in the parameters' dtypes.

  Args:
    grad_fn: ``grad_fn(params) -> grads``, the gradient of the scalar objective, a pytree like
      ``params``; any JAX-differentiable function (forward-mode for ``mode="forward"``).
    params: where to take the Hessian, a pytree of floating arrays (linen params, ``nnx.State``, ...).
    num_iters: the most Hessian-vector products to spend, a positive int; Lanczos uses at most the
      number of parameters.
    method: ``"lanczos"`` or ``"power"``.
    tol: relative residual at which to stop early, >= 0 (0: always spend ``num_iters``).
    key: PRNG key for the random start; None for ``jax.random.key(0)``.
    init: optional start vector, a pytree like ``params`` (e.g. the eigenvector of the previous
      call, which makes power iteration converge in a few products while training moves slowly);
      overrides ``key``, except where it is all zeros or not finite: there the random start is used.
    mode: how products are taken, see :func:`hessian_vector_product`.
    jit: run the whole iteration as one compiled program (default); False runs it from Python, one
      Hessian-vector product per iteration, for a ``grad_fn`` that cannot be traced into one program
      (e.g. one that calls compiled programs per micro-batch, as ``full_batch_step(..., loop="host")``).

  Returns:
    ``(eigenvalue, eigenvector)``: a scalar, and a pytree like ``params`` with unit global L2 norm
    (in the parameters' dtypes).

  Raises:
    TypeError: ``grad_fn`` is not callable, a leaf of ``params`` is not floating, ``num_iters`` is
      not an int, or ``jit`` not a bool.
    ValueError: an argument is out of range, or ``init`` or ``grad_fn(params)`` is not shaped like
      ``params``.

  Examples:
    A quadratic ``0.5 x^T A x`` with eigenvalues -5, 1, 2 and 3: the sharpness is 3.

    >>> import jax, jax.numpy as jnp
    >>> from jaxbn import diagnostics
    >>> q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (4, 4)))
    >>> a = q @ jnp.diag(jnp.array([-5.0, 1.0, 2.0, 3.0])) @ q.T
    >>> grad_fn = jax.grad(lambda p: 0.5 * p["x"] @ a @ p["x"])
    >>> value, vector = diagnostics.top_hessian_eigenvalue(grad_fn, {"x": jnp.ones(4)})
    >>> round(float(value), 4)
    3.0
    >>> round(float(abs(vector["x"] @ q[:, 3])), 4)
    1.0

    Power iteration finds the eigenvalue of largest magnitude, here the negative one:

    >>> value, _ = diagnostics.top_hessian_eigenvalue(grad_fn, {"x": jnp.ones(4)}, method="power", num_iters=200)
    >>> round(float(value), 3)
    -5.0

    It runs under ``jax.jit``:

    >>> sharpness = jax.jit(lambda p: diagnostics.top_hessian_eigenvalue(grad_fn, p)[0])
    >>> round(float(sharpness({"x": jnp.ones(4)})), 4)
    3.0
  """
  _checks.callable_arg(_TOP, "grad_fn", grad_fn)
  _check_mode(_TOP, mode)
  if method not in _METHODS:
    raise ValueError(f"{_TOP}: method must be one of {_METHODS}, got {method!r}.")
  if not _checks.is_int(num_iters):
    raise TypeError(f"{_TOP}: num_iters must be a positive Python int (a loop length), got {num_iters!r}.")
  if num_iters < 1:
    raise ValueError(f"{_TOP}: num_iters must be >= 1, got {num_iters}.")
  jit = _checks.static_bool(_TOP, "jit", jit)
  tol_value = _checks.concrete_number(tol)
  if tol_value is None:
    raise TypeError(f"{_TOP}: tol must be a Python number known at trace time, got {tol!r}.")
  if not tol_value >= 0:
    raise ValueError(f"{_TOP}: tol must be >= 0, got {tol_value!r}.")
  _check_params(_TOP, params)

  if init is not None:
    _check_like(_TOP, "init", init, params)
  if key is None:
    key = jax.random.key(0)
  elif not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,))):
    raise TypeError(f"{_TOP}: key must be a PRNG key (jax.random.key(seed)) or None, got {key!r}.")

  def run(params, key, init):
    flat, unravel = ravel_pytree(params)
    dtype = _checks.stats_dtype(flat.dtype)
    n = flat.shape[0]
    v0 = jax.random.normal(key, (n,), dtype)
    if init is not None:
      given = jnp.concatenate([jnp.ravel(jnp.asarray(v)).astype(dtype) for v in jax.tree.leaves(init)])
      size = jnp.linalg.norm(given)
      # A zero (or non-finite) start would stay in the Krylov space {0}: use the random one there.
      v0 = jnp.where((size > 0) & jnp.isfinite(size), given, v0)
    v0 = v0 / jnp.maximum(jnp.linalg.norm(v0), jnp.finfo(dtype).tiny)

    def matvec(v):
      hv = _hvp(_TOP, grad_fn, params, unravel(v.astype(flat.dtype)), mode)
      return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jax.tree.leaves(hv)])

    tol_array = jnp.asarray(tol_value, dtype)
    loop = lax.while_loop if jit else _python_while_loop
    if jit:  # the products run inside the while loop's body
      matvec = _conv_layout.canonical_convolutions(matvec)
    if method == "lanczos":
      value, vector = _lanczos(matvec, v0, min(int(num_iters), n), tol_array, loop)
    else:
      value, vector = _power(matvec, v0, int(num_iters), tol_array, loop)
    return value, unravel(vector.astype(flat.dtype))

  # One compiled program even when called outside jax.jit (op-by-op dispatch of the setup and of
  # the result's unraveling would cost more than the loop).
  return jax.jit(run)(params, key, init) if jit else run(params, key, init)


def _python_while_loop(cond: Callable[[Any], Any], body: Callable[[Any], Any], init: Any) -> Any:
  """``lax.while_loop`` run from Python, each iteration op by op (its body may call compiled programs)."""
  carry = init
  while bool(cond(carry)):
    carry = body(carry)
  return carry


# ---- stability threshold ----------------------------------------------------------------------


def stability_threshold(learning_rate: Any, *, momentum: Any = 0.0, nesterov: bool = False) -> jax.Array:
  """The largest sharpness at which (momentum) gradient descent on a quadratic does not diverge.

  On ``f(x) = h x^2 / 2`` the iteration of ``optax.sgd(learning_rate, momentum, nesterov)`` is a
  linear recursion, stable exactly while ``0 < h < threshold``; with the sharpness as ``h`` this is
  the line Cohen et al. (2021) draw beside the sharpness. With ``a = learning_rate * h`` and
  ``b = momentum``:

  * gradient descent, ``x <- x - a x``: stable while ``|1 - a| < 1``, i.e.
    ``threshold = 2 / learning_rate``;
  * heavy ball (optax's ``trace``: ``m <- g + b m``, ``x <- x - lr m``): the state ``(x, lr m)``
    moves by ``[[1 - a, -b], [a, b]]``, with characteristic polynomial ``z^2 - (1 + b - a) z + b``;
    an eigenvalue crosses -1 at ``a = 2 (1 + b)``, so ``threshold = 2 (1 + b) / learning_rate``;
  * Nesterov (optax's form: ``m <- g + b m``, ``x <- x - lr (g + b m)``): the matrix is
    ``[[1 - a (1 + b), -b^2], [a, b]]``, with polynomial ``z^2 - (1 + b - a (1 + b)) z + b (1 - a)``;
    it has the root -1 at ``a = 2 (1 + b) / (1 + 2 b)``, so
    ``threshold = 2 (1 + b) / ((1 + 2 b) learning_rate)`` (``1.357 / lr`` for ``b = 0.9``, well below
    heavy ball's ``3.8 / lr``).

  In every case the root +1 needs ``a = 0`` and the product of the roots is below 1 in magnitude
  for ``0 <= b < 1``, so the -1 crossing is the only boundary. Weight decay ``wd`` added to the
  gradient (``optax.add_decayed_weights``) adds ``wd`` to every curvature: compare the loss's
  sharpness with ``threshold - wd``.

  Args:
    learning_rate: the step size, > 0 (a float or an array, e.g. a schedule's current value).
    momentum: optax's ``momentum`` (the trace decay ``b``), in [0, 1).
    nesterov: optax's ``nesterov`` flag.

  Returns:
    The threshold, an array of the inputs' broadcast shape (float32, or float64 for float64 inputs).

  Raises:
    TypeError: ``learning_rate`` or ``momentum`` is not numeric, or ``nesterov`` is not a bool.
    ValueError: ``learning_rate <= 0`` or ``momentum`` outside [0, 1), NaN included (checked when known at
      trace time, elementwise for arrays).

  Examples:
    >>> from jaxbn import diagnostics
    >>> float(diagnostics.stability_threshold(0.01))
    200.0
    >>> round(float(diagnostics.stability_threshold(0.01, momentum=0.9)), 3)
    380.0
    >>> round(float(diagnostics.stability_threshold(0.01, momentum=0.9, nesterov=True)), 3)
    135.714
  """
  for arg, value in (("learning_rate", learning_rate), ("momentum", momentum)):
    try:
      numeric = value is not None and not isinstance(value, (str, bytes))
      numeric = numeric and jnp.issubdtype(jnp.result_type(value), jnp.number)
    except (TypeError, ValueError):  # objects with no JAX dtype
      numeric = False
    if not numeric:
      raise TypeError(f"{_THRESHOLD}: {arg} must be a real number or array, got {value!r}.")
  if not isinstance(nesterov, (bool, np.bool_)):
    raise TypeError(f"{_THRESHOLD}: nesterov must be a Python bool, got {nesterov!r}.")
  # Elementwise where known at trace time: arrays of learning rates (a sweep) too.
  _checks.positive(_THRESHOLD, "learning_rate", learning_rate)
  _checks.in_range(_THRESHOLD, "momentum", momentum, 0.0, 1.0, hi_open=True)
  lr = jnp.asarray(learning_rate)
  dtype = _checks.stats_dtype(jnp.result_type(lr, jnp.asarray(momentum)))
  lr, b = lr.astype(dtype), jnp.asarray(momentum).astype(dtype)
  if nesterov:
    return 2 * (1 + b) / ((1 + 2 * b) * lr)
  return 2 * (1 + b) / lr
