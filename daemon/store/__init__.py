"""The data directory: where every stage keeps what it hands to the next.

:mod:`~daemon.store.layout` names every path under ``storage.data_dir``; :mod:`~daemon.store.atomic` writes JSON
atomically (write, fsync, rename, fsync the directory); :mod:`~daemon.store.outcomes` reads and updates the
outcome records ``results/<study>/<generation>.json``; :mod:`~daemon.store.revisions` keeps an instance re-sent
with other content beside the first.
"""
