"""Combined-GAP: BatchNorm + dropout, global average pooling after conv5, one FC to the classes.

Pass this file to train.py / evaluate.py. Copy it to make your own variant: build_model must
return a torch.nn.Module taking (N, 3, S, S) images and returning (N, num_classes) logits.
"""

from alexnet.models import create_model


def build_model(num_classes: int = 200):
    return create_model("combined_gap", num_classes)
