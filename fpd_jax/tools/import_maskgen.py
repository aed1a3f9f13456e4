r"""Imports the released MaskGen-L (VQ) teacher: generator, TA-TiTok tokenizer, CLIP text and image towers.

  python -m fpd_jax.tools.import_maskgen \
      --generator=maskgen_vq_l.bin --tokenizer=tatitok_bl128_vq.bin \
      --clip=open_clip_pytorch_model.bin --out=checkpoints/maskgen_vq_l [--overwrite]

The files (any of them may be given alone) are the official ones, as the model hub serves them:
  --generator  bytedance/1d-tokenizer `MaskGen_VQ` with configs/infer/MaskGen/maskgen_vq_l.yaml: `model.safetensors`
               of hub repo `turkeyju/generator_maskgen_vq_l`, or `maskgen_vq_l.bin` of `fun-research/TA-TiTok`;
  --tokenizer  `TATiTok` with configs/infer/TA-TiTok/tatitok_bl128_vq.yaml: `model.safetensors` of
               `turkeyju/tokenizer_tatitok_bl128_vq`, or `tatitok_bl128_vq.bin` of `fun-research/TA-TiTok`; only the
               decoder and the codebook are taken;
  --clip       open_clip `ViT-L-14-336` with OpenAI weights: `open_clip_pytorch_model.bin` / `open_clip_model.safetensors`
               of hub repo `timm/vit_large_patch14_clip_336.openai`, or OpenAI's TorchScript `ViT-L-14-336px.pt`
               (tested on a traced tiny CLIP; the real archive not yet). The file is read once; its text tower is
               the generator's and decoder's text condition, its vision tower (`visual.*`) the image half of the
               CLIP score (`fpd_jax.eval.clip_score`). A file without any `visual.*` entry imports the text tower
               only (logged: no CLIP score then). The Hugging Face transformers layout
               (`openai/clip-vit-large-patch14-336`) has other names and is not taken.
Each may be `.safetensors`, a `torch.save` file (`.bin`, `.pth`) or TorchScript, told apart by content and read
with numpy (`fpd_jax.weights_io`; no torch). Every official name is mapped explicitly (`generator_table`,
`tokenizer_table`, `clip_table`, `clip_vision_table`; linear weights [out, in] -> kernels [in, out], convs OIHW ->
HWIO) and every shape is checked against the released sizes (`maskgen.MASKGEN_VQ_L`, `tatitok.TATITOK_BL128_VQ`,
`clip_text.VIT_L_14_336`, `clip_vision.VIT_L_14_336`). The first missing entry, wrong shape or entry nobody expects
is named in a one-line error with the fix, and nothing is written. Entries left out on purpose (`UNUSED`): the
tokenizer's encoder and latent tokens, CLIP's logit scale; the generator's `lm_head.weight`, which is the embedding
table (tied) and must equal it. float16/bfloat16 files are widened to float32.

The output mirrors `fpd_jax.tools.import_maskgit` (a stage directory each, written all or nothing: temporary
directories renamed into place once all are complete; an existing part is replaced only with `--overwrite`):

  OUT/teacher/export/ + export_meta.json        MaskGenTransformer parameters (`maskgen.MaskGenTransformer`)
  OUT/tokenizer/export/ + export_meta.json      TATiTokDecoder parameters (`tatitok.TATiTokDecoder`)
  OUT/text_encoder/export/ + export_meta.json   TextTransformer parameters (`clip_text.TextTransformer`)
  OUT/clip_vision/export/ + export_meta.json    VisionTransformer parameters (`clip_vision.VisionTransformer`)

Each meta holds the sizes, the source file, its size and sha256, and the entries left out. Captions are tokenized by
`fpd_jax.data.clip_tokenizer.ClipTokenizer` (open_clip's BPE vocabulary), which has no weights to import.
"""

import dataclasses
import os

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import cli
from fpd_jax import weights_io
from fpd_jax.errors import UserError
from fpd_jax.models import clip_text
from fpd_jax.models import clip_vision
from fpd_jax.models import maskgen
from fpd_jax.models import tatitok


