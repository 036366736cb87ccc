"""Data on the host or on disk (``jaxbn.training.HostData``): streamed steps equal the in-memory ones, their
programs see one micro-batch whatever the data set's size, and bad sources are refused by name."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.training import HostData, TrainState, full_batch_step, linen_loss

ROWS, MICRO = 200, 48  # one device: 4 micro-batches of 48 and a remainder; 8 devices: 25 rows each, 6 per micro-batch
TWO = 128  # one device: 128 rows, then the last 128 with 56 of them masked; 8 devices: 16 of 25 rows, 7 masked


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, use_bias=False)(x)
    x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=False)(x))
    return nn.Dense(3)(x)


def _rows(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(1.0, 2.0, (n, 5)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}


class Sliced:
  """A source with rows but no arrays of its own (as a Grain data source): ``len`` and ``[start:stop]``."""

  def __init__(self, rows):
    self.rows = rows

  def __len__(self):
    return len(next(iter(self.rows.values())))

  def __getitem__(self, index):
    return {k: v[index] for k, v in self.rows.items()}


@pytest.fixture(scope="module")
def setup():
  loss_fn = linen_loss(Net(), optax.softmax_cross_entropy_with_integer_labels)
  variables = Net().init(jax.random.key(1), jnp.zeros((2, 5)))
  opt = optax.sgd(0.1, momentum=0.9)
  return loss_fn, opt, TrainState.create(variables["params"], variables["batch_stats"], opt)


def _two_steps(step, state, data):
  metrics = []
  for _ in range(2):
    state, m = step(state, data)
    metrics.append(m)
  return jax.tree.map(np.asarray, (state, metrics))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
  "devices, bn_mode",
  [
    (1, "ghost"),
    (8, "exact"),
    pytest.param(1, "exact", marks=pytest.mark.slow),
    pytest.param(8, "ghost", marks=pytest.mark.slow),
  ],
)
def test_streamed_step_equals_in_memory_step(setup, bn_mode, devices, tmp_path, monkeypatch):
  loss_fn, opt, state = setup
  rows = _rows(ROWS)
  if devices == 1:
    sharding, replicated = jax.devices()[0], jax.devices()[0]
    np.save(tmp_path / "x.npy", rows["x"])  # from disk: a memory-mapped file, read a micro-batch at a time
    source = {"x": np.load(tmp_path / "x.npy", mmap_mode="r"), "y": rows["y"]}
  else:
    mesh = jax.make_mesh((8,), ("batch",))
    sharding, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    source = Sliced(rows)
  if bn_mode == "ghost":  # loop="auto" streams on the host loop on every backend, the scanned one's too
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  step = full_batch_step(
    loss_fn, opt, micro_batch_size=TWO, bn_mode=bn_mode, loop="host" if bn_mode == "exact" else "auto", donate=False
  )
  monkeypatch.undo()
  streamed = _two_steps(step, jax.device_put(state, replicated), HostData(source, sharding=sharding))
  reference = full_batch_step(loss_fn, opt, micro_batch_size=TWO, bn_mode=bn_mode, loop="host", donate=False)
  in_memory = _two_steps(reference, jax.device_put(state, replicated), jax.device_put(rows, sharding))
  _assert_same(streamed, in_memory)
  assert np.isfinite(streamed[1][1].loss) and streamed[0].step == 2


def _program_sizes(setup, rows, bn_mode):
  loss_fn, opt, state = setup
  step = full_batch_step(loss_fn, opt, micro_batch_size=MICRO, loop="host", bn_mode=bn_mode, donate=False)
  step(state, HostData(rows))
  sizes = {}
  for name, (types, _) in step.calls.items():
    if name == "update":  # no data
      continue
    memory = step.programs[name].lower(*types).compile().memory_analysis()
    sizes[name] = (memory.argument_size_in_bytes, memory.temp_size_in_bytes, memory.output_size_in_bytes)
  return sizes, step.calls


@pytest.mark.parametrize("bn_mode", ["ghost", pytest.param("exact", marks=pytest.mark.slow)])
def test_programs_see_one_micro_batch_whatever_the_data_set_size(setup, bn_mode):
  small, small_calls = _program_sizes(setup, _rows(ROWS), bn_mode)
  large, large_calls = _program_sizes(setup, _rows(10 * ROWS), bn_mode)
  assert {n.split()[-1] for n in small} == {"start", "each", "finish"}
  # Every program's arguments (parameters, statistics, one micro-batch's rows, the running sums), temporaries
  # and results are the same for 10x the rows: 5 micro-batches or 42.
  assert small == large
  rows = [r for r in jax.tree.leaves(small_calls, is_leaf=lambda x: hasattr(x, "blocks")) if hasattr(r, "blocks")]
  assert rows and all(r.batch["x"].shape == (MICRO, 5) for r in rows)
  assert {r.rows for r in rows} == {ROWS} and large_calls.keys() == small_calls.keys()


@pytest.mark.slow
def test_sharpness_streams_too():
  # Lanczos from Python, each Hessian-vector product a sweep of compiled JVPs reading the micro-batches.
  def loss_fn(params, batch_stats, batch, mask):
    err = jnp.tanh(batch["x"] @ params["w"]) ** 2
    return jnp.sum(jnp.where(mask, err, 0)) / jnp.sum(mask), jaxbn.training.LossAux()

  rows = _rows(ROWS)
  state = TrainState.create({"w": jnp.linspace(-1.0, 1.0, 5)}, {}, optax.sgd(0.1))
  fn = jaxbn.training.sharpness(loss_fn, micro_batch_size=TWO, num_iters=2, loop="host")
  streamed, _ = fn(state, HostData(rows))
  in_memory, _ = fn(state, jax.device_put(rows))
  np.testing.assert_array_equal(streamed, in_memory)
  assert np.isfinite(streamed)
  # loop="auto" streams on the host loop on every backend, where it picks the scanned loop for arrays.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, "default_backend", lambda: "gpu")
    auto = jaxbn.training.sharpness(loss_fn, micro_batch_size=TWO, num_iters=2)
  np.testing.assert_array_equal(auto(state, HostData(rows), init=None)[0], in_memory)
  # On arrays, the scanned loop: the same up to float32 rounding in the sums (measured 2.6e-6 relative).
  np.testing.assert_allclose(auto(state, jax.device_put(rows))[0], in_memory, rtol=2e-5)


@pytest.mark.parametrize("devices", [1, 8])
def test_minibatch_epoch_reads_host_data(setup, devices, tmp_path, monkeypatch):
  """An epoch of mini-batches gathered from a HostData equals the epoch on the same rows in device memory."""
  loss_fn, opt, state = setup
  rows = _rows(ROWS)
  step = full_batch_step(loss_fn, opt, donate=False)
  key = jax.random.key(3)
  if devices == 1:  # batches of 48 and a remainder of 8, from a memory-mapped file and from a slicing source
    np.save(tmp_path / "x.npy", rows["x"])
    sources = [{"x": np.load(tmp_path / "x.npy", mmap_mode="r"), "y": rows["y"]}, Sliced(rows)]
    sharding, sizes = None, [48]
  else:  # 56 rows split over the 8 devices like the data (the remainder of 32 too); 36 (and 20) a copy on each
    sharding, sources, sizes = NamedSharding(jax.make_mesh((8,), ("batch",)), P("batch")), [rows], [56, 36]
  for size in sizes:
    expected, history = jaxbn.training.minibatch_epoch(step, state, jax.device_put(rows), batch_size=size, key=key)
    assert len(history) == -(-ROWS // size)
    for source in sources:
      data = HostData(source, sharding=sharding)
      got, _ = jaxbn.training.minibatch_epoch(step, state, data, batch_size=size, key=key)
      if devices == 1:
        _assert_same(got, expected)
      else:  # the same rows, their sums over the devices in another order
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
  data = HostData(rows)
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # as if each process held its own rows
  with pytest.raises(ValueError, match=r"minibatch_epoch: data is a jaxbn.training.HostData over 2 processes"):
    jaxbn.training.minibatch_epoch(step, state, data, batch_size=48, key=key)


def test_scan_loop_refuses_host_data(setup):
  loss_fn, opt, state = setup
  step = full_batch_step(loss_fn, opt, micro_batch_size=MICRO, loop="scan", donate=False)
  with pytest.raises(ValueError, match=r"HostData, which only the host loop can stream .* loop='scan'"):
    step(state, HostData(_rows(ROWS)))
  with pytest.raises(ValueError, match=r"only the host loop can stream .* loop='scan'"):
    jaxbn.training.sharpness(loss_fn, loop="scan", jit=False)(state, HostData(_rows(ROWS)))


def test_bad_sources_are_refused_by_name():
  mesh = jax.make_mesh((8,), ("batch",))
  rows = _rows(ROWS)
  bad = [
    (
      {"x": np.zeros((4, 2)), "y": np.zeros(5)},
      None,
      ValueError,
      r"the leaves of source disagree in their number of rows: leading sizes \[4, 5\]",
    ),
    (
      {"x": np.zeros((4, 2)), "s": np.zeros(())},
      None,
      ValueError,
      r"every leaf of source needs a leading \(row\) axis",
    ),
    ({"x": np.zeros((0, 2))}, None, ValueError, "source has no rows \\(every leaf"),
    (Sliced({"x": np.zeros((0, 2))}), None, ValueError, r"source has no rows \(len\(source\) == 0\)"),
    ({}, None, TypeError, "source must be a pytree of NumPy arrays"),
    ({"x": jnp.zeros((4, 2))}, None, TypeError, "source holds JAX arrays"),
    (rows, "batch", TypeError, "sharding must be None, a jax.Device or a NamedSharding"),
    (rows, NamedSharding(mesh, P(None, "batch")), ValueError, "sharding must split the leading \\(row\\) axis"),
    (
      {"x": np.zeros((20, 2))},
      NamedSharding(mesh, P("batch")),
      ValueError,
      "the source holds 20 rows, which the 8 device",
    ),
  ]
  for source, sharding, error, message in bad:
    with pytest.raises(error, match=r"jaxbn.training.HostData: " + message):
      HostData(source, sharding=sharding)


def test_a_source_that_miscounts_its_rows_is_named(setup):
  loss_fn, opt, state = setup

  class Short(Sliced):
    def __getitem__(self, index):
      return {k: v[index][:1] for k, v in self.rows.items()}

  step = full_batch_step(loss_fn, opt, micro_batch_size=MICRO, loop="host", donate=False)
  with pytest.raises(ValueError, match=r"source\[0:48\] returned .* leading sizes \[1\]; expected 48 rows"):
    step(state, HostData(Short(_rows(ROWS))))


@pytest.mark.slow
def test_two_processes_stream_their_own_rows(tmp_path):
  # 2 processes x 4 CPU devices, each HostData holding and reading only its process's rows, against the
  # whole data set in the device memory of 1 process x 8 devices.
  import _multihost_stream_worker as worker
  from test_multihost import _run_workers

  script = pathlib.Path(__file__).with_name("_multihost_stream_worker.py")
  folder, _ = _run_workers(tmp_path, script=script, out="stream.npz")
  with np.load(folder / "stream.npz") as saved:
    got = dict(saved)
  mesh = jax.make_mesh((8,), ("batch",))
  want = worker.run(mesh, jax.device_put(worker.rows(0, worker.ROWS), NamedSharding(mesh, P("batch"))))
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
