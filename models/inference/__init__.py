"""Inference: the daemon's one door into the models.

Enters: a checkpoint path (verified against its card) and decoded display images (:mod:`models.display_image`).
Leaves: :class:`~models.inference.predictor.Predictor`'s predictions per image (bone age and sex, abnormality with
its heatmap, anatomy scores with the OOD score). Called by ``daemon/analyse/pipeline.py`` in the analysis workers and
by :mod:`models.eval`.
"""
