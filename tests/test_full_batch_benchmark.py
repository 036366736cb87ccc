"""Smoke test of ``benchmarks/full_batch.py``: a tiny in-process run records every contender, and the
agreement check stops a contender that does different mathematics.

No timing assertions: the numbers depend on the machine and its load.
"""

import json
import math

import jax
import numpy as np
import pytest
from _benchmark_scripts import load as _load_script

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

TINY = ["--examples", "64", "--micro-batch", "16", "--channels", "4", "--length", "16"]
DATA_BYTES = 64 * 16 * 4 + 64 * 4  # x float32 (64, 16, 1), y int32 (64,)


def _bench():
  return _load_script("full_batch")


def test_quick_run_records_every_contender(tmp_path):
  bench = _bench()
  bench.main(["--quick", *TINY, "--repeats", "2", "--check-steps", "2", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "full_batch_quick.json").read_text())
  contenders = list(bench.CONTENDERS)
  assert data["contenders"] == contenders and list(data["results"]) == contenders
  assert data["baseline"] == "hand-written"
  assert data["config"]["micro_batches"] == 4 and data["config"]["batch_norm_layers"] == 3
  results = data["results"]
  same_objective = [n for n in contenders if n != bench.EXACT]
  for name, r in results.items():
    assert r["steps_per_s"] > 0 and math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0, name
    assert len(r["times_s"]) == 2, name
    assert r["temp_bytes"] > 0 and r["state_bytes"] > 0 and r["peak_bytes"] > r["state_bytes"], name
    agreement = r["agreement"]
    assert len(agreement["losses"]) == 2 and all(math.isfinite(v) for v in agreement["losses"]), name
    for label, p in r["programs"].items():
      # Everything alive when a program starts (state, the dataset once, accumulators) covers its arguments.
      assert p["live_bytes"] >= p["argument_bytes"], (name, label)
      assert p["peak_bytes"] == p["live_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"], (name, label)
      assert p["live_bytes"] == r["state_bytes"] + DATA_BYTES + r["transient_bytes"] or (
        p["live_bytes"] == p["argument_bytes"]
      ), (name, label)
    assert r["peak_bytes"] == max(p["peak_bytes"] for p in r["programs"].values()), name
    assert "peak_live_bytes" not in r and "rss_growth_bytes" not in r, name  # not measured by --quick
  for name in same_objective:
    # Same mean gradient: the losses and parameters agree with the hand-written loop after 2 updates.
    agreement = results[name]["agreement"]
    assert agreement["checked"] == "agreement", name
    assert agreement["loss_rel_diff"] <= bench.TOLERANCE and agreement["params_rel_diff"] <= bench.TOLERANCE, name
  assert results["hand-written"]["time_ratio"] == 1.0

  # MultiSteps keeps a float32 gradient accumulator the size of the parameters in its state; the
  # other contenders keep the same parameters, batch statistics and optimizer state without it.
  model = bench.CNN(channels=4)
  params = model.init(jax.random.key(0), np.zeros((2, 16, 1), np.float32), train=False)["params"]
  param_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(params))
  assert results["optax.MultiSteps"]["accumulator_bytes"] == param_bytes
  for name in contenders:
    if name != "optax.MultiSteps":
      assert results[name]["accumulator_bytes"] == 0
      assert results[name]["state_bytes"] == results["optax.MultiSteps"]["state_bytes"] - param_bytes - 8, name
  # MultiSteps compiles one micro-batch program called 4 times per update; the scanned steps (jaxbn's
  # default) one step each, its while loop holding every convolution in XLA:CPU's canonical layout.
  assert {p["calls_per_update"] for p in results["optax.MultiSteps"]["programs"].values()} == {4}
  for name in ("jaxbn", "jaxbn + jaxbn BN"):
    assert {label: p["calls_per_update"] for label, p in results[name]["programs"].items()} == {"step": 1}, name
    assert results[name]["programs"]["step"]["while_loops"] >= 1, name
  # The host loop: its start, micro-batch (four times), finish and update programs; an accumulator of the
  # parameters' size (and the loss, and the statistics) lives during an update only.
  for name in ("jaxbn host loop", "jaxbn host loop + jaxbn BN"):
    r = results[name]
    calls = {label: p["calls_per_update"] for label, p in r["programs"].items()}
    assert calls == {"ghost start": 1, "ghost each": 4, "ghost finish": 1, "update": 1}, (name, calls)
    assert r["transient_bytes"] > param_bytes
    micro, update = r["programs"]["ghost each"], r["programs"]["update"]
    # The micro-batch programs get the whole dataset but not the (resident) optimizer state; the
    # update program neither the dataset: both count as live, not as arguments.
    assert micro["argument_bytes"] > DATA_BYTES and micro["live_bytes"] > micro["argument_bytes"], name
    assert update["argument_bytes"] < DATA_BYTES and update["live_bytes"] > DATA_BYTES, name
    assert all(p["while_loops"] == 0 for p in r["programs"].values()), name
  # The running statistics are updated differently by design (EMA per micro-batch vs once per step).
  assert results["optax.MultiSteps"]["agreement"]["batch_stats_rel_diff"] < 1e-4
  assert results["jaxbn"]["agreement"]["batch_stats_rel_diff"] > 1e-2

  # Exact batch norm: another objective (checked for finite losses), L statistics sweeps + 1 loss
  # sweep + L adjoint sweeps, each a while loop of the one scanned step; the ghost step has one sweep.
  exact = results[bench.EXACT]
  assert exact["agreement"]["checked"] == "finite"
  assert exact["sweeps"] == 2 * 3 + 1
  assert set(exact["programs"]) == {"step"}
  assert exact["time_ratio_vs_ghost"] > 0 and exact["peak_ratio_vs_ghost"] > 0
  # Same data, same start: the exact objective's first loss is close to, but not, the ghost one.
  ghost_loss = results[bench.EXACT_REFERENCE]["agreement"]["losses"][0]
  assert exact["agreement"]["losses"][0] != ghost_loss
  assert abs(exact["agreement"]["losses"][0] - ghost_loss) < 0.1 * abs(ghost_loss)

  targets = data["targets"]
  assert set(targets) == {"jaxbn", "jaxbn + jaxbn BN", "jaxbn host loop", "jaxbn host loop + jaxbn BN", bench.EXACT}
  for lib in bench.TARGET_CONTENDERS:
    vs_multisteps = {"time_ratio_vs_multisteps<=1.05"} if lib in bench.DEFAULTS else set()
    assert set(targets[lib]) == {
      "time_ratio_vs_hand_written<=1.05",
      "peak_bytes_vs_multisteps<1",
      "state_bytes_vs_multisteps<1",
      *vs_multisteps,
    }
    assert targets[lib]["state_bytes_vs_multisteps<1"]["ok"]
    assert results[lib]["time_ratio_vs_multisteps"] > 0
  # (2L + 1) / 2 plus 15% for L = 3 layers.
  assert list(targets[bench.EXACT]) == ["time_ratio_vs_ghost<=(2L+1)/2*1.15=4.02"]
  table = (tmp_path / "full_batch_quick.md").read_text()
  for name in contenders:
    assert f"| {name} |" in table
  assert "sweeps over the micro-batches per update: 7" in table


