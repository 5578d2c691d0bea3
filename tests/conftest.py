"""Test set-up: four fake CPU devices so data-parallel code is exercised.

The device count must be set before JAX initialises its backends, hence here.
"""

import os

import jax

jax.config.update("jax_num_cpu_devices", 4)

# Tests that need the real data read it from here; see README "Data".
DATA_DIR = os.environ.get(
    "G2D_DATA_DIR",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
)
