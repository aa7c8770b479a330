"""Checkpoints across processes and topologies: saved by 1 process x 4 devices, restored by
2 x 2 and 1 x 1 (and back), and a save killed in flight leaving the previous checkpoint
usable. The tests start local subprocesses that run this file as a script (`_child_main`).
"""
import os
import subprocess
import sys
import time

import jax

import fakes
from byol_jax.store import checkpoint
from byol_jax.store import integrity
from checkpoint_states import (assert_state_equals, host_state, make_checkpointer, replicated,
                               restore, small_config)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- processes and topologies

_BIG = 2_000_000  # 8 MB leaf: long enough to write that a save is still in flight at exit.


def _run_children(args_list, devices, timeout=240):
  """Runs this file as a script once per args, all at once, and asserts each exits 0.

  All are killed once `timeout` seconds pass (e.g. a peer that never reaches a barrier).
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([_REPO, os.path.join(_REPO, "tests")]))
  procs = [subprocess.Popen([sys.executable, __file__] + [str(a) for a in args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for args in args_list]
  outputs, deadline = [], time.monotonic() + timeout
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for args, proc, out in zip(args_list, procs, outputs):
    assert proc.returncode == 0, f"child {args} exited {proc.returncode}:\n{out[-3000:]}"


def test_checkpoints_move_between_1x4_2x2_and_1x1_topologies(tmp_path):
  """1 process x 4 devices -> 2 x 2 -> 1 x 4 and 1 x 1, and 1 x 1 -> 1 x 1: values identical."""
  from_1x4, from_2x2 = tmp_path / "from_1x4", tmp_path / "from_2x2"
  with make_checkpointer(from_1x4) as ckpt:
    assert ckpt.save(5, replicated(host_state(5, 5)))
  port = fakes.free_port()
  _run_children([("two_processes", i, port, from_1x4, from_2x2) for i in range(2)], devices=2)
  step, state = restore(from_2x2)
  assert step == 10
  assert_state_equals(state, host_state(10, 10))
  _run_children([("one_device", from_1x4, from_2x2, tmp_path / "from_1x1")], devices=1)


def test_save_killed_in_flight_leaves_previous_checkpoint_usable(tmp_path):
  _run_children([("killed_mid_save", tmp_path)], devices=2)
  step10 = tmp_path / checkpoint.CHECKPOINT_DIR / "10"
  assert not (step10 / integrity.MANIFEST_FILE).exists()
  with make_checkpointer(tmp_path) as ckpt:
    step, state = ckpt.restore_or_none(replicated(host_state(0, 0, big=_BIG)), small_config())
  assert step == 5
  assert_state_equals(state, host_state(5, 5, big=_BIG))


def _child_restore(workdir, step):
  with make_checkpointer(workdir) as ckpt:
    got_step, state = ckpt.restore_or_none(replicated(host_state(0, 0)), small_config())
  assert got_step == step, (got_step, step)
  assert_state_equals(state, host_state(step, step))


def _child_main(mode, *args):
  if mode == "two_processes":
    process_id, port, from_1x4, out = int(args[0]), args[1], args[2], args[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
    assert (jax.process_count(), jax.local_device_count()) == (2, 2)
    _child_restore(from_1x4, 5)
    with make_checkpointer(out) as ckpt:
      assert ckpt.save(10, replicated(host_state(10, 10)))
    jax.distributed.shutdown()
  elif mode == "one_device":
    assert jax.device_count() == 1
    _child_restore(args[0], 5)
    _child_restore(args[1], 10)
    # A single-device run must resume from its own checkpoints (the main CPU job).
    with make_checkpointer(args[2]) as ckpt:
      assert ckpt.save(7, replicated(host_state(7, 7)), force=True)
    _child_restore(args[2], 7)
  elif mode == "killed_mid_save":
    ckpt = make_checkpointer(args[0])
    assert ckpt.save(5, replicated(host_state(5, 5, big=_BIG)))
    ckpt.wait_until_finished()
    assert ckpt.save(10, replicated(host_state(10, 10, big=_BIG)))
    os._exit(0)  # Dies with the save of step 10 in flight: no cleanup, no manifest.
  else:
    raise ValueError(f"unknown child mode {mode!r}")


if __name__ == "__main__":
  jax.config.update("jax_compilation_cache_dir", os.path.join(_REPO, ".cache", "jax"))
  _child_main(*sys.argv[1:])
