"""Mutation check: small deliberate bugs in jaxbn's key mechanisms, each of which the tests must catch.

    python tests/mutants/run.py            # every mutant: prints a table, exits 1 if one survives
    python tests/mutants/run.py --list     # the mutants and the tests that should catch them
    python tests/mutants/run.py --only "variance shift" --only "remainder mask"
    python tests/mutants/run.py --no-baseline   # as CI runs it: the suite runs the tests unmutated anyway

Each mutant is a replacement of one snippet inside one named function of the library (found with
``ast``, so a mutant whose code moved fails loudly instead of testing nothing). The runner copies the
repository once to a temporary folder, checks that the selected tests pass there unmutated, then for
each mutant writes the changed function, runs only the tests that should catch it and restores the
file. A mutant is caught when pytest reports a failing test; it survives when they all pass; anything
else (an import error, no test collected) is an error of the list, also a failure. Each mutant lists
the smallest selection that catches it (pytest runs it with ``-x``: the first failure ends the run,
so later node ids only run where the earlier ones miss). Each run is a fork of the runner, which has
imported JAX, Flax and pytest once (a new Python process where there is no fork, or with
``JAXBN_MUTANTS_NO_FORK=1``).

Keep the list current when code moves: ``tests/test_mutants.py`` runs this in CI.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]
COPIED = ("jaxbn", "tests", "conftest.py", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
  """``old`` becomes ``new`` inside function ``function`` of ``path``; ``tests`` are pytest node ids."""

  name: str
  path: str
  function: str
  old: str
  new: str
  tests: tuple[str, ...]


MUTANTS = (
  Mutant(
    "variance shift",  # one-pass sums without the shift: cancellation at large means
    "jaxbn/stats.py",
    "_parts",
    "shift = lax.stop_gradient(_first_valid(x, mask, feature_axes)).astype(cdt)",
    "shift = jnp.zeros_like(_first_valid(x, mask, feature_axes)).astype(cdt)",
    ("tests/test_stats.py::test_variance_accurate_at_large_mean_float32",),
  ),
  Mutant(
    "unweighted per-device means",  # the mean of per-part means, as flax's cross-device average
    "jaxbn/stats.py",
    "_merge_rows",
    "dmean = jnp.sum(jnp.where(part, count * delta, 0), axis=0) / jnp.maximum(total, 1)",
    "dmean = jnp.sum(jnp.where(part, delta, 0), axis=0) / jnp.maximum(jnp.sum(part, axis=0), 1)",
    (
      "tests/test_parallel.py::test_uneven_counts_two_devices_exact_where_flax_averages_means",
      "tests/test_stats.py::test_merge_is_exact_for_uneven_parts",
    ),
  ),
  Mutant(
    "rounding before the merge",  # each part's mean rounded to one float before the merge
    "jaxbn/stats.py",
    "_merge_rows",
    "delta = (hi - ref_hi) + (lo - ref_lo)",
    "delta = (hi + lo) - (ref_hi + ref_lo)",
    ("tests/test_stats.py::test_cross_device_variance_accurate_at_large_mean",),
  ),
  Mutant(
    "biased for unbiased running variance",
    "jaxbn/functional.py",
    "running_update",
    "var = stats.m2 / jnp.maximum(stats.count - 1, 1)",
    "var = stats.var",
    ("tests/test_functional.py::test_unbiased_running_variance_is_bessel_corrected",),
  ),
  Mutant(
    "mask in the backward correction",  # masked-out elements get the mean's correction too
    "jaxbn/_fused.py",
    "_bn_train_bwd",
    "correction = jnp.where(mask, correction, 0)",
    "correction = correction",
    ("tests/test_fused.py::test_fused_gradients_equal_autodiff[rows-shape2--1]",),  # masked rows, (64, 7)
  ),
  Mutant(
    "projection in SGDP/AdamP",  # the radial part of the update is kept
    "jaxbn/transforms/projection.py",
    "_remove_radial",
    "return u - pn * jnp.sum(pn * u, axis=axes, keepdims=True)",
    "return u + 0 * pn",
    (
      "tests/peers/test_adamp.py::test_sgdp_matches_reference[plain]",
      "tests/peers/test_adamp.py::test_adamp_matches_reference[plain]",
    ),
  ),
  Mutant(
    "remainder mask",  # the last micro-batch counts the rows it re-reads a second time
    "jaxbn/training/sweep.py",
    "slice",
    "valid = start + jnp.arange(m) >= i * m",
    "valid = start + jnp.arange(m) >= 0",
    ("tests/test_training.py::test_without_batch_norm_equals_one_step_on_the_whole_dataset[3]",),  # 10 rows by 3
  ),
  Mutant(
    "stats update on a skipped step",  # the guard keeps parameters but not the running statistics
    "jaxbn/training/step.py",
    "_GuardedUpdate.__call__",
    "batch_stats = keep(batch_stats, state.batch_stats)",
    "batch_stats = batch_stats",
    ("tests/test_training.py::test_non_finite_step_changes_nothing",),
  ),
  Mutant(
    "guard blind to statistics",  # overflowing batch statistics do not skip the step
    "jaxbn/training/step.py",
    "_GuardedUpdate.__call__",
    "finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(stats)]))",
    "finite &= True",
    ("tests/test_training.py::test_guard_also_covers_overflowing_statistics_and_float16_norms",),
  ),
  Mutant(
    "accumulation dtype",  # micro-batch gradients summed in the parameters' dtype
    "jaxbn/training/sweep.py",
    "accumulator_dtype",
    "return _checks.stats_dtype(jnp.result_type(p))",
    "return jnp.result_type(p)",
    ("tests/test_training.py::test_accumulated_bfloat16_gradient_is_the_float32_mean",),
  ),
  Mutant(
    "exact-mode adjoint chain",  # earlier layers miss the later layers' share of their adjoints
    "jaxbn/training/exact.py",
    "_adjoint_sweep",
    "jax.tree.map(jnp.add, before, g_diff)",
    "before",
    (  # flax's model.apply on all rows: one layer called twice, so the second call's adjoint reaches the first
      "tests/test_exact_batch_norm.py::test_layer_called_twice_updates_like_model_apply[exact-None]",
      "tests/test_exact_batch_norm.py::test_equals_one_batch_on_the_whole_dataset[MLP-shape1-8]",
    ),
  ),
  Mutant(
    "exact-mode second derivatives",  # the adjoint sweep holds the whole-data mean fixed
    "jaxbn/training/exact.py",
    "_ExactHook.__call__",
    "t_mean, t_var, mean, count = self.cotangent",
    "t_mean, t_var, mean, count = self.cotangent\n    mean = jax.lax.stop_gradient(mean)",
    ("tests/test_derivative_oracles.py::test_linen_gradient_hvp_and_sharpness_equal_one_flax_pass[exact-scan-10]",),
  ),
  Mutant(
    "restore of counters",  # skipped taken from the template instead of the checkpoint
    "jaxbn/training/checkpoint.py",
    "restore_checkpoint",
    "return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(restored))",
    "return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(restored))._replace(skipped=like.skipped)",
    ("tests/test_checkpoint.py",),
  ),
  Mutant(
    "one running update for a layer called twice",  # the calls' statistics merged into one update
    "jaxbn/linen.py",
    "record_moments",
    'module.put_variable(MOMENTS, "calls", (*calls, stats))',
    "pass",
    ("tests/test_exact_batch_norm.py::test_layer_called_twice_updates_like_model_apply[exact-None]",),
  ),
  Mutant(
    "module option dropped",  # the Flax modules lose unbiased_running_var on the way to the record
    "jaxbn/_layer.py",
    "module_options",
    "return batch_norm_options(fn, **values)",
    'return batch_norm_options(fn, **{**values, "unbiased_running_var": False})',
    ("tests/test_linen.py::test_extras_match_the_pure_functions[cumulative-unbiased]",),
  ),
  Mutant(
    "host loop's folded outputs",  # each micro-batch's outputs (statistics, weights) replace those before it
    "jaxbn/training/loops.py",
    "_call",
    "jnp.concatenate([s, o])",
    "jnp.concatenate([o, o])",
    ("tests/test_training.py::test_host_loop_equals_scan[4]",),
  ),
  Mutant(
    "host loop's first micro-batch",  # the sums restart at the second micro-batch: the first one's terms are lost
    "jaxbn/training/loops.py",
    "_call",
    "first = i == 0",
    "first = i == 1",
    ("tests/test_training.py::test_host_loop_equals_scan[4]",),
  ),
  Mutant(
    "per-device batch statistics",  # sweeping each device's rows, batch norms normalize with that device's rows only
    "jaxbn/functional.py",
    "train",
    "axis_name = opts.axis_name if opts.axis_name is not None else _hooks.batch_axes()",
    "axis_name = opts.axis_name",
    ("tests/test_training.py::test_sharded_data_on_eight_devices_equals_one_device[host-jaxbn]",),
  ),
  Mutant(
    "flax batch norm's own statistics",  # the running update merges statistics other than those Flax normalized with
    "jaxbn/training/adapters.py",
    "_record_flax_stats",
    "use_fast_variance=module.use_fast_variance,",
    "use_fast_variance=False,",
    ("tests/test_training.py::test_flax_batch_norm_running_update_merges_the_statistics_it_normalized_with",),
  ),
  Mutant(
    "gradient penalty's block weight",  # each block's Hessian-vector product weighted by this device's rows only
    "jaxbn/training/penalty.py",
    "GradientPenalty.terms",
    "coef = jnp.where(keep, dtype.type(self.alpha / 2) * everywhere / total, 0)",
    "coef = jnp.where(keep, dtype.type(self.alpha / 2) * count_j / total, 0)",
    ("tests/test_gradient_penalty.py::test_eight_devices_equal_the_written_out_objective[per-device-scan]",),
  ),
  Mutant(
    "gradient penalty's blocks under exact batch norm",  # a block = micro-batch reuses the whole-data-statistics gradient
    "jaxbn/training/exact.py",
    "_loss_sweep",
    "penalty.add(g_params, sw.batches, params, batch_stats, data, batch, mask, None, w.dtype)",
    "penalty.add(g_params, sw.batches, params, batch_stats, data, batch, mask, g_params, w.dtype)",
    (
      "tests/test_gradient_penalty.py::test_gradient_and_penalty_equal_jax_grad_of_the_written_out_objective"
      "[8-None-hvp-scan-exact]",
    ),
  ),
)


def _function_span(source: str, function: str) -> tuple[int, int]:
  """Line span (0-based start, end exclusive) of the only function named ``function`` (or ``Class.method``)."""
  owner, _, name = function.rpartition(".")
  tree = ast.parse(source)
  scopes = (
    [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == owner] if owner else [tree]
  )
  spans = [
    (node.lineno - 1, node.end_lineno or node.lineno)
    for scope in scopes
    for node in (scope.body if owner else ast.walk(scope))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
  ]
  if len(spans) != 1:
    raise ValueError(f"{len(spans)} functions named {function!r} (expected exactly one)")
  return spans[0]


def mutate(source: str, mutant: Mutant) -> str:
  """``source`` with the mutant's snippet replaced inside its function; raises if it is not there exactly once."""
  lines = source.splitlines(keepends=True)
  start, end = _function_span(source, mutant.function)
  body = "".join(lines[start:end])
  if body.count(mutant.old) != 1:
    raise ValueError(f"{mutant.path}:{mutant.function} holds {body.count(mutant.old)} copies of {mutant.old!r}")
  return "".join(lines[:start]) + body.replace(mutant.old, mutant.new) + "".join(lines[end:])


