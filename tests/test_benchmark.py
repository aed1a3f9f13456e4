"""The benchmark's accelerator suite at smoke sizes (a real run of the entry point) and its comparison with the
plain reference steps' output."""

import json
import os
import subprocess
import sys

import pytest

from fpd_jax.errors import UserError
from fpd_jax.tools import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'fpd_jax.tools.benchmark', *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=1200, stdin=subprocess.DEVNULL)


@pytest.mark.slow  # About 3 minutes on 2 cores (compiles the ImageNet smoke step); run with -m slow.
def test_accelerator_suite_at_smoke_sizes_prints_the_table_and_writes_the_rows(tmp_path):
  out = tmp_path / 'bench.json'
  run = _benchmark('--suite=accelerator', '--config=configs/imagenet.py:smoke', '--batch_sizes=8',
                   '--teacher_steps=2', '--sample_batch=8', '--steps=1', f'--out={out}')
  assert run.returncode == 0, run.stderr[-3000:]
  header = '| ' + ' | '.join(benchmark.ACCELERATOR_COLS) + ' |'
  assert header in run.stdout
  result = json.loads(out.read_text())
  assert result['suite'] == 'accelerator' and result['platform'] == 'cpu'
  rows = result['rows']
  assert [(r['name'], r['batch_size']) for r in rows] == [('fpd_step', 8), ('teacher_2step', 8),
                                                          ('student_1step', 8)]
  for r in rows:
    assert set(benchmark.ACCELERATOR_COLS) <= set(r), r
    assert r['ms'] > 0 and r['images_per_sec'] == pytest.approx(1000 * r['batch_size'] / r['ms'])
    assert r['peak_source'] == 'xla' and r['peak_gib'] > 0  # XLA:CPU keeps no memory_stats().
    assert r['dtype'] == 'float32'  # The smoke variant computes in float32.
  assert rows[0]['tflop'] > 0 and rows[0]['xla_temporaries_gib'] > 0
  table_lines = [line for line in run.stdout.splitlines() if line.startswith('| ')]
  assert len(table_lines) == 1 + len(rows)  # The header and one line per row.


def test_accelerator_suite_refuses_a_batch_size_that_splits_a_group():
  run = _benchmark('--suite=accelerator', '--config=configs/imagenet.py:smoke', '--batch_sizes=6')
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1] == (
      'error: --batch_sizes: 6 is not a positive multiple of distill.samples_per_group (4).')


def _ours(fpd_ms=(150.0, 250.0), peak='memory_stats'):
  rows = [{'name': 'fpd_step', 'batch_size': b, 'ms': ms, 'images_per_sec': 1000 * b / ms, 'peak_gib': b / 2,
           'peak_source': peak} for b, ms in zip((32, 64), fpd_ms)]
  rows += [{'name': 'teacher_8step', 'batch_size': 256, 'ms': 1000.0, 'images_per_sec': 256.0},
           {'name': 'student_1step', 'batch_size': 256, 'ms': 200.0, 'images_per_sec': 1280.0}]
  return rows


def test_compare_divides_ours_by_the_plain_figures():
  anchors = [{'device': 'cuda:0', 'batch': 32, 'step_ms': 100.0, 'img_per_s': 320.0, 'peak_GiB': 20.0},
             {'device': 'cuda:0', 'batch': 64, 'step_ms': 200.0, 'img_per_s': 320.0},
             {'teacher_8step_img_per_s': 320.0, 'teacher_16step_img_per_s': 160.0, 'student_1step_img_per_s': 1280.0}]
  rows = {r['quantity']: r for r in benchmark.compare(_ours(), anchors)}
  assert rows['fpd_step b=32 ms']['ours_over_plain'] == pytest.approx(1.5)
  assert rows['fpd_step b=32 images/s']['ours_over_plain'] == pytest.approx(1000 * 32 / 150 / 320)
  assert rows['fpd_step b=32 peak GiB']['ours_over_plain'] == pytest.approx(16 / 20)
  assert 'fpd_step b=64 peak GiB' not in rows  # That anchor printed no peak.
  assert rows['fpd_step b=64 ms']['ours_over_plain'] == pytest.approx(1.25)
  assert rows['teacher_8step b=256 images/s']['ours_over_plain'] == pytest.approx(0.8)
  assert rows['student_1step b=256 images/s']['ours_over_plain'] == pytest.approx(1.0)
  assert 'teacher_16step b=256 images/s' not in rows  # Ours did not measure it.
  # XLA's buffer assignment is not a measured peak: no peak ratio then.
  rows = benchmark.compare(_ours(peak='xla'), anchors[:1])
  assert [r['quantity'] for r in rows] == ['fpd_step b=32 ms', 'fpd_step b=32 images/s']


def test_compare_refuses_an_anchor_batch_ours_did_not_run():
  with pytest.raises(UserError, match='batch 128'):
    benchmark.compare(_ours(), [{'batch': 128, 'step_ms': 1.0, 'img_per_s': 1.0}])
  with pytest.raises(UserError, match='neither'):
    benchmark.compare(_ours(), [{'something': 1}])


def test_read_json_output_takes_the_last_object_after_other_lines(tmp_path):
  path = tmp_path / 'anchor.json'
  path.write_text('W1130 some log line {not json}\n{"a": 1}\n{\n "b": 2,\n "c": [1, 2]\n}\n')
  assert benchmark.read_json_output(str(path)) == {'b': 2, 'c': [1, 2]}
  path.write_text('Traceback ...\nRuntimeError: out of memory\n')
  with pytest.raises(UserError, match='no JSON'):
    benchmark.read_json_output(str(path))
  with pytest.raises(UserError, match='cannot read'):
    benchmark.read_json_output(str(tmp_path / 'missing.json'))


def test_importing_the_benchmark_does_not_import_tensorflow():
  code = 'import sys, fpd_jax.tools.benchmark; print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))'
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == '[]'
