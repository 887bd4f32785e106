"""RandomCrop: reflect-pad by 4 pixels and crop back to the training size, plus horizontal flips.

Built-in recipes run batched on the training device over the uint8 cache; their strengths
are in alexnet/augment.py (RECIPES). To change them, return your own
alexnet.augment.Recipe(crop_pad=..., flip=..., brightness=..., ...). To use a torchvision
pipeline instead, return a torchvision transform (see examples/transforms_torchvision.py):
it then runs per image in DataLoader workers.
"""

from alexnet.augment import RECIPES


def build_transforms():
    return RECIPES["randomcrop"]
