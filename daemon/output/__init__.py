"""Stage 5, output: findings become DICOM objects for the PACS.

Enters: a :class:`daemon.output.study_result.StudyResult` and the source instances. Leaves: one TID 1500
Comprehensive SR per study (:mod:`~daemon.output.sr`) and one heatmap Secondary Capture per image
(:mod:`~daemon.output.sc`), written by the worker to ``data_dir/outbox/<study>/<generation>/``. Codes are in
:mod:`~daemon.output.codes`; :mod:`~daemon.output.own_output` recognises these objects when a PACS sends them back.
"""
