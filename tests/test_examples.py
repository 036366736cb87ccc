"""Smoke tests of the runnable examples at tiny sizes: outputs written, printed and returned numbers sane."""

import contextlib
import importlib.util
import io
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _deadlines import scaled

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
  """Imports examples/<name>.py as a module (the examples import their sibling ``_common``)."""
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  spec = importlib.util.spec_from_file_location(f"jaxbn_example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (flax modules) look their module up while being defined
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def full_batch():
  return _load("full_batch_mnist1d")


@pytest.fixture(scope="module")
def seed_regression():
  return _load("seed_regression")


@pytest.fixture(scope="module")
def explosion():
  return _load("gradient_explosion")


def _assert_pngs(paths, out):
  assert paths and all(pathlib.Path(p).parent == pathlib.Path(out) for p in paths)
  for p in paths:
    data = pathlib.Path(p).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p


TINY_MNIST1D = ["--steps", "25", "--lr", "0.2", "--train-examples", "400", "--channels", "8", "--eval-every", "5"]


@pytest.fixture(scope="module")
def tiny_mnist1d_run(full_batch, tmp_path_factory):
  """One tiny single-device run of the main job: (returned dict, printed text, output folder)."""
  out = tmp_path_factory.mktemp("full_batch_one_device")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = full_batch.main([*TINY_MNIST1D, "--no-progress", "--out", str(out)])
  return result, printed.getvalue(), out


def test_full_batch_mnist1d_trains_and_writes_outputs(tiny_mnist1d_run):
  result, printed, out = tiny_mnist1d_run
  _assert_pngs(result["plots"], out)
  assert {pathlib.Path(p).name for p in result["plots"]} == {"loss.png", "grad_norm.png", "test_accuracy.png"}
  lines = (out / "metrics.csv").read_text().splitlines()
  assert lines[0] == "step,loss,grad_norm,train_accuracy,test_accuracy,skipped,clipped" and len(lines) == 26

  loss, grad_norm = np.array(result["history"]["loss"]), np.array(result["history"]["grad_norm"])
  assert loss.shape == grad_norm.shape == (25,) and np.all(np.isfinite(loss)) and np.all(grad_norm > 0)
  assert loss[0] == pytest.approx(math.log(10), abs=0.5)  # ~chance at initialisation
  assert loss[-1] < 0.8 * loss[0]
  assert result["eval_steps"] == [5, 10, 15, 20, 25]
  # 25 steps on 400 examples: above chance (10%) on the 1000 test examples, with running statistics.
  assert 0.2 < result["test_accuracy"] <= 1.0
  assert result["train_accuracy"] > 0.35

  # The comparison with the published table is printed.
  for name in ("logistic regression", "MLP", "CNN", "GRU", "human"):
    assert f"{name} (published)" in printed
  assert f"{100 * result['test_accuracy']:.1f}%" in printed


def test_full_batch_mnist1d_sharded_batch_matches_one_device(full_batch, tiny_mnist1d_run, tmp_path):
  # The full batch split over 4 devices (the root conftest.py provides 8 virtual CPU devices) must follow
  # the single-device trajectory: batch-norm statistics and gradients are over the global batch.
  one, _, _ = tiny_mnist1d_run
  four = full_batch.main([*TINY_MNIST1D, "--devices", "4", "--no-progress", "--out", str(tmp_path)])
  assert one["devices"] == 1 and four["devices"] == 4
  np.testing.assert_allclose(four["history"]["loss"], one["history"]["loss"], rtol=1e-4)
  np.testing.assert_allclose(four["history"]["grad_norm"], one["history"]["grad_norm"], rtol=1e-3)
  np.testing.assert_allclose(four["test_accuracy_history"], one["test_accuracy_history"], atol=2e-3)


def test_full_batch_mnist1d_streamed_from_disk_matches_in_memory(full_batch, tmp_path):
  # --stream: the training set as memory-mapped .npy files, read a micro-batch at a time by HostData on
  # the host loop, whose streamed numbers are those of the in-memory host loop.
  tiny = [*TINY_MNIST1D, "--steps", "10", "--no-progress"]
  in_memory = full_batch.main([*tiny, "--loop", "host", "--out", str(tmp_path / "memory")])
  streamed = full_batch.main([*tiny, "--stream", "--out", str(tmp_path / "streamed")])
  assert streamed["history"] == in_memory["history"]
  assert streamed["test_accuracy_history"] == in_memory["test_accuracy_history"]
  assert streamed["train_accuracy"] == pytest.approx(in_memory["train_accuracy"], abs=1e-6)


def _started_with_eight_devices():
  """JAX's backend started with the 8 CPU devices of conftest.py: a script asked for more in a process where JAX
  has not started yet creates them (its documented behaviour), which the first test of a worker could see."""
  import jax

  assert len(jax.devices("cpu")) == 8


def test_full_batch_mnist1d_rejects_bad_device_counts(full_batch, tmp_path):
  _started_with_eight_devices()
  with pytest.raises(ValueError, match=r"--devices 64 asked for more devices than JAX has \(8 cpu"):
    full_batch.main(["--devices", "64", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match=r"--devices 3 must divide the number of examples"):
    full_batch.main(["--devices", "3", "--train-examples", "400", "--out", str(tmp_path)])


def test_full_batch_mnist1d_micro_batches(full_batch, tiny_mnist1d_run, tmp_path, capsys):
  # Micro-batches of 100 rows: the gradient is accumulated over all 400 rows, batch norm uses ghost
  # batches of 100, so the trajectory is close to, but not the same as, the whole-batch one.
  one, _, _ = tiny_mnist1d_run
  args = [*TINY_MNIST1D, "--steps", "6", "--micro-batch-size", "100", "--no-progress", "--out", str(tmp_path)]
  ghost = full_batch.main(args)  # the later --steps wins
  assert "micro-batches of 100" in capsys.readouterr().out
  loss = np.array(ghost["history"]["loss"])
  assert loss.shape == (6,) and np.all(np.isfinite(loss)) and loss[-1] < loss[0]
  # At the same initial parameters only the batch-norm statistics differ: per 100 rows, not per 400.
  whole = one["history"]["loss"][0]
  assert loss[0] == pytest.approx(whole, rel=0.05) and abs(loss[0] - whole) > 1e-4


def test_full_batch_mnist1d_guard_skips_non_finite_steps(full_batch, tmp_path, capsys, monkeypatch):
  # One NaN in the training inputs makes every full-batch loss NaN: the step's guard skips them all,
  # so the parameters and running statistics (hence the test accuracy) never change.
  real = full_batch._common.load_mnist1d()
  x = np.array(real["x"])
  x[3, 7] = np.nan
  monkeypatch.setattr(full_batch._common, "load_mnist1d", lambda: {**real, "x": x})
  args = ["--steps", "3", "--train-examples", "400", "--channels", "8", "--no-progress", "--out", str(tmp_path)]
  result = full_batch.main(args)
  assert result["skipped_steps"] == 3 and result["applied_steps"] == 0
  assert result["history"]["skipped"] == [True, True, True] and np.all(np.isnan(result["history"]["loss"]))
  assert len(set(result["test_accuracy_history"])) == 1
  assert "steps skipped by the guard: 3" in capsys.readouterr().out
  assert [line.split(",")[-2] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]] == ["1"] * 3
  _assert_pngs(result["plots"], tmp_path)


@pytest.fixture(scope="module")
def multi_device():
  return _load("multi_device")


def test_multi_device_styles_agree_with_one_device(multi_device, capsys):
  args = ["--devices", "4", "--steps", "2", "--examples", "400", "--micro-batch-size", "100", "--bn-rows", "64"]
  result = multi_device.main(args)
  captured = capsys.readouterr()
  printed = captured.out
  # The progress bar (stderr) names the style being compiled and run: the script takes tens of seconds.
  assert all(style in captured.err for style in ("one device", *multi_device.STYLES))
  assert result["devices"] == 4 and set(result["diffs"]) == set(multi_device.STYLES)
  synced, local = multi_device.STYLES[:-1], multi_device.STYLES[-1]
  for style in synced:
    assert style in printed
    assert result["relative"][style] < 1e-5, (style, result["diffs"][style])
  # Without the batch norms' axis_name every device normalizes with its own rows' statistics.
  assert result["relative"][local] > 1e-2
  assert result["diffs"][local]["bn output"] > 1e-2 and result["diffs"][local]["step bn stats"] > 1e-3
  assert "4 of 4 synced styles agree" in printed


def test_multi_device_order_rebuilds_the_single_device_micro_batches(multi_device):
  # 10 rows, micro-batches of 4 ([0:4], [4:8], [8:10]) over 2 devices: device 0 holds the first half
  # of each, device 1 the second.
  order = multi_device.device_major_order(10, 4, 2)
  np.testing.assert_array_equal(order, [0, 1, 4, 5, 8, 2, 3, 6, 7, 9])
  np.testing.assert_array_equal(multi_device.device_major_order(12, 12, 3), np.arange(12))


def test_multi_device_rejects_bad_sizes(multi_device):
  _started_with_eight_devices()
  with pytest.raises(ValueError, match=r"--devices 64 asked for more CPU devices than JAX has \(8\)"):
    multi_device.main(["--devices", "64"])
  with pytest.raises(ValueError, match=r"--micro-batch-size 100 must be divisible by the number of devices \(8\)"):
    multi_device.main(["--devices", "8", "--examples", "800", "--micro-batch-size", "100"])


def test_seed_regression_plain_diverges_batch_norm_converges(seed_regression, tmp_path, capsys):
  result = seed_regression.main(["--out", str(tmp_path)])
  printed = capsys.readouterr().out
  _assert_pngs(result["plots"], tmp_path)
  runs = result["runs"]
  assert set(runs) == {"scale 10 / plain", "scale 10 / batch norm", "scale 1 / plain", "scale 1 / batch norm"}

  for scale, xs in (("scale 10", [10, 20, 30, 40, 50]), ("scale 1", [1, 2, 3, 4, 5])):
    plain, bn = runs[f"{scale} / plain"], runs[f"{scale} / batch norm"]
    # Exact reference: the Hessian of mean((w x + b - y)^2) in (w, b) is 2 [[E x^2, E x], [E x, 1]].
    x = np.asarray(xs, np.float64)
    hessian = 2 * np.array([[np.mean(x**2), np.mean(x)], [np.mean(x), 1.0]])
    assert plain["max_stable_lr"] == pytest.approx(2 / np.linalg.eigvalsh(hessian).max(), rel=1e-4)
    assert bn["max_stable_lr"] == pytest.approx(1.0, rel=1e-3)  # Hessian 2 I on normalized inputs
    assert plain["diverged"] and not bn["diverged"]
    assert plain["initial_loss"] == bn["initial_loss"] == pytest.approx(np.mean(x**2))
    # GD on a quadratic with Hessian 2 I at lr 0.1 contracts the error by 0.8 per step: loss x 0.64.
    assert bn["losses"][10] == pytest.approx(bn["losses"][0] * 0.64**10, rel=1e-3)
    assert bn["final_loss"] < 1e-6 * bn["initial_loss"]
    # With the running (cumulative) statistics the trained model predicts y = x.
    np.testing.assert_allclose(bn["eval_predictions"], x, rtol=1e-3)
    assert bn["params"]["w"] == pytest.approx(np.std(x), rel=1e-3)
  assert "diverged" in printed and printed.count(" yes ") == 2 and printed.count(" no ") == 2


def test_seed_regression_small_lr_makes_plain_converge(seed_regression, tmp_path):
  result = seed_regression.main(["--lr", "0.0005", "--steps", "200", "--out", str(tmp_path)])
  plain = result["runs"]["scale 10 / plain"]
  assert not plain["diverged"] and plain["final_loss"] < 1e-2 * plain["initial_loss"]


def test_seed_regression_runs_as_a_script(tmp_path):
  proc = subprocess.run(
    [sys.executable, str(EXAMPLES / "seed_regression.py"), "--steps", "2", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=scaled(120),
  )
  assert proc.returncode == 0, proc.stderr
  assert "scale 10 / batch norm" in proc.stdout and (tmp_path / "loss.png").exists()


def test_gradient_explosion_measures_growth(explosion, tmp_path, capsys):
  args = ["--depths", "24", "--width", "48", "--examples", "256", "--steps", "3"]
  result = explosion.main([*args, "--out", str(tmp_path)])
  captured = capsys.readouterr()
  printed = captured.out
  assert all(f"depth 24, {v}" in captured.err for v in ("none", "bn", "bn+res"))  # the bar names each run
  _assert_pngs(result["plots"], tmp_path)
  rows = {(r["depth"], r["variant"]): r for r in result["rows"]}
  assert set(rows) == {(24, v) for v in ("none", "bn", "bn+res")}
  assert result["theory_growth"] == pytest.approx(1.2112, abs=1e-4)

  deep = {v: rows[24, v] for v in ("none", "bn", "bn+res")}
  norms = np.array(result["layer_grad_norms"]["24/bn"])
  assert norms.shape == (24,) and np.all(np.isfinite(norms))
  # Batch norm without skips: exponential growth towards the input, near the mean-field rate.
  assert 1.1 < deep["bn"]["growth_per_layer"] < 1.3
  assert deep["bn"]["first_over_last"] > 10
  # Without normalization (He init) and with residual blocks the growth is far smaller.
  assert deep["none"]["growth_per_layer"] < 1.05
  assert deep["bn+res"]["first_over_last"] < deep["bn"]["first_over_last"] / 3
  for r in result["rows"]:
    assert set(r["final_loss"]) == {"gd", "damped", "clipped"}
    assert math.isfinite(r["initial_loss"])
    assert set(r["verdict"].values()) <= {"diverged", "stalled", "trains"}
  assert "growth/layer" in printed and "+damping b=1" in printed and "+clip 1" in printed


@pytest.mark.parametrize(("beta", "clip"), [(0.0, math.inf), (0.5, math.inf), (0.0, 2.0), (0.5, 1.0)])
def test_gradient_explosion_update_rules(explosion, beta, clip):
  # One optimizer with traced hyperparameters serves the three rules: beta=0 and clip=inf switch
  # damping and clipping off. Reference: -lr * clip(g / (1 + beta |g|)) computed by hand.
  import jax
  import jax.numpy as jnp

  grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # global norm 5
  lr = 0.1

  @jax.jit
  def update(beta, clip):
    tx = explosion.make_optimizer(lr, beta, clip)
    return tx.update(grads, tx.init(grads), grads)[0]

  updates = update(beta, clip)
  damped = 5.0 / (1.0 + beta * 5.0)
  factor = min(damped, clip) / 5.0
  for k in grads:
    np.testing.assert_allclose(updates[k], -lr * factor * np.asarray(grads[k]), rtol=1e-6)


@pytest.fixture(scope="module")
def versus():
  return _load("full_batch_vs_sgd")


TINY_VERSUS = ["--passes", "2", "--seeds", "0", "--train-examples", "400", "--channels", "8", "--sharpness-iters", "3"]


def test_full_batch_vs_sgd_measures_every_arm(versus, tmp_path, capsys):
  result = versus.main([*TINY_VERSUS, "--no-progress", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  _assert_pngs(result["plots"], tmp_path)
  assert list(result["results"]) == list(versus.ARMS) == [r[0] for r in _table(printed, versus.ARMS)]
  for name, (run,) in result["results"].items():
    arm = versus.ARMS[name]
    assert run["seed"] == 0 and run["passes"] == [1, 2] and len(run["curve"]) == 2
    # 400 rows: 13 batches of 32 (the last holds 16) or 4 of 128 (the last 16) per pass, 1 full-batch step.
    assert run["updates"] == 2 * {32: 13, 128: 4, None: 1}[arm.batch_size] and run["skipped"] == 0
    assert 0.0 <= run["accuracy"] <= 1.0 and run["accuracy"] == run["curve"][-1]
    assert 0.0 <= run["train_accuracy"] <= 1.0 and run["wall_time_s"] > 0
    assert math.isfinite(run["sharpness"]) and run["sharpness"] > 0 and run["block_gradient_norm"] > 0
    # Only the arms with a penalty report one, and it is positive.
    assert (run["penalty"] is None) == (arm.penalty == 0), name
    assert run["penalty"] is None or run["penalty"] > 0
  assert versus.ARMS["recipe"].penalty > 0 and not versus.ARMS["recipe_no_bn"].batch_norm
  # The Markdown and JSON results hold the same numbers as the printed table.
  markdown = (tmp_path / "results.md").read_text()
  for row in result["table"]:
    assert "| " + " | ".join(row) + " |" in markdown
  record = json.loads((tmp_path / "results.json").read_text())
  assert record["arms"]["recipe"]["runs"][0]["accuracy"] == result["results"]["recipe"][0]["accuracy"]


def _table(printed, arms):
  """The printed table's rows, as (arm name, cells), in order."""
  labels = {arm.label: name for name, arm in arms.items()}
  rows = []
  for line in printed.splitlines():
    label = next((text for text in sorted(labels, key=len, reverse=True) if line.startswith(text + "  ")), None)
    if label is not None:
      rows.append((labels[label], line[len(label) :].split()))
  return rows


def test_full_batch_vs_sgd_block_gradient_norm_is_the_step_penalty_and_the_mean_over_blocks(versus):
  # The study computes mean_k ||grad L_k||^2 itself. It is the value of the step's gradient penalty at alpha = 4,
  # and by hand each block of 7 consecutive rows a loss of its own, normalized with its own batch statistics:
  # on 80 rows 12 blocks, the last holding 3 (the step vmaps them, as over the study's 125 blocks).
  import jax
  import jax.numpy as jnp
  import optax

  import jaxbn.training

  raw = versus._common.load_mnist1d()
  n, block = 80, 7
  data = {"x": jnp.asarray(raw["x"][:n]), "y": jnp.asarray(raw["y"][:n])}
  model = versus.CNN(channels=4)
  variables = model.init(jax.random.key(0), data["x"][:2], train=False)
  loss_fn = jaxbn.training.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels, train=True)
  state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], optax.sgd(0.1))
  value = versus.block_gradient_norm(loss_fn, state, data, block)

  probe = optax.sgd(0.0)
  step = jaxbn.training.full_batch_step(
    loss_fn, probe, gradient_penalty=4.0, penalty_block_size=block, penalty_method="finite_difference", donate=False
  )
  _, metrics = step(jaxbn.training.TrainState.create(state.params, state.batch_stats, probe), data)
  # float32 rounding: the blocks' gradients come from another program (measured: 0 here, up to 3e-7 at other sizes)
  assert value == pytest.approx(float(metrics.gradient_penalty), rel=1e-6)

  blocks = [jax.tree.map(lambda a, s=s: a[s : s + block], data) for s in range(0, n, block)]
  gradient = jax.jit(jax.grad(lambda p, b: loss_fn(p, state.batch_stats, b, None)[0]))  # compiled once per shape
  squared = [sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(gradient(state.params, b))) for b in blocks]
  expected = sum(len(b["y"]) * s for b, s in zip(blocks, squared, strict=True)) / n
  assert value == pytest.approx(expected, rel=1e-4)


def test_full_batch_vs_sgd_tune_scores_on_held_out_rows(versus, tmp_path, capsys):
  args = ["--tune", "--arms", "gd", "--passes", "1", "--train-examples", "1000", "--channels", "8"]
  result = versus.main([*args, "--no-progress", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  assert "1000 training rows" not in printed and "500 training rows, accuracy on 500 held-out training rows" in printed
  runs = result["tune"]
  assert [r["setting"]["lr"] for r in runs] == [point["lr"] for point in versus.GRID["gd"]]
  assert all(r["seed"] == versus.TUNE_SEED and r["updates"] == 1 for r in runs)
  best = max(runs, key=lambda r: r["accuracy"])
  assert result["best"]["gd"]["lr"] == best["setting"]["lr"] and printed.count("<- best") == 1
  assert (tmp_path / "tune.md").exists() and json.loads((tmp_path / "tune.json").read_text()) == runs
