"""BoneBridge configuration: one YAML file, validated before anything starts.

Radiology IT edits this file by hand, so every mistake must be reported the way a compiler reports
one: the file, the line, the field and what is wrong, and *all* of them at once rather than one per
restart. To get line numbers the YAML is composed into nodes first (``yaml.SafeLoader``, never the
full loader: a config file must not be able to build Python objects), the node tree gives a line for
every key and list item, and every pydantic error is mapped back to the deepest node its location
reaches.

Checks that span sections (a route naming an unknown model or destination, duplicate route names,
anatomy labels the sorter cannot produce) run on the plain data, so they are reported together with
the structural errors instead of only after those are fixed.

This module stays light to import (no torch): the CLI's ``config check`` and the listener load it.
Model cards are read as plain JSON by :mod:`daemon.config.cards`.
"""

from __future__ import annotations

import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daemon.dicom.anatomy_tags import ANATOMY_CLASSES
from daemon.config.cards import anatomy_model_classes, ensemble_unavailable

__all__ = [
    "AnatomyConfig",
    "AssemblyConfig",
    "BUILTIN_PREFIX",
    "Caller",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "AnyDestination",
    "BasicAuth",
    "DESTINATION_TYPES",
    "Destination",
    "DestinationAuth",
    "DicomDestination",
    "DicomWebDestination",
    "ListenerConfig",
    "ModelRef",
    "QueueConfig",
    "Range",
    "Route",
    "StorageConfig",
    "When",
    "builtin_weights_dir",
    "default_config_path",
    "load_config",
]

#: ``weights: "builtin:NAME"`` names a file shipped inside the package (models/weights/NAME).
BUILTIN_PREFIX = "builtin:"

Loc = tuple[str | int, ...]


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(Exception):
    """Raised by :func:`load_config`; carries every issue found, not just the first."""

    def __init__(self, errors: list[ConfigIssue]) -> None:
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.errors)


# --------------------------------------------------------------------------- paths


def default_config_path() -> Path:
    """The configuration embedded in the package (identical to the repository's config/bonebridge.yaml)."""
    return Path(__file__).resolve().parent / "defaults" / "bonebridge.yaml"


def builtin_weights_dir() -> Path:
    """The installed ``models/weights`` folder, found without importing ``models`` (which may pull torch)."""
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve() / "weights"
    # Source checkout without an install: models/ sits next to daemon/.
    return Path(__file__).resolve().parent.parent / "models" / "weights"


def _resolve_path(value: Any, info: ValidationInfo, *, allow_builtin: bool) -> Any:
    """Expand ``~``, resolve ``builtin:`` and make relative paths relative to the config file's folder.

    Why here and not at use: the daemon changes working directory under systemd, and a path that meant
    one thing in ``config check`` must mean the same thing in the running daemon.
    """
    if value is None:
        return None
    if isinstance(value, str) and allow_builtin and value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :].strip()
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(
                f"'{value}' must name a single file in the package's models/weights folder, "
                f"e.g. '{BUILTIN_PREFIX}boneage-sex.pt'"
            )
        return builtin_weights_dir() / name
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        return path
    return value  # let pydantic report the wrong type


def _as_list(value: Any) -> Any:
    """Accept ``anatomy: hand`` as shorthand for ``anatomy: [hand]``."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value


def _check_ae_title(value: str) -> str:
    """DICOM AE titles: 1 to 16 characters, no backslash or control characters (PS3.5 AE VR)."""
    title = value.strip()
    if not title:
        raise ValueError("AE title must not be empty")
    if len(title) > 16:
        raise ValueError(f"AE title '{title}' is longer than 16 characters")
    if "\\" in title or any(ord(c) < 32 for c in title):
        raise ValueError(f"AE title '{title}' contains a backslash or control character")
    return title


# --------------------------------------------------------------------------- models


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Caller(_Strict):
    """A modality or PACS allowed to send to us; ``host: null`` accepts the AE title from any address."""

    ae_title: str
    host: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


def _tls_files_exist(section: Any, names: tuple[str, ...] = ("certificate", "private_key", "ca_certificates")) -> None:
    """Every TLS file a section names must be readable now, not at the first association."""
    for name in names:
        path = getattr(section, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name}: {path} is not a readable file")


class _TlsFiles(_Strict):
    """What both TLS sections share: certificate, key and CA paths resolved like every other path of the config."""

    @field_validator("certificate", "private_key", "ca_certificates", mode="before", check_fields=False)
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _resolve_path(value, info, allow_builtin=False)


class ListenerTls(_TlsFiles):
    """DICOM TLS on the listener: our certificate and key (PEM); callers' certificates checked when required."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _files_exist(self) -> "ListenerTls":
        _tls_files_exist(self)
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to check callers' certificates against")
        return self


