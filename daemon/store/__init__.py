"""The data directory: where every stage keeps what it hands to the next.

:mod:`~daemon.store.layout` names every path under ``storage.data_dir``; :mod:`~daemon.store.atomic` writes JSON
atomically (write, fsync, rename, fsync the directory); :mod:`~daemon.store.outcome_record` is the outcome record
``results/<study>/<generation>.json`` as a typed model (its fields, ``read`` and ``write``) and
:mod:`~daemon.store.outcomes` updates those records under a lock; :mod:`~daemon.store.revisions` keeps an instance
re-sent with other content beside the first.
"""