# Third-party modules that every mutant's test run imports: the runner imports them once and starts each
# run as a fork of itself (where the platform has fork), so that a run pays for jaxbn, its test file and
# their compilations only, not for starting Python, JAX, Flax and pytest again. jaxbn is never imported
# here, and JAX's backend is never started (a fork after that would be unsafe), so every run imports the
# (mutated) copy afresh and starts its own backend, as a new process would. pytest's plugins (xdist,
# hypothesis) are left for each run to import, so that pytest can rewrite their asserts as usual.
PRELOAD = ("numpy", "jax", "jax.numpy", "flax.linen", "flax.nnx", "optax", "pytest")
PRELOAD_PEERS = ("torch", "adamp")  # only where a selected test is a peer's parity test (tests/peers/)


def _preload(mutants: tuple[Mutant, ...]) -> bool:
  """Imports PRELOAD (and the peers the mutants' tests need) unless fork is missing; True when runs may fork."""
  if not hasattr(os, "fork") or os.environ.get("JAXBN_MUTANTS_NO_FORK"):
    return False
  os.environ["XLA_FLAGS"] = ""  # as the root conftest.py leaves it for a test process
  peers = any(t.startswith("tests/peers/") for m in mutants for t in m.tests)
  for name in PRELOAD + (PRELOAD_PEERS if peers else ()):
    try:
      importlib.import_module(name)
    except ImportError:  # a missing peer: its tests skip in the run, which then reports it
      pass
  from jax._src import xla_bridge

  assert not xla_bridge.backends_are_initialized(), "an import started JAX's backend; forking would be unsafe"
  assert "jaxbn" not in sys.modules, "jaxbn imported in the runner: the runs must import the mutated copy"
  return True


