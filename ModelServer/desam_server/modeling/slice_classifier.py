"""SAM-Mix's slice classifier: "does this slice hold the structure?", and its last
feature map for the class activation map (``cam.py``).

The paper's classifier is a ResNet-38 with global average pooling and a fully connected
head, trained with a binary focal loss. ResNet-38 is not in torchvision; in the CAM
literature it is Wu et al.'s wide ResNet-38 run at output stride 8, whose maps are finer
than a plain ResNet's stride 32. We build torchvision's ResNets instead (never with
downloaded weights) and default to ResNet-50: its bottleneck blocks accept dilation, so
it can run at output stride 8 like ResNet-38 (a 512 px slice gives a 64 x 64 map rather
than 16 x 16), with 23,503,809 parameters (1-channel stem, 1-logit head), far fewer than
the wide ResNet-38. ResNet-18/34 (basic blocks, no dilation in torchvision) are available
at output stride 32, e.g. for tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision
from torch import nn

from .cam import class_activation_map

#: depth -> torchvision builder; 18 and 34 use basic blocks, 50 and 101 bottlenecks.
RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
}
#: output stride -> torchvision's ``replace_stride_with_dilation`` (layer2, layer3, layer4).
DILATIONS = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


class ClassifierOutput(NamedTuple):
    """logits: B, one presence logit per slice (sigmoid -> probability);
    features: B x C x h x w, the last feature map before pooling (C = 512 for depths
      18/34, 2048 for 50/101; h = ceil(H / output_stride), likewise w)."""

    logits: torch.Tensor
    features: torch.Tensor


class SliceClassifier(nn.Module):
    """ResNet backbone, global average pooling, one fully connected unit.

    Keyword-only hyper-parameters:
      depth: 18, 34, 50 (default) or 101, the torchvision ResNet;
      in_chans: input channels, 1 (default: the windowed slice as it is) or 3 (e.g. the
        windowed slice repeated, or neighbouring slices). Without pretrained weights there
        is nothing gained by copying one slice into three channels, so the stem is built
        for ``in_chans`` directly;
      output_stride: 32, 16 or 8 (default 8 for depths 50/101, where later stages use
        dilation instead of stride; 32 only for depths 18/34).

    The modules are torchvision's ``bn1``, ``layer1``..``layer4`` (randomly initialised,
    ``weights=None``: nothing is ever downloaded) behind our own stem convolution
    ``conv1`` (in_chans -> 64, 7 x 7, stride 2); torchvision's 1000-class head is not
    kept. ``fc`` is ``Linear(C, 1)``.

    forward(x: B x in_chans x H x W, the windowed slice scaled to [0, 1]) -> ClassifierOutput.
    """

    def __init__(self, *, depth: int = 50, in_chans: int = 1, output_stride: int | None = None) -> None:
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"depth must be one of {sorted(RESNETS)}, got {depth}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        if output_stride is None:
            output_stride = 8 if depth >= 50 else 32
        if output_stride not in DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(DILATIONS)}, got {output_stride}")
        if depth < 50 and output_stride != 32:
            raise ValueError(f"ResNet-{depth} (basic blocks) runs at output stride 32 only; "
                             "use depth 50 or 101 for output stride 16 or 8")
        self.depth = depth
        self.in_chans = in_chans
        self.output_stride = output_stride
        resnet = RESNETS[depth](weights=None, replace_stride_with_dilation=DILATIONS[output_stride])
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.feature_channels = resnet.fc.in_features
        self.fc = nn.Linear(self.feature_channels, 1)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected B x {self.in_chans} x H x W input, got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(features.mean(dim=(2, 3)))[:, 0]
        return ClassifierOutput(logits=logits, features=features)

    def class_activation_map(self, features: torch.Tensor, *, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``g = sum_i w_i F_i`` with this head's weights: B x h x w, or B x H x W for
        ``size`` = (H, W) (see ``cam.class_activation_map``)."""
        return class_activation_map(features, self.fc.weight[0], size=size)
