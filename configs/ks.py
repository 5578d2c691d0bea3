r"""G2D on Kinetics-Sounds (Kaldi fbank audio + three video frames, 31
classes).

The data is not shipped. Turn your Kinetics-400 clips of the Kinetics-Sounds
classes into the prepared layout (classes.txt, train.csv, test.csv, audio/,
frames/; see g2d_jax/data/ks.py):

  python -m g2d_jax.data.prepare kinetics_sounds --raw DIR \
      --out $G2D_DATA_DIR/kinetics_sounds

then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/ks.py --workdir=runs/ks

Presets (`--config=configs/ks.py:<preset>[,<method>]`):

  paper  (default) G2D's protocol: two ResNet-18s (1-channel audio;
         3 RGB frames folded into the batch and averaged over time), late
         fusion, batch 16, SGD lr 1e-3 momentum 0.9 wd 1e-4, 300 epochs,
         lr x0.1 at epoch 200, SMP for epochs 0..150 (tau_1 = 151). G2D's
         code lists 31 Kinetics-Sounds classes but has no Kinetics-Sounds
         loader or reported protocol, so this is its CREMA-D/VGGSound one.
         Needs a GPU.
  small  a CPU check of the whole job: narrow ResNet-18s (width 8), frames
         resized to 112, 600 samples per split, a few epochs.
  smoke  tiny encoders, 32 samples per split, 2 epochs (tests).

What the published protocols use, per source:
- Classes: 31 (OGM-GE, G2D, PMR and BalanceBenchmark all set 31; OGM-GE's
  split files carry labels 0..30 without names). Lists of 32 (CrissCross,
  + strumming guitar) and 34 (the original Look, Listen and Learn list)
  exist; `prepare` writes the chosen one to classes.txt and `num_classes`
  follows it.
- Audio: OGM-GE's process_audio.py Kaldi fbank, 128 mel bins, 10 ms shift,
  1024 frames, (x + 4.503877) / (2 * 5.141276): [1024, 128, 1] here.
- Frames: one per second (OGM-GE's moviepy script, mid-second), 3 used;
  BalanceBenchmark's test-time choice 1, 4, 7 of ten for every split here
  (its training loader picks a random frame per third; teacher outputs are
  precomputed per sample, so samples are fixed).
- Splits: train / test (the Kinetics val clips) only; no release has a
  validation set, so `config.data.val_fraction` (0.1) of each class's
  training rows forms one.
- Optimisers elsewhere: OGM-GE trains with SGD lr 1e-3 (momentum 0.9, wd
  1e-4, StepLR(70, 0.1)), batch 64, about 100 epochs; BalanceBenchmark with
  AdamW (wd 0.01), 30 epochs, StepLR(10, 0.1). `--config.protocol=released`
  selects each comparator's own optimiser.
"""

import ml_collections

from g2d_jax.pipeline import presets

PRESETS = presets.AUDIO_VISUAL_PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The Kinetics-Sounds config for `<preset>[,<method>]` (module
  docstring)."""
  return presets.audio_visual("kinetics_sounds", preset)