@dataclasses.dataclass(frozen=True)
class Part:
  flag: str  # The command-line flag naming the file.
  what: str  # What the file holds, for messages.
  released: str  # The released file, for messages.


PARTS = {
    'teacher': Part('--generator', 'the MaskGen-VQ generator', 'maskgen_vq_l.bin'),
    'tokenizer': Part('--tokenizer', 'the TA-TiTok VQ tokenizer', 'tatitok_bl128_vq.bin'),
    'text_encoder': Part('--clip', 'the CLIP ViT-L/14-336 text tower',
                         'open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_336.openai'),
    'clip_vision': Part('--clip', 'the CLIP ViT-L/14-336 vision tower',
                        'open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_336.openai'),
}
# The flag each part is read from; parts of one flag come from one file, read once.
FLAG_PARTS = {'generator': ('teacher',), 'tokenizer': ('tokenizer',), 'clip': ('text_encoder', 'clip_vision')}
# Parts that take only the entries of their file under a prefix (the rest of the file belongs to another part).
PREFIX = {'clip_vision': 'visual.'}
# Sizes of the released networks (`import_weights` takes others for tests and non-released models).
RELEASED = {'teacher': maskgen.MASKGEN_VQ_L, 'tokenizer': tatitok.TATITOK_BL128_VQ,
            'text_encoder': clip_text.VIT_L_14_336, 'clip_vision': clip_vision.VIT_L_14_336}
# Entries a part's file may hold that the import leaves out: exact names, or prefixes ending in '.'.
UNUSED = {
    'teacher': ('lm_head.weight',),  # Tied to embeddings.weight (checked equal) in .bin files.
    'tokenizer': ('encoder.', 'latent_tokens', 'quantize.embed_prob'),  # Encoding only.
    'text_encoder': ('visual.', 'logit_scale', 'logit_bias', 'attn_mask', 'input_resolution', 'context_length',
                     'vocab_size'),  # The vision tower (part clip_vision); TorchScript's constants.
    'clip_vision': (),  # Reads only the visual.* entries (PREFIX); each must be known.
}


# ---------------------------------------------------------------------------------------------------------------
# Name tables: (official name, our path, transform); transforms: None (as is), 'linear' ([out, in] -> [in, out]),
# 'conv' (OIHW -> HWIO), 'conv1x1' ([out, in, 1, 1] -> [in, out]).


def _linear(official: str, ours: str, bias: bool = True) -> list:
  rows = [(f'{official}.weight', f'{ours}/kernel', 'linear')]
  return rows + [(f'{official}.bias', f'{ours}/bias', None)] if bias else rows


def _layer_norm(official: str, ours: str) -> list:
  return [(f'{official}.weight', f'{ours}/scale', None), (f'{official}.bias', f'{ours}/bias', None)]


def _vit_block(official: str, ours: str) -> list:
  """open_clip / TiTok `ResidualAttentionBlock` -> `clip_text.ResidualAttentionBlock`."""
  return (_layer_norm(f'{official}.ln_1', f'{ours}/ln_1') +
          [(f'{official}.attn.in_proj_weight', f'{ours}/attn/in_proj/kernel', 'linear'),
           (f'{official}.attn.in_proj_bias', f'{ours}/attn/in_proj/bias', None)] +
          _linear(f'{official}.attn.out_proj', f'{ours}/attn/out_proj') +
          _layer_norm(f'{official}.ln_2', f'{ours}/ln_2') +
          _linear(f'{official}.mlp.c_fc', f'{ours}/mlp/c_fc') + _linear(f'{official}.mlp.c_proj', f'{ours}/mlp/c_proj'))


