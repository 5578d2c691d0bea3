"""Flax encoders, fusion heads, student and teacher models (G2D 3, A.3, A.4)."""

from g2d_jax.models.cnn import SmallCNN, lenet_channels
from g2d_jax.models.fusion import (FUSIONS, BranchOutput, BranchSpec,
                                   ConcatFusion, CrossAttentionFusion,
                                   FiLMFusion, GatedFusion, LateFusion,
                                   SumFusion, make_fusion)
from g2d_jax.models.initializers import conv_kernel_init, dense_kernel_init
from g2d_jax.models.mlp import MLP
from g2d_jax.models.mobilenet import MobileNetV2
from g2d_jax.models.multimodal import (COMPUTE_DTYPES, ENCODERS,
                                       ModalityBranch,
                                       MultimodalModel, MultimodalOutput,
                                       UnimodalModel, make_encoder,
                                       make_multimodal, make_unimodal)
from g2d_jax.models.resnet import BasicBlock, ResNet18
from g2d_jax.models.transformer import TransformerEncoder

__all__ = [
    "BasicBlock",
    "BranchOutput",
    "BranchSpec",
    "COMPUTE_DTYPES",
    "ConcatFusion",
    "CrossAttentionFusion",
    "ENCODERS",
    "FUSIONS",
    "FiLMFusion",
    "GatedFusion",
    "LateFusion",
    "MLP",
    "MobileNetV2",
    "ModalityBranch",
    "MultimodalModel",
    "MultimodalOutput",
    "ResNet18",
    "SmallCNN",
    "SumFusion",
    "TransformerEncoder",
    "UnimodalModel",
    "conv_kernel_init",
    "dense_kernel_init",
    "lenet_channels",
    "make_encoder",
    "make_fusion",
    "make_multimodal",
    "make_unimodal",
]
