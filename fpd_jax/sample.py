r"""Samples a trained model of a workdir to an `.npz` (for other evaluation tools) or a PNG grid.

  python -m fpd_jax.sample --workdir=runs/demo --model=teacher --steps=8 --num=1000 --out=samples.npz
  python -m fpd_jax.sample --workdir=runs/demo --model=teacher --steps=8 --num=100 --out=grid.png
  python -m fpd_jax.sample --workdir=runs/t2i --model=student --prompt="a red three to the left of a blue seven" \
      --num=16 --out=x.png
  python -m fpd_jax.sample --workdir=runs/t2i --model=teacher --steps=16 --prompts_file=prompts.txt --out=x.npz
  python -m fpd_jax.sample --workdir=runs/t2i --model=student --prompts_file=evaluation_metadata.jsonl --num=4 \
      --out_dir=geneval_images          # GenEval's layout: 00000/metadata.jsonl, 00000/samples/00000.png, ...

The `.npz` holds `images` (uint8 N x H x W x C) and `labels` (int32 N, class-balanced: i % num_classes); for a
text-to-image workdir (`configs/t2i_demo.py`, `configs/t2i.py`) it holds `images` and `captions` (`--num` images per
prompt, one prompt after another) and the `.png` has one captioned row per prompt. A `configs/t2i.py` workdir's
teacher is the imported MaskGen-L, sampled with the released sampler (`--steps`, 16 in the release).
The models' config is read from the workdir's exports; no config flag is needed.

Each batch is split over all devices (with `--distributed`, of all processes: start one per host like
`fpd_jax.main`), the parameters replicated; process 0 writes the file. Batch `i` of `--batch_size` images uses the key
`fold_in(seed key, i)` and an image's randomness depends only on that key and its row (see `fpd_jax/sharding.py`):
the file is the same on any number of devices. A batch the device count does not divide is padded, the padding
dropped.
"""

import os

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from fpd_jax import batching
from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import cli
from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax.errors import UserError
from fpd_jax.eval import grid as grid_lib
from fpd_jax.models import build
from fpd_jax.train import distill as distill_stage
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a finished `fpd_jax.main` run.')
_MODEL = flags.DEFINE_enum('model', 'teacher', ['teacher', 'student'],
                           'teacher: iterative MaskGIT decoding; student: the distilled one-step generator (loaded '
                           'from DIR/distill/export alone, without the teacher).')
_STEPS = flags.DEFINE_integer('steps', 8, 'Decoding steps (teacher only; the student always takes one).')
_NUM = flags.DEFINE_integer('num', 100, 'Number of images (class-balanced).')
_OUT = flags.DEFINE_string('out', None, 'Output file: NAME.npz (arrays) or NAME.png (grid, one row per class).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'Images per sampling call.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Text-to-image workdirs: the prompt (or use --prompts_file).')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'Text-to-image workdirs: a file with one prompt a line, or '
                                    "GenEval's evaluation_metadata.jsonl.")
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Text-to-image workdirs, instead of --out: a new directory written in '
                               'the folder layout the official GenEval scorer reads (fpd_jax/eval/geneval_files.py).')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Full tracebacks for errors.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Multi-process run (one process per host, started like '
                                 'fpd_jax.main by the launch/ scripts): the batches are split over the devices of '
                                 'all processes; process 0 writes --out.')
flags.mark_flags_as_required(['workdir'])


def export_dir(workdir: str, model: str) -> str:
  return os.path.join(workdir, 'distill' if model == 'student' else 'teacher', 'export')


def workdir_config(workdir: str, model: str) -> ml_collections.ConfigDict:
  """The config the model was trained with (stored beside its export)."""
  return ml_collections.ConfigDict(ckpt_lib.load_export_meta(export_dir(workdir, model), f'the {model}')['config'])


def sampler(workdir: str, model: str, steps: int, partitioner: sharding.Partitioner):
  """(config, generate(labels, rng) -> images in [0, 1]) for a workdir's teacher or student, its parameters
  replicated on the partitioner's mesh.

  The sampling settings of the stored config are checked (`sampling.validate`) before any model is loaded.
  """
  config = workdir_config(workdir, model)
  sampling.validate(config)
  if model == 'student':
    _, student, params, tokenizer, tokenizer_params = distill_stage.load_student(export_dir(workdir, model))
    sample = sampling.student_image_sampler(student, tokenizer, build.token_grid(config), config.distill)
  else:
    teacher, params = teacher_stage.load(config, workdir)
    tokenizer, tokenizer_params = tokenizer_stage.load(config, workdir)
    teacher_sample = sampling.teacher_image_sampler(teacher, tokenizer, build.token_grid(config), config)
    sample = lambda *args: teacher_sample(*args, steps)
  params, tokenizer_params = partitioner.replicate((params, tokenizer_params))
  return config, lambda labels, rng: sample(params, tokenizer_params, labels, rng)


