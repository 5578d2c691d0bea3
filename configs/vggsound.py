r"""G2D on VGGSound (audio spectrogram + three video frames, 309/310 classes).

The data is not shipped: put VGGSound in the official G2D layout under
$G2D_DATA_DIR/vggsound (vggsound.csv, frames/<split>/Image-01-FPS/,
audio/<split>/; see g2d_jax/data/vggsound.py), e.g. from the clips with

  python -m g2d_jax.data.prepare vggsound --raw VGGSOUND --out \
      $G2D_DATA_DIR/vggsound

then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/vggsound.py --workdir=runs/vggsound

The first run builds a memory-mapped cache of the spectrograms and frames
(~150 GB for the full dataset; `--config.data.storage=on_demand` decodes per
step instead).

Presets (`--config=configs/vggsound.py:<preset>[,<method>]`):

  paper  (default) the paper's protocol: two ResNet-18s (1-channel audio;
         3 RGB frames folded into the batch and averaged over time), late
         fusion, batch 16, SGD lr 1e-3 momentum 0.9 wd 1e-4, 300 epochs,
         lr x0.1 at epoch 200, SMP for epochs 0..150 (tau_1 = 151). Needs a
         GPU.
  small  a CPU check of the whole job: narrow ResNet-18s (width 8), frames
         resized to 112, 600 samples per split, a few epochs.
  smoke  tiny encoders, 32 samples per split, 2 epochs (tests).

The official code has no validation split: `config.data.val_fraction` (0.05)
of each class's training rows forms one. By default every split uses the
deterministic test-time transform (no RandomResizedCrop/flip) and a fixed 5
s audio crop (`config.data.crop`, default the middle of the official random
range), since teacher outputs are precomputed per sample;
`--config.data.augment_views=K` caches K views of each training sample with
the official frame transform.
"""

import ml_collections

from g2d_jax.pipeline import presets

PRESETS = presets.AUDIO_VISUAL_PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The VGGSound config for `<preset>[,<method>]` (module docstring)."""
  return presets.audio_visual("vggsound", preset)
