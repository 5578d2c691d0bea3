"""Test set-up: four fake CPU devices so data-parallel code is exercised.

The device count must be set before JAX initialises its backends, hence here.
"""

import os

import jax

jax.config.update("jax_num_cpu_devices", 4)

# Tests that need the real data read it from here; see README "Data".
# Absolute, because tests symlink into it from temporary directories and the
# README passes a relative G2D_DATA_DIR.
DATA_DIR = os.path.abspath(os.environ.get(
    "G2D_DATA_DIR",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
))
