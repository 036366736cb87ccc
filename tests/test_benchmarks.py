"""Smoke test of ``benchmarks/batch_norm.py --quick``: it runs and records every library and case.

No timing assertions: the numbers depend on the machine and its load.
"""

import json
import math

import pytest
from _benchmark_scripts import load as _load_script

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

pytest.importorskip("haiku", reason="the haiku peer (dm-haiku) is not installed: pip install -e '.[peers]'")
pytest.importorskip("equinox", reason="the equinox peer is not installed: pip install -e '.[peers]'")


def _bench():
  return _load_script("batch_norm")


def test_quick_run_records_every_library_and_case(tmp_path):
  bench = _bench()
  shape = (8, 4, 4, 8)
  argv = ["--quick", "--dtypes", "float32", "--shapes", "8,4,4,8", "--repeats", "1"]
  argv += ["--resnet-batch", "2", "--resnet-width", "4", "--resnet-stages", "1", "--out", str(tmp_path)]
  bench.main(argv)
  (path,) = tmp_path.glob("batch_norm_*-quick.json")
  data = json.loads(path.read_text())
  libraries = list(bench.LIBRARIES)
  assert data["libraries"] == libraries
  assert data["baseline"] == "flax.linen"
  got = sorted((c["kind"], c["dtype"], tuple(c["shape"])) for c in data["cases"])
  want = sorted(
    [(k, "float32", shape) for k in ("train", "train_forward", "inference")] + [("resnet", "float32", (2, 32, 32, 3))]
  )
  assert got == want
  for case in data["cases"]:
    assert list(case["results"]) == libraries
    for name, r in case["results"].items():
      assert r["time_s"] > 0 and math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0, (case["kind"], name)
      assert r["temp_bytes"] >= 0 and r["temp_ratio"] >= 0, (case["kind"], name)
      tol = bench.RESNET_TOLERANCE if case["kind"] == "resnet" else bench.TOLERANCE
      assert r["max_rel_err"] <= tol["float32"], (case["kind"], name, r["max_rel_err"])
    assert case["results"]["flax.linen"]["time_ratio"] == 1.0
  assert set(data["targets"]) == {
    "train_f32_median_ratio<=0.75",
    "train_max_ratio<=1",
    "resnet_max_ratio<=0.95",
    "temp_max_ratio<=1",
    "inference_max_ratio<=1",
  }
  table = path.with_suffix(".md").read_text()
  for name in libraries:
    assert f"| {name} " in table or f" {name} |" in table


def test_a_layer_set_up_differently_is_caught():
  bench = _bench()
  libs = bench.available_libraries(["flax.linen", "flax.linen exact-var"])

  def wrong_epsilon(x, scale, bias, mean, var, *, training):
    import flax.linen as nn

    layer = nn.BatchNorm(use_running_average=not training, epsilon=1e-1, momentum=bench.MOMENTUM)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

  with pytest.raises(AssertionError, match="outputs differ"):
    bench.build_layer_group({**libs, "wrong": wrong_epsilon}, "train_forward", (16, 4), "float32")
