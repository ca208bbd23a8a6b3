"""BoneBridge's machine learning: one sub-package per job, in the order a model is made and used.

- :mod:`models.data`: files on disk become images and labelled cases (readers, splits, preprocessing, site styles).
- :mod:`models.nets`: the networks, checkpoints with their cards, Grad-CAM, the anatomy OOD model, precision.
- :mod:`models.metrics`: classifier metrics and bootstrap confidence intervals (used by training and evaluation).
- :mod:`models.train`: the one training loop and each task's pieces (bone age, abnormality, anatomy, sort).
- :mod:`models.inference`: the daemon's one door into the models (:class:`models.inference.predictor.Predictor`).
- :mod:`models.eval`: ``bonebridge evaluate`` and ``compare``: reports, figures, plots.

At the top: :mod:`models.cli` (the model commands) and what the daemon shares with the models:
:mod:`models.anatomy_vocabulary` (the names of body parts) and :mod:`models.display_image` (DICOM pixel data to the
one display image every model sees). ``models/weights/`` holds the shipped checkpoints. Nothing here imports
``daemon``; the daemon imports the models (lazily, in its analysis workers).
"""
