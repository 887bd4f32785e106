"""The 2012 paper's model on its two GPUs' towers: models/alexnet_paper.py with groups=2.

conv2, conv4 and conv5 each see half the channels (the paper's GPUs exchanged activations
only at conv3 and the FC layers), and LRN normalises within each half: 1,413,120 fewer
parameters than the one-tower model. Trains with the paper's recipe, like that file.
"""

from alexnet.models import create_model


def build_model(num_classes: int = 200):
    return create_model("paper", num_classes, groups=2)
