"""Run by tests/test_checkpoint.py in a fresh process: restore a TrainState, take more steps, save it."""

import sys

import jax
import numpy as np
from _training_setup import build

import jaxbn


def main(ckpt: str, steps: int, out: str) -> None:
  step, fresh, data = build()
  state = jaxbn.training.restore_checkpoint(ckpt, fresh)
  for _ in range(steps):
    state, _ = step(state, data)
  np.savez(out, *[np.asarray(leaf) for leaf in jax.tree.leaves(state)])


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