def _pytest(copy: pathlib.Path, tests: tuple[str, ...], fork: bool) -> tuple[int, float, str]:
  """Runs pytest on ``tests`` in ``copy``: in a forked child of this process, or in a new one."""
  # --assert=plain: a run needs pass or fail only, and rewriting the asserts of the test files and of every
  # plugin's modules (hypothesis: over a hundred, about 1.5 s per run) would cost more than many a test.
  args = ["-q", "-x", "-p", "no:cacheprovider", "--assert=plain", "-n", "0", *tests]
  env = {"PYTHONPATH": str(copy), "XLA_FLAGS": ""}
  start = time.monotonic()
  with tempfile.TemporaryFile("w+") as log:
    if not fork:
      proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=copy, env={**os.environ, **env}, stdout=log, stderr=log
      )
      code = proc.returncode
    else:
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:  # the child: becomes the test process
        code = 3
        try:
          os.dup2(log.fileno(), 1)
          os.dup2(log.fileno(), 2)
          os.chdir(copy)
          os.environ.update(env)  # for the subprocesses the tests start
          sys.path.insert(0, str(copy))
          import pytest

          code = int(pytest.main(args))
          imported = getattr(sys.modules.get("jaxbn"), "__file__", None) or ""
          if not imported.startswith(str(copy)):
            print(f"the tests imported jaxbn from {imported!r}, not from the copy {copy}")
            code = 4
        except BaseException:
          traceback.print_exc()
        finally:
          sys.stdout.flush()
          sys.stderr.flush()
          os._exit(code)
      code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    log.seek(0)
    out = log.read()
  return code, time.monotonic() - start, out[-4000:]


