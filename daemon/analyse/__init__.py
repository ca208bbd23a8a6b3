"""Stage 4, analyse: a study's instances become anatomy, a route and findings.

Enters: the study's spooled DICOM files and the configuration. Leaves: a :class:`daemon.output.study_result.StudyResult`
(anatomy and its witnesses, route, each model's findings and maps, or why the study was not processed) and the
SR/SC built from it. Anatomy comes from tags and the anatomy model (:mod:`~daemon.analyse.anatomy_decision`), routes
are data (:mod:`~daemon.analyse.rules`, also :func:`~daemon.analyse.rules.route_by_tags` where no model may run),
the models are called through ``models.inference.predictor``. Offline, :mod:`~daemon.analyse.decision_table`
runs the same decision and routing over an anatomy model's outputs (``bonebridge evaluate anatomy --extra``).
"""
