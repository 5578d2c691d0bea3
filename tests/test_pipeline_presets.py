"""The shared protocols behind configs/{cremad,vggsound,urfunny,iemocap}.py."""

import pytest

from g2d_jax import schedule
from g2d_jax.pipeline import presets


def test_split_preset():
  assert presets.split_preset("small,joint", ("paper", "small")) == (
      "small", "joint")
  assert presets.split_preset("", ("paper", "small")) == ("paper", None)
  with pytest.raises(ValueError, match="unknown preset 'big'"):
    presets.split_preset("big", ("paper", "small"))
  with pytest.raises(ValueError, match="unknown method 'magic'"):
    presets.split_preset("paper,magic", ("paper", "small"))


def test_paper_protocols_are_the_official_one():
  av = presets.audio_visual("cremad", "paper")
  seq = presets.sequences("iemocap", "paper,umt")
  for c in (av, seq):
    for stage in (c.teacher, c.student):
      assert (stage.epochs, stage.batch_size) == (300, 16)
      o = stage.optimizer
      assert (o.name, o.lr, o.momentum, o.weight_decay) == (
          "sgd", 1e-3, 0.9, 1e-4)
      assert schedule.optimizer_decay_epochs(o, 300) == (200,)
      assert o.decay_factor == 0.1
  assert schedule.gating_taus(av) == (151,)
  assert av.model.encoders.audio.width == 64
  assert schedule.gating_taus(seq) == (75, 76)
  assert seq.method == "umt"
  assert seq.model.encoders.text.hidden_dim == 768
  assert seq.model.encoders.text.num_layers == 4
  with pytest.raises(AttributeError):   # locked: typos fail
    av.student.epochz = 3