def check_counts(num: int, steps: int, batch_size: int) -> None:
  if num <= 0 or steps <= 0 or batch_size <= 0:
    raise UserError(f'--num, --steps and --batch_size must be > 0 (got {num}, {steps}, {batch_size}).')


def generate(workdir: str, model: str, steps: int, num: int, seed: int, batch_size: int):
  """(uint8 images [num, H, W, C], labels [num], num_classes) sampled from a workdir's model."""
  check_counts(num, steps, batch_size)
  partitioner = sharding.Partitioner.from_config({})  # The batch over every device of every process.
  config, sample = sampler(workdir, model, steps, partitioner)
  labels = (np.arange(num) % config.data.num_classes).astype(np.int32)
  images = batching.sample_on_mesh(partitioner, sample, labels, batch_size, jax.random.key(seed))
  return grid_lib.to_uint8(images), labels, config.data.num_classes


def write(out: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  """Writes `.npz` arrays or a `.png` grid (one row per class)."""
  if out.endswith('.png'):
    per_class = max(1, len(images) // num_classes)
    grid_lib.save_png(out, grid_lib.class_grid(images, labels, num_classes, per_class))
  elif out.endswith('.npz'):
    if jax.process_index() == 0:
      np.savez(out, images=images, labels=labels)
  else:
    raise UserError(f'--out={out}: use a name ending in .npz or .png.')


def _task(workdir: str, model: str) -> str:
  """The pipeline that made the workdir's model: 'class', 't2i' (the demo) or 'maskgen' (the released MaskGen,
  whose teacher is imported: its config is the one stored with the student)."""
  if model == 'teacher' and not os.path.isdir(export_dir(workdir, model)) and os.path.isdir(
      export_dir(workdir, 'student')):
    model = 'student'
  return workdir_config(workdir, model).get('task', 'class')


def main(argv):
  del argv

  def run():
    check_counts(_NUM.value, _STEPS.value, _BATCH.value)  # Before anything is loaded.
    if bool(_OUT.value) == bool(_OUT_DIR.value):
      raise UserError('pass exactly one of --out=FILE (.npz or .png) or --out_dir=DIR (GenEval folders).')
    if _DISTRIBUTED.value:
      cli.initialize_distributed()
    task = _task(_WORKDIR.value, _MODEL.value)
    if task in ('t2i', 'maskgen'):
      from fpd_jax.eval import geneval_files  # pylint: disable=g-import-not-at-top
      from fpd_jax.train import maskgen as maskgen_stage  # pylint: disable=g-import-not-at-top
      from fpd_jax.train import t2i as t2i_stage  # pylint: disable=g-import-not-at-top
      if bool(_PROMPT.value) == bool(_PROMPTS_FILE.value):
        raise UserError('a text-to-image workdir needs exactly one of --prompt="..." or --prompts_file=FILE.')
      if _PROMPT.value:
        prompts, metadata = [_PROMPT.value], [{'prompt': _PROMPT.value}]
      else:
        prompts, metadata = geneval_files.read_prompts(_PROMPTS_FILE.value)
      if _OUT_DIR.value and os.path.isdir(_OUT_DIR.value) and os.listdir(_OUT_DIR.value):
        raise UserError(f'--out_dir={_OUT_DIR.value} is not empty; pass a new directory.')  # Before sampling.
      stage = maskgen_stage if task == 'maskgen' else t2i_stage
      images, captions = stage.sample_prompts(_WORKDIR.value, _MODEL.value, _STEPS.value, prompts, _NUM.value,
                                              _SEED.value, _BATCH.value)
      if _OUT_DIR.value:
        geneval_files.write_folders(_OUT_DIR.value, images, metadata, _NUM.value)
        print(f'wrote {len(images)} images in {len(prompts)} GenEval folders to {_OUT_DIR.value}')
        return
      if _OUT.value.endswith('.png'):
        grid_lib.save_png(_OUT.value, t2i_stage.captioned_grid(images, captions, _NUM.value))
      elif _OUT.value.endswith('.npz'):
        np.savez(_OUT.value, images=images, captions=np.array(captions))
      else:
        raise UserError(f'--out={_OUT.value}: use a name ending in .npz or .png.')
      print(f'wrote {len(images)} images to {_OUT.value}')
      return
    if _OUT_DIR.value:
      raise UserError('--out_dir (GenEval folders) is for text-to-image workdirs; pass --out=FILE.npz or .png.')
    images, labels, num_classes = generate(_WORKDIR.value, _MODEL.value, _STEPS.value, _NUM.value, _SEED.value,
                                           _BATCH.value)
    write(_OUT.value, images, labels, num_classes)
    if jax.process_index():
      return
    print(f'wrote {len(images)} images to {_OUT.value}')

  cli.run_user_command(run, _VERBOSE.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
