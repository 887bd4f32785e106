"""The 2012 paper's model: 96-256-384-384-256, LRN after conv1/conv2, overlapping pooling, dropout 0.5, the paper's initialisation (train with utils/transforms_paper.py).

Pass this file to train.py / evaluate.py. Copy it to make your own variant: build_model must
return a torch.nn.Module taking (N, 3, S, S) images and returning (N, num_classes) logits.
"""

from alexnet.models import create_model


def build_model(num_classes: int = 200):
    return create_model("paper", num_classes)
