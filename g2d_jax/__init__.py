"""g2d_jax: Gradient-Guided Distillation and balanced multimodal learning in JAX."""
