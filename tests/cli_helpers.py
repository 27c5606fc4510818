"""Running the real `jdistill` CLI in subprocesses, and killing one at a checkpoint."""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, devices=8, extra_env=None, **kw):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", "jdistill", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def sigkill_at_checkpoint(proc, ckpt_dir, step: int, timeout: float = 300) -> list[int]:
    """SIGKILL ``proc`` as soon as checkpoint ``step`` appears in ``ckpt_dir``; the finished steps there."""
    target = os.path.join(ckpt_dir, str(step))
    deadline = time.time() + timeout
    while time.time() < deadline and not os.path.isdir(target):
        time.sleep(0.05)
    assert os.path.isdir(target), f"no checkpoint {step} appeared in {ckpt_dir}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())


def run_script(script, args, devices=8, extra_env=None, **kw):
    """Run a script of the tests folder (e.g. a toy training) as its own process."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
