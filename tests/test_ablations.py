"""The ablation variants each change one switch of config.distill."""

from configs import demo
from fpd_jax import ablations
from fpd_jax.train import distill


def test_each_variant_changes_one_switch_and_validates():
  base = demo.get_config()
  for name, (overrides, paper) in ablations.VARIANTS.items():
    config = ablations.variant_config(base, overrides)
    distill.validate(config)
    changed = {k for k in base.distill.keys() if base.distill[k] != config.distill[k]}
    expected = {k.split('.')[0] for k in overrides}
    assert changed == expected, name
    assert paper
  assert base.distill.lift == 'ste'  # The base config is untouched.
  assert ablations.variant_config(base, {'gan.enabled': True}).distill.gan.enabled


def test_markdown_lists_every_row():
  rows = {name: {'fd': 1.0, 'accuracy': 0.9, 'precision': 0.8, 'recall': 0.7, 'seconds': 10.0, 'paper': p}
          for name, (_, p) in ablations.VARIANTS.items()}
  text = ablations.markdown(rows, 100)
  for name in ablations.VARIANTS:
    assert f'| {name} |' in text
  assert 'lift=soft' in text and '| FD | accuracy | precision | recall |' in text
  text = ablations.markdown({'gan': {'geneval_lite': 0.4, 'held_out': 0.3, 'fd': 1.5, 'seconds': 9.0, 'paper': 'p'}},
                            100, ('geneval_lite', 'held_out', 'fd'))
  assert '| GenEval-lite | GenEval-lite held-out | FD |' in text
  assert '| gan | gan.enabled=True | 0.400 | 0.300 | 1.500 |' in text
