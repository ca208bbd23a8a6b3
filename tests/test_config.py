"""Config loading: every error reported with its line, path resolution, route status, config check."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pydantic
import pytest

import models
from daemon.config.schema import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
)
from daemon.config.check import check_config_text
from daemon.config.values import builtin_weights_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """\
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
models:
  anatomy: {weights: null}
  abnormality: {weights: weights/abn.pt}
routes:
  - name: upper
    when: {anatomy: [wrist]}
    run: [abnormality]
    send_to: [pacs]
  - name: other
    report: not-processed
    send_to: [pacs]
"""


def write(tmp_path: Path, text: str, name: str = "bonebridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def issue_lines(error: ConfigError) -> dict[str, int | None]:
    return {issue.field: issue.line for issue in error.errors}


# --------------------------------------------------------------------------- shipped config


def test_embedded_default_is_identical_to_repository_config() -> None:
    shipped = REPO_ROOT / "config" / "bonebridge.yaml"
    assert default_config_path() == REPO_ROOT / "daemon" / "config" / "defaults" / "bonebridge.yaml"
    assert default_config_path().read_bytes() == shipped.read_bytes()


def test_shipped_config_loads_with_expected_listener_and_routes() -> None:
    config = load_config(default_config_path())
    assert (config.listener.ae_title, config.listener.host, config.listener.port) == ("BONEBRIDGE", "0.0.0.0", 11112)
    callers = {(c.ae_title, c.host) for c in config.listener.allowed_callers}
    assert callers == {("ORTHANC", "127.0.0.1"), ("STORESCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1")}
    assert config.broker == "embedded"
    assert config.destinations["pacs"].port == 4242
    assert [r.name for r in config.routes] == ["pediatric-hand", "fracture", "other"]
    # The packaged copy must not keep its data inside site-packages.
    assert config.storage.data_dir.is_absolute()
    assert not config.storage.data_dir.is_relative_to(default_config_path().parent)
    assert config.storage.data_dir == Path("~/.local/share/bonebridge").expanduser()
    assert config.models["boneage"].task == "boneage"  # task defaults to the key


def test_shipped_config_route_status() -> None:
    config = load_config(default_config_path())
    status = config.route_status()
    assert set(status) == {"pediatric-hand", "fracture", "other"}
    assert status["other"] is None
    assert status["fracture"] is None  # the shipped fracture model is trained and has its card
    weights = config.models["boneage"].weights
    assert weights is not None
    card = weights.with_suffix(".card.json")
    usable = weights.is_file() and card.is_file() and json.loads(card.read_text()).get("trained") is True
    if usable:
        assert status["pediatric-hand"] is None
    else:
        assert status["pediatric-hand"] is not None and "boneage" in status["pediatric-hand"]


def test_builtin_weights_resolve_inside_installed_models_package(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("weights/abn.pt", '"builtin:abn-v1.pt"'))
    config = load_config(path)
    expected = Path(models.__file__).resolve().parent / "weights" / "abn-v1.pt"
    assert builtin_weights_dir() == expected.parent
    assert config.models["abnormality"].weights == expected


def test_relative_paths_resolve_against_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = write(folder, MINIMAL + "storage: {data_dir: ./var}\n")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(path)
    assert config.storage.data_dir == folder.resolve() / "var"
    assert config.models["abnormality"].weights == folder.resolve() / "weights" / "abn.pt"
    assert config.models["anatomy"].weights is None


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, MINIMAL + "storage: {data_dir: ~/bb}\n"))
    assert config.storage.data_dir == tmp_path / "home" / "bb"


# --------------------------------------------------------------------------- route status


def _card(weights: Path, trained: bool) -> None:
    weights.with_suffix(".card.json").write_text(json.dumps({"task": "abnormality", "trained": trained}))


@pytest.mark.parametrize(
    ("make", "expected_words"),
    [
        (lambda w: None, "not found"),
        (lambda w: w.write_bytes(b"x"), "no model card"),
        (lambda w: (w.write_bytes(b"x"), _card(w, False)), "not trained"),
        (lambda w: (w.write_bytes(b"x"), w.with_suffix(".card.json").write_text("{oops")), "unreadable"),
        (lambda w: (w.write_bytes(b"x"), _card(w, True)), None),
    ],
    ids=["missing-weights", "missing-card", "untrained", "bad-card", "ready"],
)
def test_route_status_follows_weights_and_card(tmp_path: Path, make, expected_words: str | None) -> None:
    (tmp_path / "weights").mkdir()
    make(tmp_path / "weights" / "abn.pt")
    status = load_config(write(tmp_path, MINIMAL)).route_status()
    assert status["other"] is None
    if expected_words is None:
        assert status["upper"] is None
    else:
        assert status["upper"] is not None and expected_words in status["upper"]


def test_null_weights_disable_route(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace("weights/abn.pt", "null")))
    reason = config.route_status()["upper"]
    assert reason is not None and "no weights" in reason and "abnormality" in reason


# --------------------------------------------------------------------------- errors with lines


def test_unknown_field_is_reported_at_its_line_with_suggestion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listener:\n  ae_title: BONEBRIDGE\n  prot: 11112\n" + MINIMAL,
    )
    error = errors_of(path)
    assert len(error.errors) == 1
    issue = error.errors[0]
    assert (issue.line, issue.field) == (3, "listener.prot")
    assert "did you mean 'port'" in issue.message
    assert str(error) == f"{path}:3: listener.prot: {issue.message}"


def test_every_error_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listener:
          port: 99999
        broker: amqp://elsewhere
        destinations:
          pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: not-a-port}
        models:
          boneage: {weights: null}
        anatomy: {model: null}
        routes:
          - name: kids
            when:
              anatomy: [hand, chset]
              patient_age_years: {min: 20, max: 18}
            run: [boneage, bogus]
            send_to: [pacs, nowhere]
          - name: kids
            when: {}
            send_to: [pacs]
          - name: third
            whenn: {}
            report: findings
            send_to: [pacs]
        """,
    )
    error = errors_of(path)
    lines = issue_lines(error)
    assert lines == {
        "listener.port": 2,
        "broker": 3,
        "destinations.pacs.port": 5,
        "routes[0].when.anatomy[1]": 12,
        "routes[0].when.patient_age_years": 13,
        "routes[0].run[1]": 14,
        "routes[0].send_to[1]": 15,
        "routes[1].name": 16,  # duplicate name
        "routes[1]": 16,  # findings without a model (report: not-processed would be valid)
        "routes[2]": 19,  # findings without a model
        "routes[2].whenn": 20,
    }
    messages = {issue.field: issue.message for issue in error.errors}
    assert "did you mean 'chest'" in messages["routes[0].when.anatomy[1]"]
    assert "min 20 is greater than max 18" in messages["routes[0].when.patient_age_years"]
    assert "unknown model 'bogus'" in messages["routes[0].run[1]"]
    assert "unknown destination 'nowhere'" in messages["routes[0].send_to[1]"]
    assert "duplicate route name 'kids'" in messages["routes[1].name"]
    assert "not-processed" in messages["routes[1]"]
    # str() has one line per issue, each FILE:LINE: FIELD: message, in file order.
    printed = str(error).splitlines()
    assert len(printed) == len(error.errors)
    assert printed[0].startswith(f"{path}:2: listener.port: ")
    numbers = [int(line[len(str(path)) + 1 :].split(":", 1)[0]) for line in printed]
    assert numbers == sorted(numbers)


