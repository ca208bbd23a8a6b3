"""Stage 2, assemble: spooled instances become complete studies.

Enters: :class:`daemon.receive.spool.InstanceEvent` (and association-closed notices) from the listener. Leaves:
``(study_uid, generation)`` handed to the queue once the study has been quiet for ``assembly.quiet_period_s`` after
its last association; the study's state (:class:`daemon.assemble.assembler.StudyState`) lives in
``data_dir/studies/<study>.json`` and survives restarts. Late images re-open a study as a new generation.
"""
