"""The reference networks (PyTorch): a compact 2D U-Net, a small body-part classifier and a
small 3D U-Net.

Only ``models.training.train`` imports this module; the node serves the exported ONNX graphs and never
needs torch. The networks are sized for CPU training in minutes and for packed model objects
of about a megabyte. The 2D graphs end in their activation (sigmoid per segmentation class,
softmax over body parts) so that ONNX Runtime hands back probabilities, as their cards'
``task.activation`` promises. The 3D U-Net's graph ends in logits (its card says
``output = "logits"``): the node blends overlapping windows and takes the argmax, for which the
softmax would change nothing. Training uses the logits for numerically stable losses.
"""

from __future__ import annotations

import torch
from torch import nn

LUNG_CLASSES = ("lung", "nodule")
BODY_PART_CLASSES = ("head", "chest", "abdomen", "pelvis", "limb")
# Exclusive classes of the 3D chest U-Net, channel i + 1 (channel 0 is the background);
# the same order as models.training.phantoms.CT_LABELS.
CHEST3D_CLASSES = ("left_lung", "right_lung", "heart")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    # Bias is redundant ahead of BatchNorm; the exporter folds BN into the convolution.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """U-Net with ``len(widths) - 1`` poolings; H and W must be multiples of 2**(len(widths)-1).

    Returns logits [N, classes, H, W]; :class:`WithActivation` adds the sigmoid for export.
    """

    def __init__(self, in_channels: int = 1, classes: int = 2, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.widths = widths
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_conv_block(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            # Transposed convolution doubles exactly, so skip connections always line up.
            self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.dec.append(_conv_block(2 * w, w))
            cin = w
        self.head = nn.Conv2d(cin, classes, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def _conv_block3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """3D U-Net with ``len(widths) - 1`` poolings; each spatial size must be a multiple of
    ``multiple`` (2**(len(widths)-1)).

    BatchNorm rather than InstanceNorm: in eval mode it is a fixed affine map (folded into the
    convolutions at export), so a voxel's logits depend on its receptive field only, not on the
    statistics of whatever else its sliding window holds (mostly air at the edge of a scan).
    Returns logits [N, classes, X, Y, Z].
    """

    def __init__(self, in_channels: int = 1, classes: int = 4, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.widths = widths
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_conv_block3d(cin, w))
            cin = w
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose3d(cin, w, 2, stride=2))
            self.dec.append(_conv_block3d(2 * w, w))
            cin = w
        self.head = nn.Conv3d(cin, classes, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class BodyPartNet(nn.Module):
    """Small strided CNN with global average pooling, so any input size runs (trained at 128x128).

    Returns logits [N, classes]; :class:`WithActivation` adds the softmax for export.
    """

    def __init__(self, in_channels: int = 1, classes: int = 5, widths: tuple[int, ...] = (16, 32, 48, 64, 96)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            layers += [
                nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


class WithActivation(nn.Module):
    """Wraps a logits network so the exported graph outputs probabilities."""

    def __init__(self, net: nn.Module, activation: str) -> None:
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"unknown activation {activation!r}")
        self.net = net
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
