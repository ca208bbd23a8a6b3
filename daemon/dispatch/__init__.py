"""Stage 6, dispatch: result files leave for the destinations.

Enters: a ``deliver_result(study, generation, destination)`` task and the files in ``data_dir/outbox/``. Leaves:
the files at the destination (C-STORE, :mod:`~daemon.dispatch.destinations.dicom`, or STOW-RS,
:mod:`~daemon.dispatch.destinations.dicomweb`), the outcome record marked delivered, and the dispatch queue's
entries (``data_dir/dispatch/``); after the last retry the files go to ``data_dir/dead-letter/`` with the reason.
"""
