"""Train: labelled cases become a checkpoint (weights + card).

Enters: a dataset folder or a named ``clusters.yaml``, a :class:`~models.data.preprocess.Geometry` and a
:class:`~models.train.loop.TrainConfig`. Leaves: ``OUT.pt`` with its card, and ``OUT.state.pt`` (the resume state:
plain dicts and tensors) after every epoch. :mod:`~models.train.loop` is the one loop (``train``/``fit``); each task
plugs its pieces in: :mod:`~models.train.boneage` (bone age and sex), :mod:`~models.train.classify` (sex,
abnormality on MURA, anatomy from class folders: the task specs and the ``train`` dispatch),
:mod:`~models.train.abnormality` (abnormality on FracAtlas, with the radiologists' boxes),
:mod:`~models.train.anatomy` and :mod:`~models.train.anatomy_world` (anatomy probes on frozen features),
:mod:`~models.train.side` (the right-hand head), :mod:`~models.train.cluster` (``bonebridge sort``: clusters a person
names, the anatomy labels).
"""
