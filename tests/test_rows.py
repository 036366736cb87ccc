"""jaxbn._rows: the proof that a loss treats each row on its own, which bn_mode='exact' relies on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbn import _rows

xent = optax.softmax_cross_entropy_with_integer_labels
ROWS = {"x": jnp.ones((6, 8, 8, 2)), "t": jnp.ones((6, 5), jnp.int32), "y": jnp.arange(6) % 3}


class PerRow(nn.Module):
  """Convolutions, pooling, dropout, layer norm, an embedding and attention within each row."""

  @nn.compact
  def __call__(self, x, t):
    h = nn.Conv(4, (3, 3))(x)
    h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = nn.avg_pool(h, (2, 2), padding="SAME")
    h = nn.Dropout(0.5, deterministic=False)(h)
    h = nn.LayerNorm()(h.reshape(h.shape[0], -1))
    e = nn.SelfAttention(num_heads=2)(nn.Embed(10, 8)(t))
    return nn.Dense(3)(jnp.concatenate([h, e.mean(1)], axis=1))


def _mean_loss(out, rows, mask):
  per_row = xent(out, rows["y"])
  return jnp.sum(jnp.where(mask, per_row, 0)) / jnp.maximum(jnp.sum(mask), 1)


def test_a_model_without_batch_statistics_is_proven_row_by_row():
  model = PerRow()
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, ROWS["x"], ROWS["t"])

  def loss(params, rows, mask):
    out = model.apply(params, rows["x"], rows["t"], rngs={"dropout": jax.random.key(2)})
    return _mean_loss(out, rows, mask)

  assert _rows.mixing_of_rows(loss, (variables, ROWS, jnp.ones(6, bool)), (False, True, True)) is None


@pytest.mark.parametrize(
  "transform, kind",
  [
    (lambda h: h - h.mean(0, keepdims=True), "mixes"),  # a batch norm's centring
    (lambda h: jax.nn.softmax(h, axis=0), "mixes"),  # a softmax over the batch
    (lambda h: h * jnp.sum(h), "mixes"),  # a scalar made of all rows, back on every row
    (lambda h: h + h[::-1], "mixes"),  # rows meet rows in another order
    (lambda h: h @ (h.T @ h), "mixes"),  # a batch covariance applied to the rows
    (lambda h: jnp.sort(h, axis=0), "mixes"),  # order statistics over the batch
    (lambda h: h.reshape(2, 3, -1).mean(1).repeat(3, 0), "unknown"),  # ghost batches: rows regrouped
  ],
  ids=["centre", "softmax", "scalar", "reversed", "covariance", "sort", "ghost"],
)
def test_operations_across_rows_are_found(transform, kind):
  def loss(w, rows, mask):
    h = rows["x"].reshape(6, -1) @ w
    return _mean_loss(transform(h)[:, :3], rows, mask)

  found = _rows.mixing_of_rows(loss, (jnp.ones((128, 4)), ROWS, jnp.ones(6, bool)), (False, True, True))
  assert found is not None and found[0] == kind, found


def test_scans_and_conditionals_are_followed():
  def loss(w, rows, mask):
    h = rows["x"].reshape(6, -1) @ w

    def layer(c, _):
      return jnp.tanh(c @ jnp.eye(4)), None

    h, _ = jax.lax.scan(layer, h, None, length=3)
    h = jax.lax.cond(jnp.sum(w) > 0, lambda a: a * 2.0, lambda a: a, h)
    h = jax.checkpoint(lambda a: a + 1.0)(h)
    return _mean_loss(h[:, :3], rows, mask)

  args = (jnp.ones((128, 4)), ROWS, jnp.ones(6, bool))
  assert _rows.mixing_of_rows(loss, args, (False, True, True)) is None
  assert np.isfinite(float(loss(*args)))