def test_findings_route_without_run_is_reported_at_route_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        destinations:
          pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
        anatomy: {model: null}
        routes:
          - name: empty
            run: []
            send_to: [pacs]
        """,
    )
    (issue,) = errors_of(path).errors
    assert (issue.line, issue.field) == (6, "routes[0].run")


def test_missing_required_field_points_at_parent(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        anatomy: {model: null}
        destinations:
          pacs:
            ae_title: ORTHANC
            host: 127.0.0.1
        routes:
          - {name: all, report: not-processed, send_to: [pacs]}
        """,
    )
    (issue,) = errors_of(path).errors
    assert (issue.line, issue.field, issue.message) == (3, "destinations.pacs.port", "required field is missing")


def test_unknown_anatomy_model_and_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        destinations:
          pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
        anatomy:
          model: anatomy-v2
        routes:
          - {name: all, report: not-processed, send_to: [pacs]}
        """,
    )
    (issue,) = errors_of(path).errors
    assert (issue.line, issue.field) == (4, "anatomy.model")
    assert "model: null" in issue.message


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "broker: embedded\nbroker: redis://h:6379/0\n")
    (issue,) = errors_of(path).errors
    assert issue.field == "broker" and issue.line == len(MINIMAL.splitlines()) + 2
    assert "first at line" in issue.message


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listener:\n  port: 11112\n routes: [\n")
    (issue,) = errors_of(path).errors
    assert issue.line == 3 and "YAML syntax error" in issue.message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n"])
def test_empty_or_non_mapping_file(tmp_path: Path, text: str) -> None:
    (issue,) = errors_of(write(tmp_path, text)).errors
    assert issue.line == 1


def test_missing_file(tmp_path: Path) -> None:
    (issue,) = errors_of(tmp_path / "absent.yaml").errors
    assert issue.line is None and "cannot read" in issue.message


def test_bad_builtin_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("weights/abn.pt", '"builtin:../escape.pt"'))
    (issue,) = errors_of(path).errors
    assert (issue.line, issue.field) == (5, "models.abnormality.weights")


def test_yaml_cannot_build_python_objects(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "broker: !!python/object/apply:os.system ['echo hi']\n")
    (issue,) = errors_of(path).errors
    assert "YAML" in issue.message


def test_python_built_config_runs_cross_checks() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown model 'nope'"):
        Config.model_validate(
            {
                "destinations": {"pacs": {"ae_title": "PACS", "host": "h", "port": 104}},
                "anatomy": {"model": None},
                "routes": [{"name": "r", "run": ["nope"], "send_to": ["pacs"]}],
            }
        )


def test_scalar_shorthand_for_lists(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace("[wrist]", "wrist")))
    assert config.routes[0].when.anatomy == ["wrist"]


# --------------------------------------------------------------------------- config check text


def test_check_config_text_summary_lists_routes_with_status() -> None:
    ok, text = check_config_text(default_config_path())
    assert ok
    assert "BONEBRIDGE on 0.0.0.0:11112" in text
    assert "pacs: ORTHANC at 127.0.0.1:4242" in text
    config = load_config(default_config_path())
    for name, reason in config.route_status().items():
        line = next(l for l in text.splitlines() if f". {name}: " in l)
        assert ("enabled" in line) if reason is None else (f"DISABLED: {reason}" in line)


def test_check_config_text_lists_errors(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("run: [abnormality]", "run: [abnormaly]"))
    ok, text = check_config_text(path)
    assert not ok
    assert f"{path}:9: routes[0].run[0]: unknown model 'abnormaly'" in text


def test_bare_when_and_yaml_booleans(tmp_path: Path) -> None:
    ok = write(tmp_path, MINIMAL.replace("    when: {anatomy: [wrist]}\n", "    when:\n"))
    assert load_config(ok).routes[0].when.anatomy is None
    bad = write(tmp_path, MINIMAL.replace("[wrist]}", "[wrist], calling_ae: [NO]}"), "bad.yaml")
    (issue,) = errors_of(bad).errors
    assert (issue.line, issue.field) == (8, "routes[0].when.calling_ae[0]")
    assert "quotes" in issue.message


def test_failure_destinations_are_validated_with_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, "queue:\n  send_failures_to: [pacs, archive]\n" + MINIMAL)
    error = errors_of(path)
    assert [(i.line, i.field) for i in error.errors] == [(2, "queue.send_failures_to[1]")]
    assert "unknown destination 'archive'" in error.errors[0].message
    assert load_config(write(tmp_path, "queue: {send_failures_to: pacs}\n" + MINIMAL, "ok.yaml")).queue.send_failures_to == ["pacs"]
