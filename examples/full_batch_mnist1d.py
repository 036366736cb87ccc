"""Full-batch gradient descent on MNIST-1D with a batch-norm CNN, on ``jaxbn.training``.

Every update uses the exact mean gradient over all 4000 training examples. The data set is generated
locally by the ``mnist1d`` package (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D",
ICML 2024); nothing is downloaded.

    pip install -e ".[examples]"
    python examples/full_batch_mnist1d.py                          # ~97% test accuracy, 300 steps, under a minute
    python examples/full_batch_mnist1d.py --micro-batch-size 1000  # full-batch gradient, ghost batches of 1000
    python examples/full_batch_mnist1d.py --devices 4              # the batch sharded over 4 (virtual) devices
    python examples/full_batch_mnist1d.py --stream                 # the training set streamed from files on disk

What jaxbn does here:

* The model is an ordinary ``flax.linen`` CNN whose batch norms are ``jaxbn.linen.BatchNorm`` (a
  drop-in for ``flax.linen.BatchNorm``).
* ``jaxbn.training.linen_loss`` turns the model and a per-example loss into the loss function of
  ``jaxbn.training.full_batch_step``, which returns a jitted ``step(state, data) -> (state, metrics)``.
* ``--micro-batch-size m`` makes the step go through the data in slices of ``m`` rows and accumulate the
  gradient in float32: the gradient is the exact full-batch one either way (a count-weighted mean over
  all 4000 rows, nothing dropped or counted twice) and memory holds one slice's activations. Batch norm
  then normalizes each slice with its own statistics, i.e. ghost batches of size ``m`` (Hoffer et al.,
  "Train longer, generalize better", NeurIPS 2017), a slightly different model; the running statistics
  are still updated once per step, from the exact statistics of all 4000 rows. The default is the
  whole data set at once, the fastest on a CPU. The step's default ``loop="auto"`` runs micro-batches
  in a ``lax.scan`` inside one compiled program (``--loop host`` calls one compiled program per
  micro-batch from Python instead; ``benchmarks/full_batch.py`` measures both).
* The optimizer chain starts with ``jaxbn.transforms.clip_by_running_norm`` (spike protection, as in
  ZClip: a step whose gradient norm is an outlier of the norm's running mean and variance, z-score
  above ``--spike-z``, is scaled down). At this learning rate full-batch descent runs at the edge of
  stability (Cohen et al., ICLR 2021): the gradient norm oscillates by up to 10x from step to step,
  and with the default z-score 3 the clip rescales 10-33 of the 300 steps. Final test accuracy over
  seeds 0-2, 1 CPU device: 97.1 / 96.7 / 96.8% with it, 96.2 / 96.5 / 96.6% without (``--spike-z 0``).
  Lower z-scores rescale many more steps (``--spike-z 2.5``).
* ``--no-bn-weight-decay`` keeps weight decay off the batch-norm scales and biases with
  ``jaxbn.transforms.batch_norm_mask``, a common recipe. Here it costs accuracy (seeds 0-2: 95.6 /
  95.8 / 96.4%), so by default every parameter is decayed.

  (Measured on 2 CPU cores, jax 0.10.2, 2026-12-07, with ``python examples/full_batch_mnist1d.py --seed S``
  and the flags named, on the scanned loop; the run takes 20-35 s on idle cores, compilation included.
  Results vary in the last digit between builds, and between the two loops, whose rounding differs.)
* The step's guard skips any step whose loss or gradient is not finite, leaving parameters, optimizer
  state and batch statistics unchanged; the skipped-step count is printed and plotted with the
  gradient norm that ``StepMetrics`` reports.

Batch-norm momentum: every batch is the whole training set, so its statistics already are the
training-set statistics and averaging them over steps only adds lag. The default ``--bn-momentum`` is 0
(the running statistics are those of the last step); with the usual 0.9 they trail the weights by ~10
steps, and while the learning rate is high the test accuracy measured with them drops to near chance
although the training accuracy is 80%.

``--devices N`` shards the examples over an N-device mesh (virtual CPU devices are created if needed):
the jitted step then computes the batch-norm statistics and the gradient over the global batch, with
no code change. It follows the single-device run up to float rounding (training loss within 1e-4 for
the first 40 steps with 4 devices); once the learning rate is high enough for the edge-of-stability
oscillations, rounding differences grow, as between any two builds, and the runs end at similar
accuracy. ``examples/multi_device.py`` compares the parallel styles exactly.

``--stream`` trains from the disk instead of device memory: the training set is written to ``.npy``
files in a temporary folder, opened with ``np.load(..., mmap_mode="r")`` and handed to the step as a
``jaxbn.training.HostData``, which reads each micro-batch from the files and puts it on the devices
(sharded as with ``--devices``) while the one before is computed. The step then runs on the host loop
whatever ``--loop`` says (only it can take data from Python between micro-batches), and its numbers
are those of the in-memory host loop: ``--stream`` and ``--loop host`` both end at 96.8% test accuracy,
seed 0, with byte-identical ``metrics.csv`` (so do ``--stream --devices 4 --micro-batch-size 200`` and
its in-memory ``--loop host`` run); the default, scanned run rounds differently and ends at 97.1%. The
train accuracy at the end is measured a chunk at a time from the files too.

Checkpoints: every ``--checkpoint-every`` steps (and after the last) the whole state of the run goes
into ``checkpoints/<step>/`` inside the output folder, written atomically with Orbax's checkpoint
manager, the newest 3 kept: parameters, optimizer state (with ``clip_by_running_norm``'s running
statistics and clip count), batch statistics, the applied and guard-skipped step counters, and every
metric so far. Rerunning the same command resumes from the newest checkpoint and says so; the
resumed run writes the same ``metrics.csv`` and ends with bitwise the same parameters as one that
was never interrupted (``tests/test_resume.py`` SIGKILLs one to check). A checkpoint that cannot be
read back intact is reported and moved to ``checkpoints_unreadable/``, and the one before it is
used. A rerun with other settings is refused; ``--fresh`` deletes the checkpoints and starts over,
``--checkpoint-every 0`` neither writes nor reads them. The data set is fixed and the initialisation
comes from ``--seed``, so nothing else is random.

Outputs (in ``runs/full_batch_mnist1d/`` unless ``--out`` says otherwise): ``loss.png``,
``grad_norm.png``, ``test_accuracy.png``, ``metrics.csv`` and ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import tempfile
import time
from typing import Any

import _common  # examples/_common.py: devices, data, progress bar, tables, plots
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.training
import jaxbn.transforms

NAME = "full_batch_mnist1d"
# Flags that do not change the run's numbers: a run may resume the checkpoints of one that differs in these only.
NOT_CONFIG = ("out", "no_progress", "checkpoint_every", "fresh", "hold_after_step", "stream")
CONVS = ((5, 2), (3, 2), (3, 2))  # (kernel width, stride) per convolution: length 40 -> 20 -> 10 -> 5


class CNN(nn.Module):
  """Three stride-2 convolutions, each followed by batch norm and a ReLU, then a linear classifier.

  Input: sequences of shape (batch, length); batch norm normalizes over the batch and length axes
  (features last). The convolutions have no bias: the batch-norm bias that follows plays its role.
  With ``batch_norm=False`` (``examples/full_batch_vs_sgd.py``'s comparison) the batch norms are
  left out and the convolutions get a bias instead; the model then has no ``batch_stats``.
  """

  channels: int = 32
  num_classes: int = 10
  bn_momentum: float = 0.0
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(jaxbn.linen.BatchNorm, use_running_average=not train, momentum=self.bn_momentum)
    h = x[..., None]  # (batch, length, 1 channel)
    for width, stride in CONVS:
      conv = nn.Conv(
        self.channels,
        (width,),
        strides=(stride,),
        use_bias=not self.batch_norm,
        kernel_init=nn.initializers.he_normal(),
      )
      h = conv(h)
      h = nn.relu(norm()(h) if self.batch_norm else h)
    return nn.Dense(self.num_classes)(h.reshape(h.shape[0], -1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example 0/1 correctness (float32)."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def make_optimizer(
  learning_rate: float, steps: int, *, weight_decay: float, decay_mask: Any = None, spike_z: float | None = None
) -> optax.GradientTransformation:
  """Spike clipping (``spike_z``: z-score threshold, falsy for none), weight decay, Nesterov SGD.

  ``decay_mask`` (a pytree of bools like the parameters, or None for all of them) says which
  parameters are decayed.

  The learning rate warms up linearly over 10% of the steps and then follows a cosine decay to 1% of
  its peak (the full-batch recipe of Geiping et al., "Stochastic Training is Not Necessary for
  Generalization", ICLR 2022, shortened).
  """
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup_steps=max(1, steps // 10), decay_steps=max(2, steps), end_value=learning_rate * 0.01
  )
  return optax.chain(
    # First in the chain, where the updates are still the full-batch gradient.
    jaxbn.transforms.clip_by_running_norm(z_threshold=spike_z) if spike_z else optax.identity(),
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.sgd(schedule, momentum=0.9, nesterov=True),
  )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--steps", type=int, default=300, help="full-batch gradient steps")
  parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (after warm-up)")
  parser.add_argument(
    "--micro-batch-size",
    type=int,
    default=None,
    help="rows per micro-batch (and batch-norm ghost batch); the gradient is the full-batch one either way "
    "(default: the whole training set)",
  )
  parser.add_argument(
    "--loop",
    choices=("auto", "scan", "host"),
    default="auto",
    help="how the step runs micro-batches: 'scan' (one compiled program), 'host' (one compiled program per "
    "micro-batch, called from Python); 'auto': the step's default (scan)",
  )
  parser.add_argument("--weight-decay", type=float, default=2e-2, help="L2 weight decay added to the gradient")
  parser.add_argument(
    "--no-bn-weight-decay", action="store_true", help="no weight decay on batch-norm scales and biases"
  )
  parser.add_argument(
    "--spike-z", type=float, default=3.0, help="z-score threshold of clip_by_running_norm (0 switches it off)"
  )
  parser.add_argument("--bn-momentum", type=float, default=0.0, help="momentum of the running batch-norm statistics")
  parser.add_argument("--channels", type=int, default=32, help="channels of each convolution")
  parser.add_argument("--devices", type=int, default=1, help="number of devices to shard the full batch over")
  parser.add_argument(
    "--stream",
    action="store_true",
    help="train from the training set written to disk (memory-mapped .npy files), streamed to the devices a "
    "micro-batch at a time with jaxbn.training.HostData (on the host loop)",
  )
  parser.add_argument("--seed", type=int, default=0, help="parameter initialisation seed (the data set is fixed)")
  parser.add_argument("--eval-every", type=int, default=1, help="evaluate test accuracy every this many steps")
  parser.add_argument("--train-examples", type=int, default=None, help="use only the first N training examples")
  parser.add_argument("--out", default=f"runs/{NAME}", help="output folder")
  parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
  parser.add_argument(
    "--checkpoint-every",
    type=int,
    default=50,
    help="save the whole state to <out>/checkpoints/ every this many steps and after the last (0: never save "
    "nor resume); rerunning the same command resumes from the newest checkpoint",
  )
  parser.add_argument("--fresh", action="store_true", help="delete the checkpoints in --out and start over")
  # For tests only, hence hidden: after step N (and its checkpoint, if any) print "holding after step N"
  # and sleep until killed, so that a test can SIGKILL the run at a known point without racing its end.
  parser.add_argument("--hold-after-step", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  if args.eval_every < 1:
    parser.error(f"--eval-every must be >= 1, got {args.eval_every}")
  if args.micro_batch_size is not None and args.micro_batch_size < 1:
    parser.error(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
  if args.spike_z < 0:
    parser.error(f"--spike-z must be >= 0, got {args.spike_z}")
  if args.checkpoint_every < 0:
    parser.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
  return args


def new_log(steps: int) -> dict[str, np.ndarray]:
  """Per-step metrics of a run of ``steps`` steps, filled in as it goes; checkpointed with the state.

  Row ``t - 1`` is step ``t``: loss, gradient norm and train accuracy before update ``t``, whether the
  guard skipped it and whether ``clip_by_running_norm`` rescaled it, and the test accuracy after it
  where ``evaluated`` (NaN elsewhere). Fixed shapes, so that a checkpoint restores into a fresh log.
  """
  zeros = lambda dtype: np.zeros(steps, dtype)
  log = {k: zeros(np.float32) for k in ("loss", "grad_norm", "train_accuracy")}
  log.update(skipped=zeros(bool), clipped=zeros(bool), evaluated=zeros(bool))
  log["test_accuracy"] = np.full(steps, np.nan, np.float32)
  return log


def resume(
  args: argparse.Namespace, out: Any, state: jaxbn.training.TrainState
) -> tuple[_common.Checkpoints | None, int, jaxbn.training.TrainState, dict[str, np.ndarray]]:
  """Opens the run's checkpoints and restores the newest one, if any.

  Args:
    args: the parsed command line.
    out: the output folder.
    state: the initial training state (its structure, shapes and shardings are those restored).

  Returns:
    ``(checkpoints, done, state, log)``: the checkpoints (None with ``--checkpoint-every 0``), the
    number of steps already taken, and the training state and metrics log to continue from.
  """
  log = new_log(args.steps)
  if not args.checkpoint_every:
    return None, 0, state, log
  config = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
  checkpoints = _common.Checkpoints(out, config, every=args.checkpoint_every, fresh=args.fresh)
  restored = checkpoints.restore({"train": state, "log": log})
  if restored is None:
    return checkpoints, 0, state, log
  done, saved = restored
  print(f"resuming from the checkpoint of step {done} of {args.steps} in {checkpoints.directory} (--fresh starts over)")
  return checkpoints, done, saved["train"], {k: np.array(v) for k, v in saved["log"].items()}


def _shardings(devices: list[Any], sizes: tuple[int, ...]):
  """(data, replicated) shardings: the example axis split over ``devices``, everything else replicated."""
  if len(devices) == 1:
    single = jax.sharding.SingleDeviceSharding(devices[0])
    return single, single
  bad = [s for s in sizes if s % len(devices)]
  if bad:
    raise ValueError(f"--devices {len(devices)} must divide the number of examples {sizes}; {bad} is not divisible.")
  # Auto axes: under jax.jit with a sharded batch XLA computes the batch-norm statistics (and the
  # gradient) over the global batch; the model needs no axis_name.
  mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  return NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains, prints the test accuracy beside the published MNIST-1D results, writes plots; returns the numbers."""
  start = time.perf_counter()
  args = parse_args(argv)
  devices = _common.use_devices(args.devices)  # first: may create virtual CPU devices
  out = _common.output_dir(NAME, args.out)

  raw = _common.load_mnist1d()
  train = {"x": raw["x"][: args.train_examples], "y": raw["y"][: args.train_examples]}
  test = {"x": raw["x_test"], "y": raw["y_test"]}
  data_sharding, replicated = _shardings(devices, (len(train["x"]), len(test["x"])))
  folder = tempfile.TemporaryDirectory(prefix="mnist1d_") if args.stream else None
  if folder is not None:
    # On disk, opened memory-mapped: the step reads one micro-batch at a time from the files.
    for name, rows in train.items():
      np.save(pathlib.Path(folder.name, f"{name}.npy"), rows)
    train = {name: np.load(pathlib.Path(folder.name, f"{name}.npy"), mmap_mode="r") for name in train}
    train_data = jaxbn.training.HostData(train, sharding=data_sharding)
    test = jax.device_put(test, data_sharding)
  else:
    train, test = jax.device_put((train, test), data_sharding)
    train_data = train

  model = CNN(channels=args.channels, bn_momentum=args.bn_momentum)
  variables = model.init(jax.random.key(args.seed), train["x"][:2], train=False)
  decay_mask = None
  if args.no_bn_weight_decay:  # batch_norm_mask finds the batch norms' parameters from the variables
    decay_mask = jax.tree.map(lambda is_bn: not is_bn, jaxbn.transforms.batch_norm_mask(variables))
  optimizer = make_optimizer(
    args.lr, args.steps, weight_decay=args.weight_decay, decay_mask=decay_mask, spike_z=args.spike_z
  )
  loss_fn = jaxbn.training.linen_loss(
    model, optax.softmax_cross_entropy_with_integer_labels, metrics=accuracy, train=True
  )
  # The loss function carries the running-statistics update (loss_fn.update_batch_stats) to the step.
  step = jaxbn.training.full_batch_step(loss_fn, optimizer, micro_batch_size=args.micro_batch_size, loop=args.loop)
  loop = step.loop  # the one "auto" picked for this backend
  state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], optimizer)
  state = jax.device_put(state, replicated)

  @jax.jit
  def evaluate(params, batch_stats, batch):
    """Accuracy with the running batch-norm statistics."""
    logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"], train=False)
    return jnp.mean(accuracy(logits, batch["y"]))

  num_params = sum(p.size for p in jax.tree.leaves(state.params))
  micro = "whole set" if args.micro_batch_size is None else f"micro-batches of {args.micro_batch_size}, {loop} loop"
  if args.stream:
    micro += ", streamed from disk on the host loop"
  print(
    f"MNIST-1D: {len(train['x'])} train / {len(test['x'])} test examples; CNN with jaxbn batch norm, "
    f"{num_params} parameters; {args.steps} full-batch steps ({micro}) on {len(devices)} "
    f"{devices[0].platform} device(s)"
  )

  checkpoints, done, state, log = resume(args, out, state)
  clipped_before = int(state.opt_state[0].num_clipped) if args.spike_z else 0
  bar = _common.progress(
    range(done + 1, args.steps + 1), total=args.steps, initial=done, desc="full-batch GD", enabled=not args.no_progress
  )
  for i in bar:
    state, metrics = step(state, train_data)
    log["loss"][i - 1], log["grad_norm"][i - 1] = metrics.loss, metrics.grad_norm
    log["train_accuracy"][i - 1], log["skipped"][i - 1] = metrics.extra, metrics.skipped
    clipped_now = int(state.opt_state[0].num_clipped) if args.spike_z else 0
    log["clipped"][i - 1] = clipped_now > clipped_before
    clipped_before = clipped_now
    if i % args.eval_every == 0 or i == args.steps:
      log["test_accuracy"][i - 1], log["evaluated"][i - 1] = evaluate(state.params, state.batch_stats, test), True
      bar.set_postfix(loss=f"{log['loss'][i - 1]:.4f}", test_acc=f"{log['test_accuracy'][i - 1]:.3f}", refresh=False)
    if checkpoints is not None:
      checkpoints.save(i, {"train": state, "log": log}, last=i == args.steps)
    if i == args.hold_after_step:
      print(f"holding after step {i}", flush=True)
      while True:
        time.sleep(60)
  if checkpoints is not None:
    checkpoints.close()

  history = {k: log[k].tolist() for k in ("loss", "grad_norm", "train_accuracy", "skipped", "clipped")}
  eval_steps = [int(s) for s in np.flatnonzero(log["evaluated"]) + 1]
  test_accuracy = log["test_accuracy"][log["evaluated"]].tolist()

  # Loss, gradient norm and train accuracy at step t are those of the parameters before update t;
  # test accuracy is measured after it.
  steps_axis = np.arange(1, args.steps + 1)
  skipped_at = steps_axis[np.asarray(history["skipped"], bool)]
  clipped_at = steps_axis[np.asarray(history["clipped"], bool)]
  grad_norm = np.asarray(history["grad_norm"], np.float64)
  finite_norm = np.where(np.isfinite(grad_norm), grad_norm, np.nan)
  top = np.nanmax(finite_norm) if np.any(np.isfinite(finite_norm)) else 1.0
  plots = [
    _common.save_curve(
      out / "loss.png",
      {"train loss (full batch)": (steps_axis, history["loss"])},
      title="MNIST-1D, full-batch GD: training loss",
      ylabel="cross-entropy",
      logy=True,
    ),
    _common.save_curve(
      out / "grad_norm.png",
      {"||full-batch gradient|| (StepMetrics.grad_norm)": (steps_axis, finite_norm)},
      title="MNIST-1D, full-batch GD: gradient norm",
      ylabel="global L2 norm",
      logy=True,
      markers={
        f"rescaled by clip_by_running_norm: {len(clipped_at)} steps": (clipped_at, finite_norm[clipped_at - 1]),
        f"skipped by the guard (non-finite): {len(skipped_at)} steps": (skipped_at, np.full(len(skipped_at), top)),
      },
    ),
    _common.save_curve(
      out / "test_accuracy.png",
      {
        "test (running batch-norm statistics)": (eval_steps, 100 * np.asarray(test_accuracy)),
        "train (batch statistics, before the step)": (steps_axis, 100 * np.asarray(history["train_accuracy"])),
      },
      title="MNIST-1D, full-batch GD: accuracy",
      ylabel="accuracy (%)",
      hlines={f"published {name}: {acc:.0f}%": acc for name, acc in _common.MNIST1D_PUBLISHED if acc >= 60},
    ),
  ]
  test_at = dict(zip(eval_steps, test_accuracy, strict=True))
  with open(out / "metrics.csv", "w") as f:
    f.write("step,loss,grad_norm,train_accuracy,test_accuracy,skipped,clipped\n")
    for i, s in enumerate(steps_axis):
      acc = test_at.get(int(s))
      f.write(
        f"{s},{history['loss'][i]:.6g},{history['grad_norm'][i]:.6g},{history['train_accuracy'][i]:.4f},"
        f"{'' if acc is None else f'{acc:.4f}'},{int(history['skipped'][i])},{int(history['clipped'][i])}\n"
      )

  final_test = test_accuracy[-1]
  if folder is None:
    train_accuracy = float(evaluate(state.params, state.batch_stats, train))
  else:  # from the files, a chunk at a time
    n, chunk = len(train["y"]), 1000
    batches = ({k: jax.device_put(np.asarray(v[s : s + chunk])) for k, v in train.items()} for s in range(0, n, chunk))
    train_accuracy = sum(float(evaluate(state.params, state.batch_stats, b)) * len(b["y"]) for b in batches) / n
    folder.cleanup()
  wall = time.perf_counter() - start
  rows = [[f"{name} (published)", f"{acc:.0f}%"] for name, acc in _common.MNIST1D_PUBLISHED]
  rows.append([f"this run: CNN + jaxbn batch norm, {args.steps} full-batch steps", f"{100 * final_test:.1f}%"])
  print(_common.format_table(["MNIST-1D model", "test accuracy"], rows))
  print(
    f"train accuracy {100 * train_accuracy:.1f}%, final train loss {history['loss'][-1]:.4f}; "
    f"steps skipped by the guard: {int(state.skipped)}, rescaled by clip_by_running_norm: {len(clipped_at)}; "
    f"wall time {wall:.1f} s (data generation and JIT compilation included)"
  )
  print(f"plots and metrics.csv written to {out}/")
  return {
    "test_accuracy": final_test,
    "train_accuracy": train_accuracy,
    "final_loss": history["loss"][-1],
    "history": history,
    "eval_steps": eval_steps,
    "test_accuracy_history": test_accuracy,
    "skipped_steps": int(state.skipped),
    "applied_steps": int(state.step),
    "resumed_from_step": done,
    "clipped_steps": len(clipped_at),
    "steps": args.steps,
    "devices": len(devices),
    "num_params": num_params,
    "wall_time_s": wall,
    "plots": [str(p) for p in plots],
    "out": str(out),
  }


if __name__ == "__main__":
  main()
