"""The outcome record as a typed model: one file ``data_dir/results/<study>/<generation>.json`` per study generation.

What enters: the JSON a worker, the dispatch stage or ``bonebridge retry`` wrote, today's or an older version's. What
leaves: an :class:`OutcomeRecord` whose fields are checked (a status outside :data:`STATUSES`, a destination state
that is not text, a generation that is not a number are refused), and, on :meth:`OutcomeRecord.write`, the same JSON
keys and values the code wrote when records were plain dicts, so the status page, the metrics, the tests and any
site script reading these files see no difference.

Why a model and not a dict: four processes read or update one record (the analysis worker writes it, each dispatch
task and ``bonebridge retry`` update it, the assembler, the metrics and the status page read it). With a dict, a
misspelt key or a status nobody else knows is written silently and only shows up as a study the page never calls
delivered. Here the field list is the contract (issue 26: contracts in one place).

Compatibility rules, so that nothing a site already has on disk is rejected or lost:

- keys this module does not know are kept as they were (``extra="allow"``) and written back;
- a key is written when it was in the file, was assigned, or no longer holds its default (a ``destinations`` dict
  filled in place counts): a field nobody set is not written as ``null``, and :meth:`OutcomeRecord.forget` removes
  a key (as ``dict.pop`` did);
- a record that does not name its study or its generation (hand-written, or a test's) takes them from its path,
  and is written back with them.

A file that is not JSON, or not an outcome record, raises :class:`OutcomeRecordError`, a :class:`ValueError`, so
every reader that skipped a corrupt record on ``ValueError`` still does; a missing file still raises
:class:`FileNotFoundError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from daemon.store.atomic import write_json_atomic
from daemon.store.layout import DataDir

__all__ = [
    "DELIVERED_STATUSES",
    "OutcomeRecord",
    "OutcomeRecordError",
    "READY_TO_SEND",
    "RETRYING",
    "SENT",
    "STATUSES",
    "STATUS_IF_DELIVERED",
    "Status",
    "WAITING",
]

#: ``status``: the worker's decision. ``ready-to-send`` while the dispatch stage still has destinations to serve;
#: ``sent`` and ``not-processed`` (a report saying why no model ran) once every destination has the results;
#: ``dead-lettered`` when one of them went to the dead-letter folder; ``failed`` when the analysis failed for good
#: (it stays failed even once its not-processed report is delivered).
Status = Literal["ready-to-send", "sent", "not-processed", "dead-lettered", "failed"]
STATUSES: tuple[str, ...] = get_args(Status)
#: What a record becomes once delivered (kept in ``status_if_delivered`` while it is ready-to-send or dead-lettered).
DeliveredStatus = Literal["sent", "not-processed"]
DELIVERED_STATUSES: tuple[str, ...] = get_args(DeliveredStatus)

#: Where a dead-lettered record keeps the status it would have had if delivered ("sent", "not-processed").
STATUS_IF_DELIVERED = "status_if_delivered"
#: The status of a record whose analysis is done and whose results wait for the dispatch stage.
READY_TO_SEND = "ready-to-send"
#: ``destinations[name]`` while the dispatch stage has not finished with that destination; ``dead-lettered: <entry>``
#: once it gave up on it.
WAITING, RETRYING, SENT = "waiting", "retrying", "sent"


class OutcomeRecordError(ValueError):
    """A results file that cannot be read as an outcome record (not JSON, not an object, a field of the wrong type),
    or a record that would not be one once written. A ValueError, as ``json.JSONDecodeError`` was."""


class _OnDisk(BaseModel):
    """Writes back exactly the keys a record has: those read, those assigned, those changed in place."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    @model_serializer(mode="wrap")
    def _keys_it_has(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        return {key: value for key, value in data.items()
                if key not in fields or key in self.model_fields_set
                or getattr(self, key) != fields[key].get_default(call_default_factory=True)}

    def forget(self, name: str) -> Any:
        """Remove the key ``name`` from the record (``dict.pop``): returns its value, None when it had none."""
        fields = type(self).model_fields
        if name not in fields:
            return (self.__pydantic_extra__ or {}).pop(name, None)
        if fields[name].is_required():
            raise ValueError(f"{name} is in every {type(self).__name__}: it cannot be removed")
        value = getattr(self, name) if name in self.model_fields_set else None
        setattr(self, name, fields[name].get_default(call_default_factory=True))
        self.model_fields_set.discard(name)
        return value


class Delivery(_OnDisk):
    """``delivery[destination]``: the dispatch stage's last try for one destination (``record_dispatch``)."""

    attempts: int | None = None
    last_error: str | None = None
    #: epoch seconds
    next_try_at: float | None = None
    #: epoch seconds (the top-level ``delivered_at`` is ISO 8601 text)
    delivered_at: float | None = None
    #: the dead-letter entry the results went to
    entry: str | None = None


class Redelivery(_OnDisk):
    """``redelivered[destination]``: a dead-lettered result that ``bonebridge retry`` delivered later."""

    entry: str
    #: ISO 8601, UTC
    delivered_at: str
    #: every try in all: the dispatch task's, the failed replays and this one
    attempts: int
    #: who delivered it: "bonebridge retry"
    by: str


class OutcomeRecord(_OnDisk):
    """One study generation's outcome: what the worker decided, what it made and where each result went.

    Declared in the order the worker fills it, which is the order of the keys on disk (unknown keys last). Only ``study_uid``, ``generation`` and ``status`` are in every record;
    the rest depends on how far the study got (a study without instances has a reason and nothing else).
    """

    study_uid: str
    generation: int
    #: the route the study took (absent from a failed study's record)
    route: str | None = None
    #: the analysis' JSON-ready findings, as ``bonebridge predict`` prints them (anatomy, findings, models, ...)
    summary: dict[str, Any] | None = None
    status: Status
    #: destination name -> ``waiting``, ``retrying``, ``sent`` or ``dead-lettered: <entry>``
    destinations: dict[str, str] = Field(default_factory=dict)
    #: why it was not processed or why it failed
    reason: str | None = None
    #: how many times the analysis ran before it failed for good (failed records only)
    attempts: int | None = None
    #: the report's (StudyInstanceUID, SeriesInstanceUID, SOPClassUID, SOPInstanceUID): a later generation's report
    #: names it as its predecessor
    sr: list[str] | None = Field(default=None, min_length=4, max_length=4)
    #: the result files, relative to the data directory (``outbox/<study>/<generation>/<sop>.dcm``)
    outputs: list[str] = Field(default_factory=list)
    #: the name of the delivery in logs and the dead-letter folder
    label: str | None = None
    #: when the results were ready to send (epoch seconds)
    ready_at: float | None = None
    #: while ready-to-send or dead-lettered: the status it takes once every destination has the results
    status_if_delivered: DeliveredStatus | None = None
    #: analysis time, seconds
    seconds: float | None = None
    #: epoch seconds at each stage's end: started_at, analysed_at, finished_at (results ready), dispatched_at
    timing: dict[str, float] = Field(default_factory=dict)
    #: destination name -> the dispatch stage's last try
    delivery: dict[str, Delivery] = Field(default_factory=dict)
    #: when the last destination got the results (ISO 8601, UTC)
    delivered_at: str | None = None
    #: destination name -> a late delivery by ``bonebridge retry``
    redelivered: dict[str, Redelivery] = Field(default_factory=dict)

    # -- where it lives -------------------------------------------------------------------------------------------
    @staticmethod
    def path(data_dir: str | Path, study_uid: str, generation: int) -> Path:
        """``data_dir/results/<study>/<generation>.json`` (:meth:`daemon.store.layout.DataDir.outcome_record`)."""
        return DataDir(data_dir).outcome_record(study_uid, generation)

    # -- reading and writing --------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str | Path | None = None) -> "OutcomeRecord":
        """Check ``data`` (a record's JSON object); ``where`` names it in the error."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise OutcomeRecordError(f"{where or 'outcome record'}: not an outcome record: {exc}") from exc

    @classmethod
    def read(cls, path: str | Path) -> "OutcomeRecord":
        """The record at ``path``. FileNotFoundError (an OSError) when there is none, :class:`OutcomeRecordError`
        (a ValueError) when the file is not JSON or not an outcome record."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise OutcomeRecordError(f"{path}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise OutcomeRecordError(f"{path}: not an outcome record: a JSON {type(data).__name__}, not an object")
        # The file's place names its study and generation: records written by hand or by tests may leave them out.
        data.setdefault("study_uid", path.parent.name)
        if "generation" not in data and path.stem.isdigit():
            data["generation"] = int(path.stem)
        return cls.from_json(data, path)

    def to_json(self) -> dict[str, Any]:
        """The JSON object on disk: the keys the record has, values as the worker put them (``summary`` as is)."""
        return self.model_dump()

    def write(self, path: str | Path) -> "OutcomeRecord":
        """Check the record again (a field filled in place skipped the check on assignment), then write it
        atomically (:func:`daemon.store.atomic.write_json_atomic`: fsync the file, rename, fsync the folder), as
        other processes read it at any moment. Returns the record as written."""
        # no serializer warning for a wrong value filled in place: the check right after refuses it with its field
        checked = type(self).from_json(self.model_dump(warnings=False), Path(path))
        # indent 2 and default=str: what the worker always wrote (str turns a numpy number in ``summary`` into text)
        write_json_atomic(Path(path), checked.to_json(), indent=2, default=str)
        return checked

    # -- what the stages ask of it --------------------------------------------------------------------------------
    def undelivered(self) -> list[str]:
        """The destinations the dispatch stage has not finished with (waiting or retrying)."""
        return [name for name, value in self.destinations.items() if value in (WAITING, RETRYING)]

    def take_status_if_delivered(self, default: DeliveredStatus = "sent") -> DeliveredStatus:
        """The status the record takes now that it is delivered, removed from the record (it has no use after)."""
        return self.forget(STATUS_IF_DELIVERED) or default
