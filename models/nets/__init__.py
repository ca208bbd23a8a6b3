"""Nets: the networks and their checkpoints.

Enters: an architecture name, a :class:`~models.data.preprocess.Geometry`, a ``.pt`` file with its card. Leaves: torch
modules (:mod:`~models.nets.networks`), verified checkpoints and :class:`~models.nets.checkpoint.ModelCard`
(:mod:`~models.nets.checkpoint`), Grad-CAM maps (:mod:`~models.nets.cam`), the anatomy model's out-of-distribution
score (:mod:`~models.nets.anatomy_ood`) and whether bf16 autocast runs natively (:mod:`~models.nets.precision`, read by
training and inference alike). Imports :mod:`models.data` only.
"""
