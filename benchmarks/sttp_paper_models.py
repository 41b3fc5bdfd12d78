"""The networks of the STTP paper's experiments (Obukhov et al., AISTATS 2021), written for
ttmanifold from their published descriptions: architectures only (no data, no weights).

- :class:`WideResNet` (depth 28, widen factor 10 by default): the CIFAR classifier of the
  paper's Fig. 7 (pre-activation wide basic blocks, biases in every convolution, the
  stride in the second convolution of a block).
- :class:`SNGANGenerator` / :class:`SNGANDiscriminator`: the ResNet GAN of Miyato et al.
  (2018) in the configurations the paper uses for CIFAR-10 (32x32) and STL-10 (48x48),
  with ``ndf`` overridable for the reduced discriminators of Table 1.

Every module accepts ``device=`` (``"meta"`` builds the structure without memory, which is
all that parameter counting needs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "SNGANGenerator", "SNGANDiscriminator", "SNGAN_CONFIGS"]

#: per image size: latent size, generator/discriminator widths, first feature-map side,
#: generator blocks (in, out) as divisors of ngf, discriminator blocks (in, out, downsample)
#: as divisors of ndf (the first, "optimized" block maps 3 -> ndf / d_blocks[0][0]).
SNGAN_CONFIGS = {
    32: dict(nz=128, ngf=256, ndf=128, bottom=4,
             g_blocks=[(1, 1), (1, 1), (1, 1)],
             d_blocks=[(1, 1, True), (1, 1, False), (1, 1, False)]),
    48: dict(nz=128, ngf=512, ndf=1024, bottom=6,
             g_blocks=[(1, 2), (2, 4), (4, 8)],
             d_blocks=[(16, 8, True), (8, 4, True), (4, 2, True), (2, 1, False)]),
}


class _WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, device):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, device=device)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, device=device)
        self.bn2 = nn.BatchNorm2d(cout, device=device)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, device=device)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, device=device)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return h + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: a 3x3 stem to 16 channels, three groups of
    ``(depth - 4) / 6`` blocks of widths ``16k, 32k, 64k`` (strides 1, 2, 2), BatchNorm,
    global average pooling and a linear classifier."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, device=None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth: expected 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, device=device)
        cin, groups = 16, []
        for w, s in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_WideBlock(cin, w, s if i == 0 else 1, device))
                cin = w
            groups.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = groups
        self.bn = nn.BatchNorm2d(cin, device=device)
        self.linear = nn.Linear(cin, num_classes, device=device)

    def forward(self, x):
        h = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        h = F.adaptive_avg_pool2d(F.relu(self.bn(h)), 1).flatten(1)
        return self.linear(h)


class _GBlock(nn.Module):
    def __init__(self, cin, cout, device):
        super().__init__()
        self.b1 = nn.BatchNorm2d(cin, device=device)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1, device=device)
        self.b2 = nn.BatchNorm2d(cout, device=device)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, device=device)
        self.c_shortcut = nn.Conv2d(cin, cout, 1, device=device)  # always: it upsamples

    def forward(self, x):
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        h = self.c1(up(F.relu(self.b1(x))))
        h = self.c2(F.relu(self.b2(h)))
        return h + self.c_shortcut(up(x))


class SNGANGenerator(nn.Module):
    """The SNGAN ResNet generator: ``noise_to_conv`` (a linear map of the latent to a
    ``ngf x bottom x bottom`` map), upsampling residual blocks, BatchNorm, a 3x3
    convolution to RGB and ``tanh``."""

    def __init__(self, size: int = 32, device=None):
        super().__init__()
        cfg = SNGAN_CONFIGS[size]
        ngf, self.bottom, self.nz = cfg["ngf"], cfg["bottom"], cfg["nz"]
        self.noise_to_conv = nn.Linear(self.nz, self.bottom ** 2 * ngf, device=device)
        self.blocks = nn.ModuleList(_GBlock(ngf // a, ngf // b, device)
                                    for a, b in cfg["g_blocks"])
        last = ngf // cfg["g_blocks"][-1][1]
        self.last_bn = nn.BatchNorm2d(last, device=device)
        self.last_conv = nn.Conv2d(last, 3, 3, padding=1, device=device)

    def forward(self, z):
        h = self.noise_to_conv(z).reshape(z.shape[0], -1, self.bottom, self.bottom)
        for b in self.blocks:
            h = b(h)
        return torch.tanh(self.last_conv(F.relu(self.last_bn(h))))


class _DBlock(nn.Module):
    def __init__(self, cin, cout, down, first, device):
        super().__init__()
        self.first, self.down = first, down
        hidden = cout if first else cin
        self.c1 = nn.Conv2d(cin, hidden, 3, padding=1, device=device)
        self.c2 = nn.Conv2d(hidden, cout, 3, padding=1, device=device)
        self.c_shortcut = (nn.Conv2d(cin, cout, 1, device=device)
                           if first or down or cin != cout else None)

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.c2(F.relu(self.c1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:
            s = self.c_shortcut(F.avg_pool2d(x, 2))
        elif self.c_shortcut is not None:
            s = self.c_shortcut(x)
            s = F.avg_pool2d(s, 2) if self.down else s
        return h + s


class SNGANDiscriminator(nn.Module):
    """The SNGAN ResNet discriminator: an optimized first block (3 -> ``ndf /
    d_blocks[0][0]`` channels, downsampling), residual blocks, ReLU, a spatial sum and a
    linear map to one score (no bias). ``ndf`` overrides the width (Table 1: 32 on CIFAR,
    64 on STL)."""

    def __init__(self, size: int = 32, ndf=None, device=None):
        super().__init__()
        cfg = SNGAN_CONFIGS[size]
        ndf = cfg["ndf"] if ndf is None else ndf
        first = ndf // cfg["d_blocks"][0][0]
        self.block1 = _DBlock(3, first, True, True, device)
        self.blocks = nn.ModuleList(_DBlock(ndf // a, ndf // b, down, False, device)
                                    for a, b, down in cfg["d_blocks"])
        self.last_linear = nn.Linear(ndf, 1, bias=False, device=device)

    def forward(self, x):
        h = self.block1(x)
        for b in self.blocks:
            h = b(h)
        return self.last_linear(F.relu(h).sum(dim=(2, 3)))