def run(mutants: tuple[Mutant, ...], baseline: bool = True) -> bool:
  """Runs the mutants; prints a table; True when every one is caught.

  ``baseline``: first run the selected tests on the unmutated copy (skip it where the same run of the
  suite runs them anyway, as CI does).
  """
  with tempfile.TemporaryDirectory(prefix="jaxbn-mutants-") as tmp:
    copy = pathlib.Path(tmp)
    for name in COPIED:
      src = ROOT / name
      if src.is_dir():
        shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__", "mutants"))
      else:
        shutil.copy2(src, copy / name)
    originals = {m.path: (copy / m.path).read_text() for m in mutants}
    for m in mutants:  # every mutant applies before anything runs
      mutate(originals[m.path], m)
    fork = _preload(mutants)  # a forked run checks where it imported jaxbn from itself, after its tests
    if not fork:
      env = {**os.environ, "PYTHONPATH": str(copy)}
      probe = [sys.executable, "-c", "import jaxbn; print(jaxbn.__file__)"]
      imported = subprocess.run(probe, cwd=copy, env=env, capture_output=True, text=True).stdout.strip()
      if not imported.startswith(str(copy)):
        print(f"the copy's tests would import jaxbn from {imported!r}, not from the copy {copy}")
        return False
    if baseline:
      tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
      code, seconds, out = _pytest(copy, tests, fork)
      print(f"unmutated: {len(tests)} test selections, exit {code}, {seconds:.0f} s")
      if code != 0:
        print(out)
        return False
    rows, ok = [], True
    for m in mutants:
      target = copy / m.path
      target.write_text(mutate(originals[m.path], m))
      try:
        code, seconds, out = _pytest(copy, m.tests, fork)
      finally:
        target.write_text(originals[m.path])
      verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"ERROR (pytest exit {code})")
      ok &= code == 1
      rows.append((m.name, f"{m.path}:{m.function}", ", ".join(t.split("/")[-1] for t in m.tests), verdict, seconds))
      if code != 1:
        print(f"--- {m.name}: {verdict}\n{out}")
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutant':{width}}  {'verdict':9}  {'s':>4}  where / tests run")
    for name, where, tests_run, verdict, seconds in rows:
      print(f"{name:{width}}  {verdict:9}  {seconds:4.0f}  {where} / {tests_run}")
    caught = sum(r[3] == "caught" for r in rows)
    print(f"\n{caught} of {len(rows)} mutants caught")
  return ok


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
  p.add_argument("--only", action="append", default=[], help="run only the mutant with this name (repeatable)")
  p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
  args = p.parse_args(argv)
  chosen = tuple(m for m in MUTANTS if not args.only or m.name in args.only)
  unknown = set(args.only) - {m.name for m in MUTANTS}
  if unknown:
    p.error(f"unknown mutants {sorted(unknown)}; --list shows them")
  if args.list:
    for m in chosen:
      print(f"{m.name}: {m.path}:{m.function} -> {', '.join(m.tests)}")
    return 0
  return 0 if run(chosen, baseline=not args.no_baseline) else 1


if __name__ == "__main__":
  sys.exit(main())
