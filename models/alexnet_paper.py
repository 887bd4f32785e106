"""The 2012 paper's model: 96-256-384-384-256, LRN after conv1/conv2, overlapping pooling, dropout 0.5 on the outputs of FC1 and FC2, the paper's initialisation (it trains with utils/transforms_paper.py's recipe unless told otherwise).

Its recipe (utils/transforms_paper.py) feeds it the paper's input: centred pixels in 0..255
units, the scale its N(0, 0.01) initialisation was made for. One departure, as in Caffe's
reference replication: the biases the paper sets to 1 start at 0.1; with 1 the loss stayed
flat (docs/results.md). create_model("paper", num_classes, init_bias=1.0) builds the
paper's letter; add groups=2 for its two GPUs' towers (conv2, conv4, conv5 and LRN within
each half of the channels; one tower by default).

Pass this file to train.py / evaluate.py. Copy it to make your own variant: build_model must
return a torch.nn.Module taking (N, 3, S, S) images and returning (N, num_classes) logits.
"""

from alexnet.models import create_model


def build_model(num_classes: int = 200):
    return create_model("paper", num_classes)
