"""PyTorch reference of the AV-MNIST student step, for benchmarking only.

The same models as g2d_jax's `paper` and `quick` AV-MNIST presets (two
ResNet-18s, or the two stride-2 CNNs of `quick`, late fusion) and the same
two steps:

- `joint`: cross-entropy on the fused logits, SGD (lr 1e-3, momentum 0.9,
  weight decay 1e-4), as the official code's `teacher.py` with `mT`;
- `g2d`: the official `student.py` step with precomputed teacher outputs:
  CE + sum_m KL(teacher_m || fused) + sum_m MSE(f_s^m, f_t^m), a full
  backward pass, then the official SMP gating (the 4-D conv-kernel gradients
  of the gated encoder multiplied by its coefficient) before `optimizer.step()`.

Layout is NCHW, as PyTorch code is written. Optional: needs
`pip install torch==2.13.0` (the CPU build on this machine).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _init(module: nn.Module) -> None:
  """The official weight_init: kaiming-normal fan-out convs, xavier dense."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.Linear):
      nn.init.xavier_normal_(m.weight)
      nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
  """The OGM-GE/G2D ResNet-18 (1 input channel), globally average-pooled."""

  def __init__(self, width: int = 64):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(1, width, 7, 2, 3, bias=False),
                              nn.BatchNorm2d(width), nn.ReLU(),
                              nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], width
    for stage, mult in enumerate((1, 2, 4, 8)):
      for b in range(2):
        stride = 2 if stage > 0 and b == 0 else 1
        blocks.append(BasicBlock(cin, width * mult, stride))
        cin = width * mult
    self.blocks = nn.Sequential(*blocks)
    self.out_dim = cin

  def forward(self, x):
    return self.blocks(self.stem(x)).mean(dim=(2, 3))


class StridedCNN(nn.Module):
  """g2d_jax's SmallCNN with downsample="stride", BatchNorm and optionally
  a `patchify` x `patchify` first layer (the quick preset's audio encoder)."""

  def __init__(self, channels: tuple[int, ...], patchify: int = 0):
    super().__init__()
    layers, cin = [], 1
    for i, c in enumerate(channels):
      if i == 0 and patchify:
        conv = nn.Conv2d(cin, c, patchify, patchify, 0, bias=False)
      else:
        k = 5 if i == 0 else 3
        conv = nn.Conv2d(cin, c, k, 2, k // 2, bias=False)
      layers += [conv, nn.BatchNorm2d(c), nn.ReLU()]
      cin = c
    self.net = nn.Sequential(*layers)
    self.out_dim = cin

  def forward(self, x):
    return self.net(x).mean(dim=(2, 3))


class LateFusionStudent(nn.Module):
  """Audio and image encoders with per-modality heads; fused = their mean."""

  def __init__(self, model: str, num_classes: int = 10):
    super().__init__()
    if model == "paper":
      self.audio_net, self.visual_net = ResNet18(), ResNet18()
    else:
      # configs/avmnist.py:quick
      self.audio_net = StridedCNN((16, 32, 64, 128), patchify=4)
      self.visual_net = StridedCNN((32, 64, 128))
    self.fc_x = nn.Linear(self.audio_net.out_dim, num_classes)
    self.fc_y = nn.Linear(self.visual_net.out_dim, num_classes)
    _init(self)

  def forward(self, audio, image):
    a, v = self.audio_net(audio), self.visual_net(image)
    return a, v, (self.fc_x(a) + self.fc_y(v)) / 2


class TorchStep:
  """One training step of `method` ("joint" or "g2d") on fixed batches.

  `pattern` says which modalities train: "all", "audio" (the image encoder's
  conv kernels are gated, coefficient 0) or "image"; gating only applies to
  g2d, exactly as the official code does it (full backward, then multiply).
  """

  def __init__(self, model: str, method: str, pattern: str, batch_size: int,
               seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    self.net = LateFusionStudent(model).train().to(device)
    self.method, self.pattern = method, pattern
    self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-3, momentum=0.9,
                               weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = batch_size
    self.batches = []
    for _ in range(4):
      self.batches.append(dict(
          audio=torch.rand(n, 1, 112, 112, generator=g),
          image=torch.rand(n, 1, 28, 28, generator=g),
          y=torch.randint(0, 10, (n,), generator=g),
          t_logits_a=torch.randn(n, 10, generator=g),
          t_logits_v=torch.randn(n, 10, generator=g),
          t_feat_a=torch.randn(n, self.net.audio_net.out_dim, generator=g),
          t_feat_v=torch.randn(n, self.net.visual_net.out_dim, generator=g)))
    self.batches = [{k: v.to(device) for k, v in b.items()}
                    for b in self.batches]
    self.coeff = {"all": (1.0, 1.0), "audio": (1.0, 0.0),
                  "image": (0.0, 1.0)}[pattern]
    self.i = 0

  def __call__(self) -> float:
    b = self.batches[self.i % len(self.batches)]
    self.i += 1
    a, v, out = self.net(b["audio"], b["image"])
    loss = F.cross_entropy(out, b["y"])
    if self.method == "g2d":
      logp = F.log_softmax(out, dim=1)
      for t_logits, f_s, f_t in ((b["t_logits_a"], a, b["t_feat_a"]),
                                 (b["t_logits_v"], v, b["t_feat_v"])):
        loss = loss + F.kl_div(logp, F.softmax(t_logits, dim=1),
                               reduction="batchmean")
        loss = loss + F.mse_loss(f_s, f_t)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.method == "g2d" and self.pattern != "all":
      coeff_a, coeff_v = self.coeff
      for name, p in self.net.named_parameters():
        if p.grad is not None and p.grad.dim() == 4:
          if "audio" in name:
            p.grad = p.grad * coeff_a
          elif "visual" in name:
            p.grad = p.grad * coeff_v
    self.opt.step()
    # Reading the loss waits for the step (on CUDA too): the timing is the
    # whole step.
    return float(loss.detach())
