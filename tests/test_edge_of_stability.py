"""Smoke tests of examples/edge_of_stability.py: outputs written, sharpness exact, the edge of stability shown."""

import contextlib
import importlib.util
import io
import pathlib
import sys

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def eos():
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  spec = importlib.util.spec_from_file_location("jaxbn_example_edge_of_stability", EXAMPLES / "edge_of_stability.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax modules look their module up while being defined
  spec.loader.exec_module(module)
  return module


TINY = ["--lrs", "0.3", "--steps", "30", "--every", "10", "--train-examples", "200", "--width", "8", "--no-progress"]


def test_tiny_run_writes_outputs_and_measures_the_exact_sharpness(eos, tmp_path, capsys):
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = eos.main([*TINY[:-1], "--models", "batchnorm", "--out", str(tmp_path)])  # with the progress bar
  bar = capsys.readouterr().err
  assert "tanh MLP + jaxbn batch norm, lr 0.3" in bar and "30/30" in bar  # names the run, counts its steps
  text = printed.getvalue()
  (png,) = result["plots"]
  data = pathlib.Path(png).read_bytes()
  assert pathlib.Path(png) == tmp_path / "sharpness.png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  lines = (tmp_path / "metrics.csv").read_text().splitlines()
  assert lines[0] == "model,lr,step,loss,sharpness,threshold" and len(lines) == 1 + 31

  (run,) = result["runs"].values()
  assert list(result["runs"]) == ["batchnorm lr=0.3"]
  assert run["checkpoints"] == [0, 10, 20, 30] and len(run["losses"]) == 30
  assert np.all(np.isfinite(run["sharpness"])) and min(run["sharpness"]) > 0
  assert run["threshold"] == pytest.approx(2 / 0.3) and not run["diverged"]
  assert run["final_loss"] < run["losses"][0]
  assert f"{run['sharpness'][0]:.2f}" in text

  # The sharpness at step 0 is the top eigenvalue of the dense Hessian of the same full-batch loss
  # (506 parameters; the batch norms normalize with the statistics of all 200 rows).
  raw = eos._common.load_mnist1d()
  x, targets = raw["x"][:200], jax.nn.one_hot(raw["y"][:200], 10)
  model = eos.MLP(width=8, batch_norm=True)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  flat, unravel = ravel_pytree(variables["params"])
  assert flat.size == run["num_params"] == 506
  loss = eos.make_loss(model, variables, x, targets)
  hessian = jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat)
  top = np.linalg.eigvalsh(np.asarray(hessian, np.float64))[-1]
  assert run["sharpness"][0] == pytest.approx(top, rel=1e-3)
  assert "Summary" in text and "sharpness / (2/lr)" in text


def test_quick_run_sharpens_to_two_over_lr_and_stays(eos, tmp_path):
  # The claim of the example at its --quick size (lr 0.3, 600 steps, 1000 examples, plain MLP):
  # the sharpness starts well below 2/lr, rises to it, then stays near it while the loss still falls.
  result = eos.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  (run,) = result["runs"].values()
  summary = run["summary"]
  assert summary["initial_sharpness"] < 0.8 * run["threshold"]
  assert summary["reached_at"] is not None and summary["reached_at"] <= 400
  assert 0.9 <= summary["ratio_mean"] <= 1.2 and summary["ratio_max"] < 1.5
  assert summary["loss_increases"] > 0  # non-monotone at the edge of stability
  assert run["final_loss"] < 0.6 * run["losses"][0]


def test_rejects_bad_arguments(eos, tmp_path):
  with pytest.raises(SystemExit):
    eos.main(["--lrs", "0", "--out", str(tmp_path)])
  with pytest.raises(SystemExit):
    eos.main(["--every", "0", "--out", str(tmp_path)])
