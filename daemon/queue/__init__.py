"""Stage 3, queue: complete studies become Celery tasks, and workers carry them out.

Enters: ``(study_uid, generation)`` from the assembler. Leaves: a ``process_study`` task on the Celery queue
``studies`` (run by :class:`daemon.queue.celery_tasks.WorkerRuntime`: analyse, then write the outputs and the
outcome record) and, per destination, a ``deliver_result`` task on the queue ``dispatch``. The broker is Redis:
embedded (:mod:`daemon.queue.broker`) or external.
"""
