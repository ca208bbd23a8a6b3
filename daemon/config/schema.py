"""What a valid configuration is: the pydantic models, and :func:`load_config`, the one way a file becomes one.

Enters: the YAML file's path (or the file's data, or a config built in Python). Leaves: :class:`Config`, read by
every stage, or :class:`~daemon.config.issues.ConfigError` listing *every* problem with its file, line and field,
so radiology IT fixes them all in one edit rather than one per restart.

:func:`load_config` ties the steps together, each in its own module: :mod:`~daemon.config.yaml_lines` reads the
YAML and the line of every key; the models here validate the data (paths resolved by :mod:`~daemon.config.values`
against the file's folder); :mod:`~daemon.config.messages` words pydantic's errors at the file's own locations;
:mod:`~daemon.config.cross_checks` relates the sections on the plain data, so those problems come in the same
report as the structural ones; :mod:`~daemon.config.issues` writes each as ``FILE:LINE: FIELD: message``.
``load_config`` lives here, beside the models, because ``from daemon.config.schema import load_config`` is the
contract every caller uses (``docs/interfaces.md``), and a module of its own would import the models that
re-export it: a circle.

This module stays light to import (no torch): the CLI's ``config check`` and the listener load it.
Model cards are read as plain JSON by :mod:`daemon.config.cards`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

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

from daemon.config.cards import ensemble_unavailable
from daemon.config.cross_checks import cross_check
from daemon.config.issues import ConfigError, ConfigIssue, format_loc
from daemon.config.messages import explain
from daemon.config.values import BUILTIN_PREFIX, as_list, builtin_weights_dir, resolve_path
from daemon.config.yaml_lines import read_yaml

# ConfigError and ConfigIssue (issues.py), BUILTIN_PREFIX and builtin_weights_dir (values.py) are re-exported:
# callers import the configuration's names from here.
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


# --------------------------------------------------------------------------- paths


def default_config_path() -> Path:
    """The configuration embedded in the package (identical to the repository's config/bonebridge.yaml)."""
    return Path(__file__).resolve().parent / "defaults" / "bonebridge.yaml"


def _resolve_path(value: Any, info: ValidationInfo, *, allow_builtin: bool) -> Any:
    """:func:`~daemon.config.values.resolve_path` against the config file's folder, which :func:`load_config`
    passes in the validation context (``base_dir``); a config built in Python without it keeps paths as given."""
    return resolve_path(value, (info.context or {}).get("base_dir"), allow_builtin=allow_builtin)


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
        return [] if value is None else as_list(value)


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
    #: Every member is named in the SR's provenance. For **anatomy** the members form a cascade instead: the first
    #: checkpoint (``weights``, then the list in order) whose OOD score finds the study in its distribution answers,
    #: and a fallback overrules a tag only toward a part no route runs a model on
    #: (``models/inference/anatomy_cascade.py``).
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
        return as_list(value)

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
        return [] if value is None else as_list(value)

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
            problems = cross_check(self.model_dump(mode="python"))
            if problems:
                raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in problems))
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


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` listing every problem with its line."""
    path = Path(path).expanduser()
    file = str(path)
    data, located = read_yaml(path)  # raises ConfigError when there is no mapping to check
    issues: list[ConfigIssue] = located.duplicate_issues(file)

    config: Config | None = None
    try:
        config = Config.model_validate(
            data, context={"base_dir": path.resolve().parent, "skip_cross_checks": True}
        )
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc, message = explain(error, Config, DESTINATION_TYPES)
            issues.append(ConfigIssue(file, located.line_of(loc), format_loc(loc), message))

    for loc, msg in cross_check(data, path.resolve().parent):
        issues.append(ConfigIssue(file, located.line_of(loc), format_loc(loc), msg))

    if issues or config is None:
        issues.sort(key=lambda i: (i.line if i.line is not None else 0))
        raise ConfigError(issues)
    return config
