"""A per-image torchvision pipeline, for users who prefer torchvision's transforms.

It runs in DataLoader workers (--workers) on (3, H, W) uint8 tensors from the cache and must
return a (3, H, W) uint8 tensor or float tensor in [0, 1]; normalisation is applied after it,
on the device. Slower than the batched built-in recipes on a small CPU.
"""

from torchvision.transforms import v2


def build_transforms():
    return v2.Compose([
        v2.RandomCrop(64, padding=4, padding_mode="reflect"),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
    ])
