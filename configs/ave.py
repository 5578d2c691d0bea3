r"""G2D on AVE (log spectrogram audio + three video frames, 28 events).

The data is not shipped. Turn the AVE release (AVE/*.mp4, Annotations.txt,
trainSet/valSet/testSet.txt) into the prepared layout (classes.txt,
train.csv, val.csv, test.csv, audio/, frames/; see g2d_jax/data/ave.py):

  python -m g2d_jax.data.prepare ave --raw DIR --out $G2D_DATA_DIR/ave

then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/ave.py --workdir=runs/ave

Presets (`--config=configs/ave.py:<preset>[,<method>]`):

  paper  (default) G2D's protocol: two ResNet-18s (1-channel audio;
         3 RGB frames folded into the batch and averaged over time), late
         fusion, batch 16, SGD lr 1e-3 momentum 0.9 wd 1e-4, 300 epochs,
         lr x0.1 at epoch 200, SMP for epochs 0..150 (tau_1 = 151). G2D's
         code lists AVE's 28 classes but has no AVE loader or reported
         protocol, so this is its CREMA-D/VGGSound one. Needs a GPU.
  small  a CPU check of the whole job: narrow ResNet-18s (width 8), frames
         resized to 112, 600 samples per split, a few epochs.
  smoke  tiny encoders, 32 samples per split, 2 epochs (tests).

The default data recipe is OGM-GE's whole-clip one
(`config.data.segment="clip"`): the wav loaded at 22050 Hz, 160000 samples,
`scipy.signal.spectrogram(nperseg=512, noverlap=353)`, log, per-sample
z-score: [257, 1004, 1]; frames 1, 4, 7 of ten.

What the published protocols use, per source:
- Classes: 28. Ids in Annotations.txt order (MLB's class dict, PMR's and
  ReconBoost's first-appearance order: `class_order="annotation"`, the
  default) or alphabetical (OGM-GE, MLA: `class_order="alphabetical"`).
- Splits: the official train / val / test (commonly cited as 3339 / 402 /
  402), used as they are; PMR builds its prototypes on the validation set.
- OGM-GE: whole clip, 3 frames, z-scored spectrogram (the defaults).
- PMR "-SE": the annotated event only, audio at 16 kHz, z-scored:
  `--config.data.segment=event` (`event_sample_rate` is 16000 already).
- MLB: PMR's event pipeline without the z-score and with 4 frames:
  `--config.data.segment=event --config.data.standardize=False
  --config.data.num_frames=4`; MLB's run.sh trains AVE with Adam lr 1e-3,
  wd 1e-4, stopping early on validation accuracy.
- ReconBoost: PMR's event pipeline with 3 frames: `--config.data.segment=event`.
"""

import ml_collections

from g2d_jax.pipeline import presets

PRESETS = presets.AUDIO_VISUAL_PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The AVE config for `<preset>[,<method>]` (module docstring)."""
  return presets.audio_visual("ave", preset)
