"""Metrics: numbers from labels and scores, for training (model selection, thresholds) and evaluation alike.

Enters: numpy arrays of labels and scores. Leaves: classifier metrics, Youden's threshold, top-k accuracy
(:mod:`~models.metrics.classification`) and bootstrap confidence intervals (:mod:`~models.metrics.bootstrap`).
Imports nothing else of ``models``.
"""
