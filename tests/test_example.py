"""The plain-JAX example (examples/g2d_in_your_loop.py) keeps working."""

import importlib.util
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples",
                       "g2d_in_your_loop.py")


@pytest.fixture(scope="module")
def example():
  spec = importlib.util.spec_from_file_location("g2d_in_your_loop", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_example_trains_a_student_that_uses_both_views(example):
  result = example.main(student_epochs=12, taus=(4,), verbose=False)
  assert set(result) == {"teacher_strong", "teacher_weak", "student"}
  # The weak view alone is far from perfect; the fused student is far better.
  assert result["teacher_weak"] < 0.85
  assert result["student"] > result["teacher_weak"] + 0.1
