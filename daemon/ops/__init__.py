"""Operations: what runs beside the stages. Log formatting, Prometheus metrics, the read-only status page, child
processes that die with their parent, the OpenMP thread policy and the demo PACS.

Enters: the data directory (read only) and the configuration. Leaves: log lines, ``/metrics``, the status page.
"""