def generator_table(sizes: dict) -> list:
  """`MaskGen_VQ` state dict -> `maskgen.MaskGenTransformer` (diffusers' JointTransformerBlock names)."""
  rows = [('embeddings.weight', 'embeddings', None), ('pos_embed', 'pos_embed', None)]
  rows += _linear('text_embed_proj', 'text_embed_proj') + _linear('cond_pooled_proj', 'cond_pooled_proj')
  for i in range(sizes['num_layers']):
    last = i == sizes['num_layers'] - 1
    b, o = f'blocks.{i}', f'blocks_{i}'
    rows += _linear(f'{b}.norm1.linear', f'{o}/norm1') + _linear(f'{b}.norm1_context.linear', f'{o}/norm1_context')
    for name in ('to_q', 'to_k', 'to_v', 'add_q_proj', 'add_k_proj', 'add_v_proj'):
      rows += _linear(f'{b}.attn.{name}', f'{o}/{name}')
    rows += _linear(f'{b}.attn.to_out.0', f'{o}/to_out')
    rows += _linear(f'{b}.ff.net.0.proj', f'{o}/ff/fc1') + _linear(f'{b}.ff.net.2', f'{o}/ff/fc2')
    if not last:  # A context_pre_only block has no text output projection and no text MLP.
      rows += _linear(f'{b}.attn.to_add_out', f'{o}/to_add_out')
      rows += _linear(f'{b}.ff_context.net.0.proj', f'{o}/ff_context/fc1')
      rows += _linear(f'{b}.ff_context.net.2', f'{o}/ff_context/fc2')
  return rows + _linear('norm.linear', 'norm_out')


def tokenizer_table(sizes: dict) -> list:
  """`TATiTok` state dict (decoder and codebook) -> `tatitok.TATiTokDecoder`."""
  d = 'decoder'
  rows = [('quantize.embedding.weight', 'codebook', None)]
  rows += [(f'{d}.{name}', name, None) for name in (
      'class_embedding', 'positional_embedding', 'mask_token', 'latent_token_positional_embedding',
      'text_guidance_positional_embedding')]
  rows += _linear(f'{d}.decoder_embed', 'decoder_embed') + _linear(f'{d}.text_guidance_proj', 'text_guidance_proj')
  rows += _layer_norm(f'{d}.ln_pre', 'ln_pre') + _layer_norm(f'{d}.ln_post', 'ln_post')
  for i in range(sizes['num_layers']):
    rows += _vit_block(f'{d}.transformer.{i}', f'transformer_{i}')
  rows += [(f'{d}.ffn.0.weight', 'ffn/kernel', 'conv1x1'), (f'{d}.ffn.0.bias', 'ffn/bias', None),
           (f'{d}.conv_out.weight', 'conv_out/kernel', 'conv'), (f'{d}.conv_out.bias', 'conv_out/bias', None)]
  return rows


def clip_table(sizes: dict) -> list:
  """open_clip `CLIP` state dict (text tower) -> `clip_text.TextTransformer`."""
  rows = [('token_embedding.weight', 'token_embedding/embedding', None),
          ('positional_embedding', 'positional_embedding', None), ('text_projection', 'text_projection', None)]
  for i in range(sizes['num_layers']):
    rows += _vit_block(f'transformer.resblocks.{i}', f'resblocks_{i}')
  return rows + _layer_norm('ln_final', 'ln_final')


def clip_vision_table(sizes: dict) -> list:
  """open_clip `CLIP` state dict (vision tower, `visual.*`) -> `clip_vision.VisionTransformer`."""
  v = 'visual'
  rows = [(f'{v}.conv1.weight', 'conv1/kernel', 'conv'), (f'{v}.class_embedding', 'class_embedding', None),
          (f'{v}.positional_embedding', 'positional_embedding', None), (f'{v}.proj', 'proj', None)]
  rows += _layer_norm(f'{v}.ln_pre', 'ln_pre') + _layer_norm(f'{v}.ln_post', 'ln_post')
  for i in range(sizes['num_layers']):
    rows += _vit_block(f'{v}.transformer.resblocks.{i}', f'resblocks_{i}')
  return rows