def test_host_loop_programs_measured_are_the_ones_it_runs():
  """The host loop's programs are measured with the argument types the step called them with."""
  bench = _bench()
  data = bench.make_data(64, 16)
  contenders, models = bench.build_contenders(["jaxbn host loop + jaxbn BN"], data, 16, 4)
  c = contenders["jaxbn host loop + jaxbn BN"]
  variables = models["flax"].init(jax.random.key(0), data["x"][:2], train=False)
  fresh = lambda: c.init(variables["params"], variables["batch_stats"])
  jax.block_until_ready(c.update(fresh()))
  programs = c.program_args(fresh())
  assert set(programs) == {"ghost start", "ghost each", "ghost finish", "update"}
  for label, (args, _) in programs.items():
    compiled = c.fns[label].lower(*args).compile()
    # "start" reads only its arguments' types: it makes the empty running sums.
    assert (compiled.memory_analysis().argument_size_in_bytes > 0) == (label != "ghost start"), label
    # The step's own program, compiled once for these types: "each" too, whose first call gets the sums "start" made.
    assert c.fns[label]._cache_size() == 1, label


def test_buffer_peak_reads_live_buffers_from_a_dump(tmp_path):
  """Live temporaries at the peak from XLA's dump: values sharing bytes count once, holes do not count."""
  bench = _bench()
  dump = tmp_path / "dump"
  dump.mkdir()
  # A temporary heap of 400 bytes: a (0-99) and b (100-299) live together, c reuses a's bytes later
  # together with d (300-399) and with e, which shares b's buffer (an in-place update).
  (dump / "module_0001.jit_f.cpu_after_optimizations-buffer-assignment.txt").write_text(
    "BufferAssignment:\n"
    "allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:\n"
    " value: <0 p @0> (size=64,offset=0): f32[16]{0}\n"
    "allocation 1: size 400, preallocated-temp:\n"
    " value: <1 a @0> (size=100,offset=0): f32[25]{0}\n"
    " value: <2 b @0> (size=200,offset=100): f32[50]{0}\n"
    " value: <3 c @0> (size=100,offset=0): f32[25]{0}\n"
    " value: <4 d @0> (size=100,offset=300): f32[25]{0}\n"
    " value: <5 e{1} @0> (size=200,offset=100): f32[50]{0}\n"
  )
  (dump / "module_0001.jit_f.cpu_after_optimizations-live-range.txt").write_text(
    "HloLiveRange (max 5):\n  InstructionSequence:\n    0:p\n    1:a\n    2:b\n    3:c\n    4:d\n    5:e\n"
    "  BufferLiveRange:\n    p{}:0-5\n    a{}:1-2\n    b{}:2-5\n    c{}:3-4\n    d{}:4-4\n    e{1}:5-5\n"
  )
  peak = bench.buffer_peak(dump, "jit_f", top=2)
  assert peak["heap_bytes"] == 400
  assert peak["live_temp_bytes"] == 400 and peak["at"] == "d"  # b, c and d at position 4
  assert [v[2] for v in peak["top"]] == ["b{}", "c{}"]
  assert bench.buffer_peak(dump, "jit_g") is None


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


def test_host_loop_programs_times_every_program_of_an_update(tmp_path):
  """``benchmarks/host_loop_programs.py``: each program an update runs, with its calls per update."""
  script = _load_script("host_loop_programs")
  tiny = ["--examples", "64", "--micro-batch-size", "16", "--channels", "4", "--length", "16"]
  result = script.main([*tiny, "--repeats", "2", "--out", str(tmp_path)])
  calls = {name: {label: c for label, (_, c) in r["programs"].items()} for name, r in result["contenders"].items()}
  assert calls == {
    "optax.MultiSteps": {"micro step": 4},
    "jaxbn host loop": {"ghost start": 1, "ghost each": 4, "ghost finish": 1},
    "jaxbn host loop + jaxbn BN": {"ghost start": 1, "ghost each": 4, "ghost finish": 1},
  }
  assert all(r["update"] > 0 for r in result["contenders"].values())
  table = (tmp_path / "host_loop_programs.md").read_text()
  assert "| jaxbn host loop | ghost each | 4 |" in table and json.loads(
    (tmp_path / "host_loop_programs.json").read_text()
  )
