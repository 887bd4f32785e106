"""The paper's augmentation: random crops from the image enlarged by 256/224, horizontal flips, and PCA colour lighting (alpha ~ N(0, 0.1)) with the train set's eigenvectors; and the paper's input: pixels minus the train mean in 0..255 units, not divided by the std.

Built-in recipes run batched on the training device over the uint8 cache; their strengths
are in alexnet/augment.py (RECIPES). To change them, return your own
alexnet.augment.Recipe(crop_pad=..., flip=..., brightness=..., ...). To use a torchvision
pipeline instead, return a torchvision transform (see examples/transforms_torchvision.py):
it then runs per image in DataLoader workers.
"""

from alexnet.augment import RECIPES


def build_transforms():
    return RECIPES["paper"]
