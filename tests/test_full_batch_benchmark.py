"""Smoke test of ``benchmarks/full_batch.py``: a tiny in-process run records every contender, and the
agreement check stops a contender that does different mathematics.

No timing assertions: the numbers depend on the machine and its load.
"""

import functools
import importlib.util
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--examples", "64", "--micro-batch", "16", "--channels", "4", "--length", "16"]


@functools.cache
def _bench():
  spec = importlib.util.spec_from_file_location("jaxbn_bench_full_batch", ROOT / "benchmarks" / "full_batch.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


def test_quick_run_records_every_contender(tmp_path):
  bench = _bench()
  bench.main(["--quick", *TINY, "--repeats", "2", "--check-steps", "2", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "full_batch_quick.json").read_text())
  contenders = list(bench.CONTENDERS)
  assert data["contenders"] == contenders and list(data["results"]) == contenders
  assert data["baseline"] == "hand-written"
  assert data["config"]["micro_batches"] == 4
  results = data["results"]
  for name, r in results.items():
    assert r["steps_per_s"] > 0 and math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0, name
    assert len(r["times_s"]) == 2, name
    assert r["temp_bytes"] > 0 and r["state_bytes"] > 0 and r["peak_bytes"] > r["state_bytes"], name
    # Same mean gradient: the losses and parameters agree with the hand-written loop after 2 updates.
    agreement = r["agreement"]
    assert len(agreement["losses"]) == 2 and all(math.isfinite(v) for v in agreement["losses"]), name
    assert agreement["loss_rel_diff"] <= bench.TOLERANCE and agreement["params_rel_diff"] <= bench.TOLERANCE, name
  assert results["hand-written"]["time_ratio"] == 1.0

  # MultiSteps keeps a float32 gradient accumulator the size of the parameters in its state; the
  # other contenders keep the same parameters, batch statistics and optimizer state without it.
  model = bench.CNN(channels=4)
  params = model.init(jax.random.key(0), np.zeros((2, 16, 1), np.float32), train=False)["params"]
  param_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(params))
  assert results["optax.MultiSteps"]["accumulator_bytes"] == param_bytes
  for name in ("hand-written", "jaxbn", "jaxbn + jaxbn BN"):
    assert results[name]["accumulator_bytes"] == 0
    assert results[name]["state_bytes"] == results["optax.MultiSteps"]["state_bytes"] - param_bytes - 8, name
  # MultiSteps compiles one micro-batch program called 4 times per update; the others one step each.
  assert {p["calls_per_update"] for p in results["optax.MultiSteps"]["programs"].values()} == {4}
  assert {p["calls_per_update"] for p in results["jaxbn"]["programs"].values()} == {1}
  # The running statistics are updated differently by design (EMA per micro-batch vs once per step).
  assert results["optax.MultiSteps"]["agreement"]["batch_stats_rel_diff"] < 1e-4
  assert results["jaxbn"]["agreement"]["batch_stats_rel_diff"] > 1e-2

  assert set(data["targets"]) == {
    "time_ratio_vs_hand_written<=1.05",
    "peak_bytes_vs_multisteps<1",
    "state_bytes_vs_multisteps<1",
  }
  assert data["targets"]["state_bytes_vs_multisteps<1"]["ok"]
  table = (tmp_path / "full_batch_quick.md").read_text()
  for name in contenders:
    assert f"| {name} |" in table


def test_contenders_doing_other_mathematics_are_caught():
  bench = _bench()
  data = bench.make_data(64, 16)
  contenders, models = bench.build_contenders(["hand-written", "jaxbn no interception"], data, 16, 4)
  params_and_stats = models["flax"].init(jax.random.key(0), data["x"][:2], train=False)
  args = (params_and_stats["params"], params_and_stats["batch_stats"], 2)
  # The diagnostic variant takes full_batch_step apart but keeps its mean gradient.
  assert bench.check_agreement(contenders, *args)["jaxbn no interception"]["params_rel_diff"] <= bench.TOLERANCE
  # Ghost batches of 8 rows instead of 16: another gradient, which the check must not let through.
  wrong = {"hand-written": contenders["hand-written"], "wrong": bench.jaxbn_step(models["flax"], data, 8, name="wrong")}
  with pytest.raises(AssertionError, match="disagree with hand-written"):
    bench.check_agreement(wrong, *args)