TABLES = {'teacher': generator_table, 'tokenizer': tokenizer_table, 'text_encoder': clip_table,
          'clip_vision': clip_vision_table}


# ---------------------------------------------------------------------------------------------------------------
# Models and shapes.


MODULES = {'teacher': maskgen.MaskGenTransformer, 'tokenizer': tatitok.TATiTokDecoder,
           'text_encoder': clip_text.TextTransformer, 'clip_vision': clip_vision.VisionTransformer}


def module(part: str, sizes: dict):
  """The part's Flax module at `sizes` (the generator's `text_dim`, the width of the text it reads, is not a field)."""
  return MODULES[part](**{k: v for k, v in sizes.items() if not (part == 'teacher' and k == 'text_dim')})


def expected_shapes(part: str, sizes: dict) -> dict[str, tuple]:
  """{our path: shape} of the part's parameters at `sizes`."""
  net = module(part, sizes)
  if part == 'teacher':
    text_dim = sizes.get('text_dim', maskgen.MASKGEN_VQ_L_TEXT_DIM)
    args = (jnp.zeros((1, net.num_tokens), jnp.int32), jnp.zeros((1, 1, text_dim)), jnp.zeros((1, text_dim)),
            jnp.zeros((1,)))
  elif part == 'tokenizer':
    args = (jnp.zeros((1, net.num_tokens), jnp.int32), jnp.zeros((1, net.text_length, net.text_dim)))
  elif part == 'clip_vision':
    args = (jnp.zeros((1, net.image_size, net.image_size, 3)),)
  else:
    args = (jnp.zeros((1, net.context_length), jnp.int32),)
  return ckpt_lib.tree_shapes(jax.eval_shape(lambda: net.init(jax.random.key(0), *args)['params']))


def _unused(part: str, name: str) -> bool:
  return any(name.startswith(u) if u.endswith('.') else name == u for u in UNUSED[part])


def convert(part: str, state: dict[str, np.ndarray], sizes: dict, source: str, consume: bool = False) -> dict:
  """Maps one official state dict onto our parameter tree, checking every name and shape first.

  Args:
    part: a key of `PARTS`.
    state: {official name: array}.
    sizes: the part's sizes (`RELEASED[part]` for the released file).
    source: the file, for messages.
    consume: remove each entry from `state` once converted (the import holds one copy of a large file, not two).

  Returns:
    Nested dicts of float32 numpy arrays with the structure of the part's Flax module at `sizes`.

  Raises:
    UserError: naming the first wrong shape or non-float entry (in table order), else the first missing entry,
      else the first entry nobody expects, or (generator) an `lm_head.weight` that differs from the embeddings.
  """
  spec = PARTS[part]
  fix = f'pass the released file of {spec.what} ({spec.released}) as {spec.flag}'
  describe = f'{spec.what} ({", ".join(f"{k} {v}" for k, v in sizes.items() if isinstance(v, int))})'
  expected = expected_shapes(part, sizes)
  table = TABLES[part](sizes)
  paths = {path for _, path, _ in table}
  assert paths == set(expected), sorted(paths ^ set(expected))  # The table covers the module exactly.
  for name, path, transform in table:  # Table order: the first wrong shape (a file of other sizes fails here).
    if name not in state:
      continue
    value = state[name]
    if not np.issubdtype(value.dtype, np.floating):
      raise UserError(f'{source}: entry {name} is {value.dtype}, not a float array; {fix}.')
    want = weights_io.torch_shape(expected[path], transform)
    if tuple(value.shape) != want:
      raise UserError(f'{source}: entry {name} has shape {tuple(value.shape)} but {describe} needs {want} (wrong '
                      f'shape); {fix}.')
  for name, path, transform in table:
    if name not in state:
      raise UserError(f'{source} lacks entry {name} (missing key; expected shape '
                      f'{weights_io.torch_shape(expected[path], transform)} for {describe}); {fix}.')
  known = {name for name, _, _ in table}
  for key in state:  # File order: the first entry the table does not know.
    if key not in known and not _unused(part, key):
      raise UserError(f'{source} has entry {key} {tuple(np.shape(state[key]))}, which {describe} does not have '
                      f'(unexpected key); {fix}.')
  if part == 'teacher' and 'lm_head.weight' in state:
    head = state['lm_head.weight']
    if head.shape != state['embeddings.weight'].shape or not np.array_equal(head, state['embeddings.weight']):
      raise UserError(f'{source}: lm_head.weight differs from embeddings.weight, but the released head is tied to '
                      f'the embedding table; {fix}.')
  flat = {}
  for name, path, transform in table:
    value = state.pop(name) if consume else state[name]
    flat[path] = np.ascontiguousarray(weights_io.to_flax(value.astype(np.float32, copy=False), transform))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing.


