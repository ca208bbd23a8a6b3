"""Eval: a checkpoint measured on a labelled folder; ``bonebridge evaluate`` and ``bonebridge compare``.

Enters: a checkpoint and a labelled folder (or two reports to compare). Leaves: a JSON report, PNG plots and a
headline line. :mod:`~models.eval.evaluate` is the command (bone age, sex, abnormality on MURA, anatomy),
:mod:`~models.eval.abnormality` abnormality on FracAtlas (detection and whether the heatmap points),
:mod:`~models.eval.anatomy` the anatomy head's figures on cached features (the decision table on top of them is the
daemon's: ``daemon/analyse/decision_table.py``), :mod:`~models.eval.plots` the figures,
:mod:`~models.eval.compare` two bone-age reports paired.
"""
