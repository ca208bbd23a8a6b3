"""The data directory's layout: every path under ``storage.data_dir`` that a stage writes and another reads.

===================================  ==========================================  ================================
path                                 written by                                  read by
===================================  ==========================================  ================================
``tmp/``                             receive (partial instances)                 receive (cleaned at start)
``incoming/<study>/<sop>.dcm``       receive (spool), fsynced and renamed        assemble, analyse
``returned/``                        receive: our own SR/SC sent back            nobody (kept for inspection)
``studies/<study>.json``             assemble (study state)                      queue, status page
``results/<study>/<gen>.json``       queue worker, dispatch (outcome records)    assemble, status page, metrics
``outbox/<study>/<gen>/*.dcm``       queue worker (SR and SC)                    dispatch, status page
``dispatch/{pending,delivered}/``    dispatch queue (per destination)            dispatch, status page, metrics
``dead-letter/``                     dispatch (after the last retry)             ``bonebridge retry``, status page
``run/``                             serve (pid files, broker URL, ready files)  status page, serve
``broker/``                          embedded Redis (socket, AOF, log)           queue
``demo-pacs/``                       ``serve --demo``'s Orthanc                  demo PACS
===================================  ==========================================  ================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataDir"]


@dataclass(frozen=True)
class DataDir:
    """The folders under one data directory (nothing is created here; each stage makes its own)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def returned(self) -> Path:
        return self.root / "returned"

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def dispatch(self) -> Path:
        return self.root / "dispatch"

    @property
    def dead_letter(self) -> Path:
        return self.root / "dead-letter"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def demo_pacs(self) -> Path:
        return self.root / "demo-pacs"

    # -- single files --------------------------------------------------------------------------
    def study_state(self, study_uid: str) -> Path:
        return self.studies / f"{study_uid}.json"

    def outcome_record(self, study_uid: str, generation: int) -> Path:
        return self.results / study_uid / f"{int(generation)}.json"

    def outbox_folder(self, study_uid: str, generation: int | str) -> Path:
        return self.outbox / study_uid / str(generation)
