"""Starting `python -m byol_jax` as several local processes of one multi-host job.

Each child gets --coordinator_address on 127.0.0.1 (gloo CPU collectives, jax's default),
2 CPU devices through XLA_FLAGS, and no persistent compilation cache: with it, one process
may load a program from the cache while the other compiles it, and the first collective
then failed on this machine with "Gloo context initialization failed ... GetKeyValue()
timed out". Callers wait with `wait_all` (bounded) and call `kill_all` in a `finally`.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

from fakes import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "byol_fashion_mnist.py")  # Children run its :smoke config.
DEVICES_PER_PROCESS = 2
CHILD_XLA_FLAGS = (f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
                   " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def child_env() -> dict:
  env = dict(os.environ, XLA_FLAGS=CHILD_XLA_FLAGS, JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def multihost_flags(port: int, num_processes: int, process_id: int, heartbeat: int) -> list[str]:
  return [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
          f"--process_id={process_id}", "--initialization_timeout=120",
          f"--heartbeat_timeout={heartbeat}"]


def launch(command: str, per_process_args, heartbeat: int = 10, stdouts=None):
  """Starts `python -m byol_jax COMMAND` once per entry of per_process_args (that process's
  flags), as one job; returns the Popens. Process i writes its stdout and stderr to
  stdouts[i] (a path) when given, else to a pipe (read by `wait_all`)."""
  port, procs = free_port(), []
  try:
    for pid, args in enumerate(per_process_args):
      argv = [sys.executable, "-m", "byol_jax", command, *args,
              *multihost_flags(port, len(per_process_args), pid, heartbeat)]
      out = open(stdouts[pid], "w") if stdouts else subprocess.PIPE  # pylint: disable=consider-using-with
      try:
        procs.append(subprocess.Popen(argv, cwd=str(ROOT), env=child_env(), stdout=out,
                                      stderr=subprocess.STDOUT, text=True))
      finally:
        if stdouts:
          out.close()  # The child holds its own descriptor.
  except BaseException:
    kill_all(procs)
    raise
  return procs


def wait_all(procs, timeout: float):
  """(return codes, outputs) once every process has exited or `timeout` seconds have passed
  (a process still running then has code None). Outputs are None for processes whose
  stdout went to a file."""
  deadline, outputs = time.monotonic() + timeout, []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
      outputs.append(None)
  return [p.returncode for p in procs], outputs


def kill_all(procs) -> None:
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


def kill_peer_once_started(procs, started, start_timeout: float, exit_timeout: float = 90):
  """Waits until `started()` is true (every process still running, at most start_timeout
  seconds), SIGKILLs process 1 and waits up to exit_timeout seconds for process 0.

  Returns (process 0's return code or None, its output or None, seconds from the kill to
  its exit). Every process is killed before returning.
  """
  try:
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline and not started():
      assert all(p.poll() is None for p in procs), "a process ended before its work began"
      time.sleep(0.2)
    assert started(), f"the work did not begin within {start_timeout} s"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes, outputs = wait_all(procs[:1], timeout=exit_timeout)
    return codes[0], outputs[0], time.monotonic() - killed_at
  finally:
    kill_all(procs)