class DestinationTls(_TlsFiles):
    """DICOM TLS to a destination: the CA that signed the PACS's certificate; ours when the PACS asks for one."""

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    server_hostname: str | None = None  # verify the PACS's certificate names this host

    @model_validator(mode="after")
    def _pair(self) -> "DestinationTls":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both certificate and private_key for a client certificate, or neither")
        _tls_files_exist(self)
        return self


class ListenerConfig(_Strict):
    ae_title: str = "BONEBRIDGE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_callers: list[Caller] = Field(default_factory=list)
    max_pdu: int = Field(0, ge=0)  # 0 = unlimited
    network_timeout_s: float = Field(60.0, gt=0)
    tls: ListenerTls | None = None  # DICOM TLS; null = plain TCP

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class StorageConfig(_Strict):
    data_dir: Path = Path("./var")
    # Below this much free space on data_dir's filesystem new instances are refused (0xA700) before anything is
    # written, so results, state files and the instances already acknowledged still have room; 0 switches it off.
    min_free_mb: int = Field(512, ge=0)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_path(value, info, allow_builtin=False)


class AssemblyConfig(_Strict):
    quiet_period_s: float = Field(3.0, ge=0)


class QueueConfig(_Strict):
    visibility_timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(5.0, ge=0)
    #: Where the "not processed" report of a study that failed for good goes when no route matches its DICOM
    #: tags (it failed before it could be routed on its image); routes' own send_to otherwise.
    send_failures_to: list[str] = Field(default_factory=list)

    @field_validator("send_failures_to", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [] if value is None else _as_list(value)


class _Delivery(_Strict):
    """What every destination type shares: how often the dispatch stage retries it, and how long it waits.

    ``retries`` is the one place the retry limit comes from (the ``dispatch`` task reads it); the wait before retry
    ``i`` is ``backoff_s * 2**i`` seconds, capped at a minute, with jitter (``daemon.dispatch.dispatcher.retry_countdown``).
    """

    retries: int = Field(5, ge=0)
    backoff_s: float = Field(2.0, ge=0)


class DicomDestination(_Delivery):
    """``type: dicom`` (the default): C-STORE SCU to a PACS, DICOM TLS optional."""

    type: Literal["dicom"] = "dicom"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae: str = "BONEBRIDGE"
    tls: DestinationTls | None = None  # DICOM TLS to this destination; null = plain TCP

    @field_validator("ae_title", "calling_ae")
    @classmethod
    def _ae_titles(cls, value: str) -> str:
        return _check_ae_title(value)

    def describe(self) -> str:
        """Where it sends, in words (no secret: a DICOM destination has none)."""
        return f"{self.ae_title} at {self.host}:{self.port}" + (" (DICOM TLS)" if self.tls else "")


#: The DICOM destination keeps its old name: code and tests written before destination types say ``Destination``.
Destination = DicomDestination


def _readable_file(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise ValueError(f"{what}: {path} is not a readable file")
    return path


class BasicAuth(_Strict):
    """HTTP basic authentication; the password is read from a file at each delivery, never from the config."""

    user: str = Field(min_length=1)
    password_file: Path

    @field_validator("password_file", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_path(value, info, allow_builtin=False)

    @field_validator("password_file")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        return _readable_file(value, "password_file")


class DestinationAuth(_Strict):
    """``{basic: {user, password_file}}`` or ``{bearer_token_file: PATH}``: exactly one. Secrets live in files
    (mode 0600, owned by the daemon's user), so the config can be shown, checked in and logged."""

    basic: BasicAuth | None = None
    bearer_token_file: Path | None = None

    @field_validator("bearer_token_file", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _resolve_path(value, info, allow_builtin=False)

    @model_validator(mode="after")
    def _one(self) -> "DestinationAuth":
        if (self.basic is None) == (self.bearer_token_file is None):
            raise ValueError("give exactly one of basic: {user, password_file} or bearer_token_file")
        if self.bearer_token_file is not None:
            _readable_file(self.bearer_token_file, "bearer_token_file")
        return self

    def kind(self) -> str:
        return "basic auth" if self.basic is not None else "bearer token"


class DicomWebDestination(_Delivery):
    """``type: dicomweb``: STOW-RS to ``url`` (the DICOMweb service root, e.g. ``https://pacs/dicom-web``)."""

    type: Literal["dicomweb"]
    url: str
    auth: DestinationAuth | None = None
    ca_certificates: Path | None = None  # HTTPS: the CA bundle that signed the server's certificate
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"'{value}' is not an http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("the URL must not carry credentials: use auth: {basic: {user, password_file}}")
        if parts.query or parts.fragment:
            raise ValueError("the URL is the DICOMweb service root: no query string or fragment")
        return value.rstrip("/")

    @field_validator("ca_certificates", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _resolve_path(value, info, allow_builtin=False)

    @field_validator("ca_certificates")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        return None if value is None else _readable_file(value, "ca_certificates")

    def describe(self) -> str:
        """Where it sends, in words: the URL and the kind of authentication, never a secret or its file."""
        return f"STOW-RS to {self.url}" + (f" ({self.auth.kind()})" if self.auth else "")


#: Destination types by their ``type:`` value; a destination without ``type`` is ``dicom``.
DESTINATION_TYPES: dict[str, type[_Delivery]] = {"dicom": DicomDestination, "dicomweb": DicomWebDestination}


def _destination_type(value: Any) -> str:
    kind = value.get("type", "dicom") if isinstance(value, dict) else getattr(value, "type", "dicom")
    return kind if isinstance(kind, str) else repr(kind)


AnyDestination = Annotated[
    Union[Annotated[DicomDestination, Tag("dicom")], Annotated[DicomWebDestination, Tag("dicomweb")]],
    Discriminator(_destination_type),
]


class ModelRef(_Strict):
    """A model the routes can run. ``weights: null`` keeps the entry but disables routes that need it."""

    weights: Path | None = None
    task: str | None = None  # defaults to the model's key in ``models``
    #: An output ensemble: more checkpoints of the same task whose outputs are averaged with those of ``weights``
    #: (bone age in months, p(male), the fracture probability). ``weights`` stays the model that draws the
    #: heatmap and reads the side, so the ensemble costs each extra member one forward pass without Grad-CAM.
    #: Every member is named in the SR's provenance.
    ensemble: list[Path] = Field(default_factory=list)

    @field_validator("weights", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_path(value, info, allow_builtin=True)

    @field_validator("ensemble", mode="before")
    @classmethod
    def _resolve_members(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("ensemble is a list of weights files, e.g. ['builtin:boneage-sex.pt']")
        return [_resolve_path(item, info, allow_builtin=True) for item in value]

    def all_weights(self) -> list[Path]:
        """``weights`` then the ensemble's members: every checkpoint this model runs."""
        return ([self.weights] if self.weights is not None else []) + list(self.ensemble)


class AnatomyConfig(_Strict):
    model: str | None = "anatomy"  # key in ``models``; null = anatomy from DICOM tags only
    min_probability: float = Field(0.5, ge=0, le=1)


class Range(_Strict):
    """Inclusive bounds; either may be omitted."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is greater than max {self.max:g}")
        return self


class When(_Strict):
    """Conditions of a route; every condition given must hold. An empty ``when`` matches every study."""

    anatomy: list[str] | None = None
    patient_age_years: Range | None = None
    modality: list[str] | None = None
    calling_ae: list[str] | None = None
    study_description: list[str] | None = None  # case-insensitive substrings
    body_part_examined: list[str] | None = None
    patient_sex: list[str] | None = None

    @field_validator(
        "anatomy", "modality", "calling_ae", "study_description", "body_part_examined", "patient_sex",
        mode="before",
    )
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator(
        "anatomy", "modality", "calling_ae", "study_description", "body_part_examined", "patient_sex"
    )
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [v.strip() for v in value]
        if not cleaned or any(not v for v in cleaned):
            raise ValueError("list must not be empty and must not contain empty strings")
        return cleaned


class Route(_Strict):
    name: str = Field(min_length=1)
    when: When = Field(default_factory=When)
    run: list[str] = Field(default_factory=list)
    report: Literal["findings", "not-processed"] = "findings"
    send_to: list[str] = Field(min_length=1)
    quiet_period_s: float | None = Field(None, ge=0)

    @field_validator("run", "send_to", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [] if value is None else _as_list(value)

    @field_validator("when", mode="before")
    @classmethod
    def _empty_when(cls, value: Any) -> Any:
        """A bare ``when:`` (YAML null) means no conditions, like ``when: {}``."""
        return {} if value is None else value


class MetricsConfig(_Strict):
    """Prometheus exposition of the daemon's counters; ``port: 0`` turns it off."""

    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)


class StatusConfig(_Strict):
    """The read-only status web page (studies, routes, models, dead letters); ``port: 0`` turns it off."""

    host: str = "127.0.0.1"
    port: int = Field(default=9109, ge=0, le=65535)


class Config(_Strict):
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    broker: str = "embedded"
    queue: QueueConfig = Field(default_factory=QueueConfig)
    destinations: dict[str, AnyDestination]
    models: dict[str, ModelRef] = Field(default_factory=dict)
    anatomy: AnatomyConfig = Field(default_factory=AnatomyConfig)
    routes: list[Route] = Field(min_length=1)

    @field_validator("models", mode="before")
    @classmethod
    def _no_models(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        value = value.strip()
        if value == "embedded" or value.startswith(("redis://", "rediss://", "unix://")):
            return value
        raise ValueError(
            f"'{value}' is neither 'embedded' nor a Redis URL (redis://host:port/db, rediss://..., unix://...)"
        )

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Config:
        for name, ref in self.models.items():
            if ref.task is None:
                ref.task = name
        # load_config runs the same checks on the raw YAML to attach line numbers; here they guard
        # configs built in Python.
        if not (info.context or {}).get("skip_cross_checks"):
            problems = _cross_check(self.model_dump(mode="python"))
            if problems:
                raise ValueError("; ".join(f"{_format_loc(loc)}: {msg}" for loc, msg in problems))
        return self

    def model_status(self) -> dict[str, str | None]:
        """Model name -> None when its weights and trained card are in place, else why not."""
        return {name: ensemble_unavailable(name, ref.weights, ref.ensemble) for name, ref in self.models.items()}

    def route_status(self) -> dict[str, str | None]:
        """Route name -> None when it can run, else the reason it cannot (read from disk each call).

        A disabled route still matches studies; the worker then sends a "not processed" report with
        this reason, so the PACS user learns why no result came instead of waiting for one.
        """
        model_reasons = self.model_status()
        status: dict[str, str | None] = {}
        for route in self.routes:
            reasons = []
            for model in route.run:
                if model not in self.models:
                    reasons.append(f"model '{model}' is not configured")
                elif model_reasons[model] is not None:
                    reasons.append(model_reasons[model])
            status[route.name] = "; ".join(dict.fromkeys(reasons)) or None
        return status


# --------------------------------------------------------------------------- cross checks


def _cross_check(data: Any, base_dir: Path | None = None) -> list[tuple[Loc, str]]:
    """Checks that relate sections to each other, run on plain data so they work on broken files too."""
    if not isinstance(data, dict):
        return []
    problems: list[tuple[Loc, str]] = []
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    destinations = data.get("destinations") if isinstance(data.get("destinations"), dict) else {}

    anatomy = data.get("anatomy")
    anatomy_model = anatomy.get("model", "anatomy") if isinstance(anatomy, dict) else "anatomy"
    if isinstance(anatomy_model, str) and anatomy_model not in models:
        where: Loc = ("anatomy", "model") if isinstance(anatomy, dict) and "model" in anatomy else ("anatomy",)
        problems.append(
            (where, f"anatomy model '{anatomy_model}' is not in models{_known(models)}; "
                    "write 'model: null' to sort by DICOM tags only")
        )

    model_classes = None
    anatomy_ref = models.get(anatomy_model) if isinstance(anatomy_model, str) else None
    if isinstance(anatomy_ref, dict) and isinstance(anatomy_ref.get("weights"), (str, Path)):
        try:
            weights = _resolve_path(anatomy_ref["weights"], _Context(base_dir), allow_builtin=True)
        except ValueError:
            weights = None
        model_classes = anatomy_model_classes(weights)
        unknown = [c for c in model_classes or [] if c not in ANATOMY_CLASSES]
        if unknown:
            problems.append(((("models", anatomy_model, "weights")),
                             f"the anatomy model's classes {unknown} are not anatomy names ({', '.join(ANATOMY_CLASSES)})"))

    queue = data.get("queue")
    failures = _as_list(queue.get("send_failures_to") or []) if isinstance(queue, dict) else []
    if isinstance(failures, list):
        for j, dest in enumerate(failures):
            if isinstance(dest, str) and dest not in destinations:
                problems.append((("queue", "send_failures_to", j), f"unknown destination '{dest}'{_known(destinations)}"))

    routes = data.get("routes")
    if not isinstance(routes, list):
        return problems
    first_seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in first_seen:
                problems.append(
                    (("routes", i, "name"), f"duplicate route name '{name}' (also routes[{first_seen[name]}])")
                )
            else:
                first_seen[name] = i
        run = _as_list(route.get("run") or [])
        if isinstance(run, list):
            for j, model in enumerate(run):
                if isinstance(model, str) and model not in models:
                    problems.append(
                        (("routes", i, "run", j), f"unknown model '{model}'{_known(models)}")
                    )
        send_to = _as_list(route.get("send_to") or [])
        if isinstance(send_to, list):
            for j, dest in enumerate(send_to):
                if isinstance(dest, str) and dest not in destinations:
                    problems.append(
                        (("routes", i, "send_to", j), f"unknown destination '{dest}'{_known(destinations)}")
                    )
        if route.get("report", "findings") == "findings" and run == []:
            problems.append(
                (("routes", i, "run") if "run" in route else ("routes", i),
                 "report is 'findings' but run names no model; add a model or set 'report: not-processed'")
            )
        when = route.get("when")
        if isinstance(when, dict):
            labels = _as_list(when.get("anatomy"))
            if isinstance(labels, list):
                for j, label in enumerate(labels):
                    if isinstance(label, str) and label.strip().lower() not in ANATOMY_CLASSES:
                        problems.append((("routes", i, "when", "anatomy", j), _unknown_anatomy(label, model_classes)))
    return problems


def _unknown_anatomy(label: str, model_classes: list[str] | None) -> str:
    """Why a route's anatomy name can never match, with what the model and the tags can say instead."""
    hint = difflib.get_close_matches(label.strip().lower(), ANATOMY_CLASSES, n=1)
    message = f"anatomy '{label}' is not an anatomy name"
    if hint:
        message += f"; did you mean '{hint[0]}'?"
    if model_classes:
        message += f" The anatomy model's classes: {', '.join(model_classes)};"
    return message + f" the DICOM tags give: {', '.join(ANATOMY_CLASSES)}"


class _Context:
    """The slice of pydantic's ValidationInfo that :func:`_resolve_path` reads, for checks on plain data."""

    def __init__(self, base_dir: Path | None) -> None:
        self.context = {"base_dir": base_dir} if base_dir is not None else {}


def _known(names: dict[str, Any]) -> str:
    return f" (known: {', '.join(names)})" if names else " (none are configured)"


# --------------------------------------------------------------------------- YAML with lines


class _Located:
    """Line numbers (1-based) of every key and list item, keyed by location tuple."""

    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.duplicates: list[tuple[Loc, int, int]] = []  # (loc, line, first line)

    def walk(self, node: yaml.Node, loc: Loc, loader: yaml.SafeLoader) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = loader.construct_object(key_node, deep=True)
                child = (*loc, key if isinstance(key, (str, int)) else str(key))
                line = key_node.start_mark.line + 1
                if child in self.lines:
                    self.duplicates.append((child, line, self.lines[child]))
                else:
                    self.lines[child] = line
                self.walk(value_node, child, loader)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.walk(item, (*loc, index), loader)

    def line_of(self, loc: Loc) -> int | None:
        """Line of the deepest part of ``loc`` that exists in the file (a missing field -> its parent)."""
        best = self.lines.get(())
        for depth in range(1, len(loc) + 1):
            line = self.lines.get(tuple(loc[:depth]))
            if line is None:
                break
            best = line
        return best


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _destination_loc(loc: Loc) -> tuple[Loc, str | None]:
    """pydantic puts a destination's type (the union's tag) into the location of its errors,
    ``destinations.pacs.dicom.port``: drop it, so the location is the file's own (and finds its line)."""
    if len(loc) >= 3 and loc[0] == "destinations" and loc[2] in DESTINATION_TYPES:
        return (*loc[:2], *loc[3:]), str(loc[2])
    return loc, None


def _allowed_fields(loc: Loc) -> list[str]:
    """Field names valid at ``loc`` (a model's location), by walking the annotations from Config."""
    loc, kind = _destination_loc(loc)
    if kind is not None:  # the destination's own type, then on from there
        loc = loc[2:]
        annotation: Any = DESTINATION_TYPES[kind]
        for part in loc:
            annotation = _unwrap(annotation)
            field = annotation.model_fields.get(str(part)) if isinstance(annotation, type) and issubclass(
                annotation, BaseModel) else None
            if field is None:
                return []
            annotation = field.annotation
        annotation = _unwrap(annotation)
        return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            else []
    annotation = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        else:
            origin = typing.get_origin(annotation)
            args = typing.get_args(annotation)
            if origin is list and args:
                annotation = args[0]
            elif origin is dict and len(args) == 2:
                annotation = args[1]
            else:
                return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _message(error: dict[str, Any]) -> str:
    """pydantic's message, reworded where radiology IT would otherwise have to guess."""
    kind = error.get("type", "")
    loc: Loc = tuple(error.get("loc", ()))
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if loc else []
        msg = f"unknown field '{loc[-1]}'" if loc else "unknown field"
        if hint:
            msg += f"; did you mean '{hint[0]}'?"
        elif allowed:
            msg += f" (allowed: {', '.join(allowed)})"
        return msg
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid" and loc[:1] == ("destinations",):
        tag = (error.get("ctx") or {}).get("tag", "?")
        return f"unknown destination type {tag} (known: {', '.join(DESTINATION_TYPES)})"
    msg = str(error.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = error.get("input")
    if kind not in ("value_error",) and isinstance(value, (str, int, float, bool)) and value is not None:
        msg += f" (got {value!r})"
    if kind == "string_type" and isinstance(value, bool):
        # YAML 1.1 reads yes/no/on/off as booleans; the user almost always meant the text.
        msg += "; put the value in quotes"
    return msg


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` listing every problem with its line."""
    path = Path(path).expanduser()
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(file, None, "", f"cannot read config file: {exc}")]) from exc

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(file, line, "", f"YAML syntax error: {problem}")]) from exc
    finally:
        loader.dispose()

    if node is None or data is None:
        raise ConfigError([ConfigIssue(file, 1, "", "config file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue(file, node.start_mark.line + 1, "", "config must be a mapping of sections (listener:, routes:, ...)")]
        )

    located = _Located()
    relocator = yaml.SafeLoader("")
    try:
        located.walk(node, (), relocator)
    finally:
        relocator.dispose()

    issues: list[ConfigIssue] = []
    for loc, line, first in located.duplicates:
        issues.append(
            ConfigIssue(file, line, _format_loc(loc), f"duplicate key (first at line {first}); YAML would keep only the last")
        )

    config: Config | None = None
    try:
        config = Config.model_validate(
            data, context={"base_dir": path.resolve().parent, "skip_cross_checks": True}
        )
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc, _ = _destination_loc(tuple(error.get("loc", ())))
            if error.get("type") == "union_tag_invalid" and loc[:1] == ("destinations",):
                loc = (*loc, "type")
            issues.append(ConfigIssue(file, located.line_of(loc), _format_loc(loc), _message(error)))

    for loc, msg in _cross_check(data, path.resolve().parent):
        issues.append(ConfigIssue(file, located.line_of(loc), _format_loc(loc), msg))

    if issues or config is None:
        issues.sort(key=lambda i: (i.line if i.line is not None else 0))
        raise ConfigError(issues)
    return config
