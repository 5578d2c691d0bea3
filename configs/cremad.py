r"""G2D on CREMA-D (audio spectrogram + one video frame, 6 emotions).

The data is not shipped: put CREMA-D in the official G2D / OGM-GE layout
under $G2D_DATA_DIR/cremad (train.csv, test.csv, AudioWAV/, Image-01-FPS/;
see g2d_jax/data/cremad.py), e.g. from the release with

  python -m g2d_jax.data.prepare cremad --raw CREMA-D --out \
      $G2D_DATA_DIR/cremad --splits DIR_WITH_OGM_GE_train_and_test_csv

then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/cremad.py --workdir=runs/cremad

Presets (`--config=configs/cremad.py:<preset>[,<method>]`):

  paper  (default) the paper's protocol: two ResNet-18s (1-channel audio,
         3-channel frames), late fusion, batch 16, SGD lr 1e-3 momentum 0.9
         wd 1e-4, 300 epochs, lr x0.1 at epoch 200, SMP for epochs 0..150
         (tau_1 = 151). Needs a GPU.
  small  a CPU check of the whole job: narrow ResNet-18s (width 8), frames
         resized to 112, 600 samples per split, a few epochs.
  smoke  tiny encoders, 32 samples per split, 2 epochs (tests).

The official code has no validation split: `config.data.val_fraction` (0.1)
of each class's training rows forms one. By default every split uses the
deterministic test-time transform (no RandomResizedCrop/flip), since teacher
outputs are precomputed per sample; `--config.data.augment_views=4` caches
four views of each training sample with the official train transform (and
the teacher outputs of each), and the student reads one per epoch.
"""

import ml_collections

from g2d_jax.pipeline import presets

PRESETS = presets.AUDIO_VISUAL_PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The CREMA-D config for `<preset>[,<method>]` (see the module docstring)."""
  return presets.audio_visual("cremad", preset)
