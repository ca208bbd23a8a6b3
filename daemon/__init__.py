"""BoneBridge's daemon: DICOM in, analysis, DICOM results out. One sub-package per stage, in the order data flows.

1. :mod:`daemon.receive`   C-STORE from modalities and the PACS -> instances durable in ``data_dir/incoming/``
2. :mod:`daemon.assemble`  spooled instances -> complete studies (``data_dir/studies/<study>.json``)
3. :mod:`daemon.queue`     a complete study -> one Celery task, run by a worker process
4. :mod:`daemon.analyse`   a study's instances -> anatomy, route and the routed models' findings
5. :mod:`daemon.output`    findings -> the TID 1500 SR and the heatmap Secondary Captures (``data_dir/outbox/``)
6. :mod:`daemon.dispatch`  result files -> the configured destinations (C-STORE or STOW-RS), else dead-letter

Beside the stages: :mod:`daemon.store` (the data directory's layout, atomic writes, outcome records),
:mod:`daemon.config` (the YAML configuration), :mod:`daemon.dicom` (DICOM reading shared by analyse and
output, DICOM TLS), :mod:`daemon.ops` (logging, metrics, status page, child processes, demo PACS).
:mod:`daemon.serve` wires the stages into processes (``serve``, ``listen``, ``worker``); :mod:`daemon.cli` is
the command line. ``docs/architecture.md`` is the five-minute tour.
"""
