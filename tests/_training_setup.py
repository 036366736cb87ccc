"""A small deterministic batch-norm training setup shared by the checkpoint test and its worker."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(16, use_bias=False)(x)
    x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(3)(x)


def build():
  rng = np.random.default_rng(0)
  data = {"x": jnp.asarray(rng.normal(size=(50, 5)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, 50))}
  model = Net()
  variables = model.init(jax.random.key(0), data["x"], train=False)
  # Every part of the state holds something a wrong restore would lose: running clip statistics, a key.
  opt = optax.chain(jaxbn.transforms.clip_by_running_norm(warmup_steps=2), optax.adamw(1e-2, weight_decay=1e-3))
  loss_fn = jaxbn.training.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels, train=True)
  step = jaxbn.training.full_batch_step(
    loss_fn, opt, micro_batch_size=16, update_batch_stats=loss_fn.update_batch_stats
  )
  state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], opt, key=jax.random.key(3))
  return step, state, data
