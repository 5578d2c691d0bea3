"""Test set-up: four fake CPU devices so data-parallel code is exercised.

The device count must be set before JAX initialises its backends, hence here.
"""

import atexit
import os
import shutil
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 4)

# Many tests build the same tiny programs (a fresh jitted closure each
# time); a persistent compilation cache, fresh per test session, compiles
# each distinct program once (test_methods_pmr.py: 58 s -> 34 s).
_XLA_CACHE = tempfile.mkdtemp(prefix="g2d_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Tests that need the real data read it from here; see README "Data".
# Absolute, because tests symlink into it from temporary directories and the
# README passes a relative G2D_DATA_DIR.
DATA_DIR = os.path.abspath(os.environ.get(
    "G2D_DATA_DIR",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
))