def check_sources(generator: str | None, tokenizer: str | None, clip: str | None) -> dict[str, str]:
  """`{part: file}` of the files given (`FLAG_PARTS`); raises UserError when none is given or one does not exist."""
  files = {'generator': generator, 'tokenizer': tokenizer, 'clip': clip}
  sources = {part: files[flag] for flag, parts in FLAG_PARTS.items() for part in parts if files[flag]}
  if not sources:
    raise UserError('nothing to import; pass --generator=FILE, --tokenizer=FILE and/or --clip=FILE.')
  for part, path in sources.items():
    spec = PARTS[part]
    if not os.path.isfile(path):
      raise UserError(f'{spec.flag}={path} not found; pass the released file of {spec.what} (e.g. {spec.released}).')
  return sources


def _meta(part: str, params, sizes: dict, path: str, sha256: str, size: int, unused: list[str]) -> dict:
  leaves = jax.tree.leaves(params)
  return {'part': part, 'sizes': dict(sizes),
          'source': {'file': os.path.abspath(path), 'sha256': sha256, 'bytes': size},
          'num_arrays': len(leaves), 'num_params': int(sum(np.size(x) for x in leaves)), 'dtype': 'float32',
          'unused_entries': unused if len(unused) <= 20 else unused[:20] + [f'... {len(unused)} in all'],
          'imported_by': 'fpd_jax.tools.import_maskgen'}


