"""Baseline AlexNet: torchvision geometry (64-192-384-256-256, FC 4096-4096), no dropout, no BatchNorm.

Pass this file to train.py / evaluate.py. Copy it to make your own variant: build_model must
return a torch.nn.Module taking (N, 3, S, S) images and returning (N, num_classes) logits.
"""

from alexnet.models import create_model


def build_model(num_classes: int = 200):
    return create_model("baseline", num_classes)
