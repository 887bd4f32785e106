"""BatchNorm + global-average-pooling head without dropout: Combined-GAP with dropout 0.

The model of the project's fastest CPU recipe (README, "Time to accuracy"): 2.5M parameters,
so each step is cheap, and without dropout the small head fits faster in a short schedule.
An example of a model file that changes a registered variant.
"""

from alexnet.models import create_model


def build_model(num_classes: int = 200):
    return create_model("combined_gap", num_classes, dropout=0.0)