def import_weights(out: str, generator: str | None = None, tokenizer: str | None = None, clip: str | None = None,
                   overwrite: bool = False, sizes: dict | None = None, log=print) -> dict[str, dict]:
  """Checks the official files and writes them as `OUT/<part>/export` + `export_meta.json` (see module doc).

  Each file is read once; `--clip` gives the text tower and, from its `visual.*` entries, the vision tower (a file
  without any is imported as a text tower only, logged; refused where `out` holds an earlier import's vision tower,
  which would no longer match the text tower).

  Args:
    out: output directory.
    generator, tokenizer, clip: the official files (any may be None).
    overwrite: replace existing parts under `out`.
    sizes: `{part: sizes}` replacing `RELEASED` for some parts (tests, non-released models).
    log: where progress lines go.

  Returns:
    `{part: meta}` of the parts written.

  Raises:
    UserError: no file, a missing or unreadable file, a name or shape that does not fit (named), an output that
      exists (without `overwrite`) or cannot be written, or a part of an earlier import that the files would leave
      in place. Nothing is written under `out` then.
  """
  sources = check_sources(generator, tokenizer, clip)
  if '://' in out:
    raise UserError(f'--out={out}: write to a local directory, then copy it; the all-or-nothing rename needs a local '
                    'file system.')
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'--out={out} is a file; pass a directory.')
  ckpt_lib.check_export_destinations([os.path.join(out, part) for part in sources], overwrite)  # Before reading.
  sizes = {**RELEASED, **(sizes or {})}
  loaded = {}
  for parts in FLAG_PARTS.values():
    parts = [part for part in parts if part in sources]
    if not parts:
      continue
    path = sources[parts[0]]
    state = weights_io.read_weights(path)
    sha256, size = weights_io.sha256(path)
    claimed = tuple(PREFIX[part] for part in parts if part in PREFIX)  # Entries another part of this file takes.
    for part in parts:
      if part in PREFIX:  # Its entries only, taken out of the file's state (converted, they are freed).
        scoped = {k: state.pop(k) for k in [k for k in state if k.startswith(PREFIX[part])]}
        if not scoped:
          log(f'{part}: {os.path.basename(path)} has no {PREFIX[part]}* entries, so {PARTS[part].what} is not '
              'imported (the CLIP score of the evaluate stage needs it).')
          continue
      else:
        scoped = state
      unused = sorted(k for k in scoped if _unused(part, k) and not (claimed and k.startswith(claimed)))
      params = convert(part, scoped, sizes[part], path, consume=True)
      loaded[part] = (params, _meta(part, params, sizes[part], path, sha256, size, unused))
      log(f'{part}: {os.path.basename(path)} fits {PARTS[part].what}: {loaded[part][1]["num_arrays"]} arrays, '
          f'{loaded[part][1]["num_params"]:,} parameters (sha256 {sha256[:16]}...)')
    del state
  stale = [part for part in sources if part not in loaded and os.path.exists(os.path.join(out, part))]
  if stale:  # E.g. a text-only --clip file over an earlier full import: the towers would no longer match.
    raise UserError(f'{os.path.join(out, stale[0])} holds {PARTS[stale[0]].what} of an earlier import, which '
                    f'{os.path.basename(sources[stale[0]])} does not replace; delete it (or import into a new --out) '
                    'so that no part is left from other weights.')
  ckpt_lib.write_exports({os.path.join(out, part): value for part, value in loaded.items()}, overwrite, log)
  for part in loaded:
    log(f'{part}: wrote {os.path.join(out, part)} (export/ + export_meta.json)')
  return {part: meta for part, (_, meta) in loaded.items()}


def load(directory: str, part: str):
  """(Flax module, parameters) of a part written by `import_weights` (`directory` = OUT/<part>)."""
  export = os.path.join(directory, 'export')
  sizes = ckpt_lib.load_export_meta(export, f'the imported {part}')['sizes']
  target = flax.traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in expected_shapes(part, sizes).items()}, sep='/')
  return module(part, sizes), ckpt_lib.load_export(export, target, f'the imported {part}')


# ---------------------------------------------------------------------------------------------------------------
# Command line. Flags are defined only when this module runs as a program, so importing it has no side effects.


def _define_flags() -> dict[str, flags.FlagHolder]:
  return {
      'generator': flags.DEFINE_string(
          'generator', None, 'Official MaskGen-VQ generator weights (model.safetensors of hub repo '
          'turkeyju/generator_maskgen_vq_l, or maskgen_vq_l.bin of fun-research/TA-TiTok); written to OUT/teacher.'),
      'tokenizer': flags.DEFINE_string(
          'tokenizer', None, 'Official TA-TiTok tokenizer weights (model.safetensors of turkeyju/tokenizer_tatitok_'
          'bl128_vq, or tatitok_bl128_vq.bin of fun-research/TA-TiTok); decoder and codebook written to OUT/tokenizer.'),
      'clip': flags.DEFINE_string(
          'clip', None, 'open_clip ViT-L-14-336 OpenAI weights (open_clip_pytorch_model.bin or '
          'open_clip_model.safetensors of timm/vit_large_patch14_clip_336.openai, or ViT-L-14-336px.pt); text tower '
          'written to OUT/text_encoder, vision tower (visual.*, for the CLIP score) to OUT/clip_vision.'),
      'out': flags.DEFINE_string('out', None, 'Output directory (teacher/, tokenizer/, text_encoder/, clip_vision/).'),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'Replace existing parts under OUT.'),
  }


def _run(v: dict) -> None:
  import_weights(v['out'], v['generator'], v['tokenizer'], v['clip'], v['overwrite'])


if __name__ == '__main__':
  cli.run_tool(_define_flags, _run, ['out'])
