"""Two real processes joined by jax.distributed on this machine (127.0.0.1, gloo CPU collectives), 4 fake devices
each, started by launch/local.sh --processes 2: the tiny pipeline's report equals one process on 8 devices; a
SIGKILLed process stops the other within a bounded time with one-line errors, and the same command resumes.

Slow (several minutes on 2 cores): run with `python -m pytest -m slow tests/test_distributed.py`.
"""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 30  # Short, so a lost peer stops the run quickly; long enough for compiles on a loaded 2-core CPU.

pytestmark = pytest.mark.slow


def _local(workdir, *overrides, processes: int = 2, devices: int = 4, background: bool = False):
  cmd = [os.path.join(ROOT, 'launch', 'local.sh'), f'--processes={processes}', f'--fake-devices={devices}',
         f'--python={sys.executable}', '--config=configs/demo.py:tiny', f'--workdir={workdir}', '--',
         f'--config.heartbeat_timeout_s={HEARTBEAT_S}', *overrides]
  if background:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)


def _model_rows(workdir) -> dict:
  rows = json.loads((workdir / 'report.json').read_text())['models']
  return {name: {k: v for k, v in row.items() if k != 'images_per_sec'} for name, row in rows.items()}


def test_two_processes_match_one_process_on_8_devices(tmp_path):
  start = time.perf_counter()
  two = _local(tmp_path / 'two')
  seconds = time.perf_counter() - start
  assert two.returncode == 0, two.stderr[-3000:]
  print(f'2 processes x 4 devices: {seconds:.0f} s')
  one = _local(tmp_path / 'one', processes=1, devices=8)
  assert one.returncode == 0, one.stderr[-3000:]
  chex.assert_trees_all_close(_model_rows(tmp_path / 'two'), _model_rows(tmp_path / 'one'), rtol=1e-3, atol=1e-4)
  logs = [(tmp_path / 'two' / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert all('process %d of 2, 4 local / 8 global devices' % i in log for i, log in enumerate(logs))
  assert (tmp_path / 'two' / 'teacher' / 'checkpoints').is_dir()


def test_sigkill_of_one_process_stops_the_other_and_the_command_resumes(tmp_path):
  workdir = tmp_path / 'run'
  steps = ('--config.teacher.num_steps=200', '--config.stages=("data","tokenizer","teacher")')
  launcher = _local(workdir, *steps, background=True)
  checkpoints = workdir / 'teacher' / 'checkpoints'
  deadline = time.time() + 1200
  while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
    time.sleep(1)
  os.kill(int((workdir / 'logs' / 'process_1.pid').read_text()), signal.SIGKILL)
  killed = time.perf_counter()
  _, stderr = launcher.communicate(timeout=HEARTBEAT_S + 300)
  stopped = time.perf_counter() - killed
  print(f'the other process stopped {stopped:.0f} s after the SIGKILL')
  assert launcher.returncode == 1
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert errors[0].startswith('error: process 0 of 2 ') and errors[1].startswith(
      'error: process 1 of 2 was killed by signal 9 (KILL)'), errors
  assert errors[-1] == 'error: the 2-process run stopped; rerun the same command to resume from the last checkpoints.'
  assert stopped < HEARTBEAT_S + 240
  resumed = _local(workdir, *steps)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert '[teacher] resuming from step' in (workdir / 'logs' / 'process_0.log').read_text()
