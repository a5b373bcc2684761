"""Shared building blocks for the training, export and inference scripts.

Everything here returns objects (datasets, models, optimizers, metrics); the
training loops themselves live in the top-level scripts.
"""
