"""AlexNet (Krizhevsky, Sutskever, Hinton, 2012) and its variants on TinyImageNet-200."""

__version__ = "0.1.0"
