"""``bonebridge``: the command line.

Without ``--config`` every command uses the embedded default (``daemon/config/defaults/bonebridge.yaml``, the same file
as ``config/bonebridge.yaml``), so a fresh install starts with ``bonebridge serve``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from daemon.ops.openmp_policy import prefer_sleeping_threads

prefer_sleeping_threads()  # before anything imports torch (build_parser does): see daemon/ops/openmp_policy.py
LOGGER = logging.getLogger("bonebridge")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="BoneBridge YAML config (default: the embedded config/bonebridge.yaml)")


def _config_path(args: argparse.Namespace) -> Path:
    from daemon.config.schema import default_config_path

    return args.config if args.config is not None else default_config_path()


def _load(args: argparse.Namespace):
    from daemon.config.schema import ConfigError, load_config

    try:
        return load_config(_config_path(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.config.schema import ConfigError
    from daemon.ops.demo_pacs import DemoPacsError
    from daemon.queue.broker import BrokerError
    from daemon.serve import serve

    try:
        return serve(_config_path(args), workers=args.workers, demo=args.demo)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except DemoPacsError as exc:
        print(f"bonebridge serve --demo: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:  # e.g. another serve on this data directory: its one line, no traceback
        print(f"bonebridge serve: {exc}", file=sys.stderr)
        return 2


def cmd_sample(args: argparse.Namespace) -> int:
    """Print the path of a real radiograph to send for a first try (pydicom-data's RG3, MIT licence)."""
    try:
        import data_store
    except ImportError:
        print("the sample radiograph ships in the PyPI package pydicom-data: pip install pydicom-data",
              file=sys.stderr)
        return 1
    print(Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm")
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from daemon.serve import listen

    return listen(_config_path(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from daemon.serve import worker

    return worker(_config_path(args), args.broker, args.concurrency, args.queues)


def cmd_config_check(args: argparse.Namespace) -> int:
    from daemon.config.check import check_config_text

    ok, text = check_config_text(args.path)
    print(text)
    return 0 if ok else 1


def cmd_route_explain(args: argparse.Namespace) -> int:
    from daemon.analyse.explain import explain_files
    from daemon.analyse.pipeline import Analyser

    config = _load(args)
    # The daemon's own anatomy decision (model and tags), so the dry run cannot tell IT something else.
    text, all_read = explain_files(config, args.files, analyser=Analyser(config),
                                   calling_ae=args.calling_ae)
    print(text)
    return 0 if all_read else 2


def cmd_predict(args: argparse.Namespace) -> int:
    """Run the routed models on files, offline; print the findings as JSON; optionally write the SR and SCs."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from daemon.analyse.pipeline import Analyser

    config = _load(args)
    studies: dict[str, list] = defaultdict(list)
    unreadable = 0
    for path in args.files:
        try:
            ds = pydicom.dcmread(path)
            study_uid = str(ds.StudyInstanceUID)
        except (OSError, InvalidDicomError, ValueError, EOFError, AttributeError) as exc:
            reason = "no StudyInstanceUID" if isinstance(exc, AttributeError) else exc
            print(f"{path}: cannot read as DICOM: {reason}", file=sys.stderr)  # one line per file, no traceback
            unreadable += 1
            continue
        studies[study_uid].append(ds)
    if not studies:
        return 2
    analyser = Analyser(config)
    report = []
    for study_uid, datasets in studies.items():
        analysis = analyser.analyse(datasets, calling_ae=args.calling_ae)
        report.append(analysis.summary())
        if args.out:
            folder = Path(args.out) / study_uid
            folder.mkdir(parents=True, exist_ok=True)
            for ds in analysis.outputs:
                ds.save_as(folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    print(json.dumps(report if len(report) != 1 else report[0], indent=2, default=str))
    return 2 if unreadable else 0


def cmd_retry(args: argparse.Namespace) -> int:
    from daemon.dispatch.dispatcher import Dispatcher

    config = _load(args)
    dispatcher = Dispatcher(Path(config.storage.data_dir), config.destinations)
    results = dispatcher.replay(args.entry)
    for item in results:
        print(item)
    if not results:
        print("dead-letter folder is empty")
    return 0 if all(item.ok for item in results) else 1  # scripts and cron jobs see a failed replay


#: Commands that never need the model commands' parsers (which import torch: 40 s and 600 MB on a busy machine, for
#: nothing, in a dispatch-only worker or `bonebridge retry`).
_DAEMON_COMMANDS = frozenset({"serve", "sample", "listen", "worker", "config", "route", "predict", "retry"})


def _command(argv: list[str]) -> str | None:
    """The subcommand in ``argv`` (the first word that is not ``--log-level`` or its value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(daemon_only: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bonebridge",
        description="BoneBridge: receives radiographs by DICOM C-STORE, works out the body part, runs the models a "
                    "route names (bone age, fracture) and sends a DICOM SR and heatmaps back to the PACS. Without "
                    "--config every command uses the embedded default configuration.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="listener + assembler + worker + embedded broker on this machine")
    _config_arg(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads the models once)")
    p.add_argument("--demo", action="store_true",
                   help="also start a private Orthanc as the (local) destination and print its web page's address")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sample", help="print the path of a real radiograph to send for a first try (a CR of a "
                                      "lower leg from pydicom-data)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("listen", help="only the DICOM listener and study assembler (needs broker: redis://...)")
    _config_arg(p)
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("worker", help="only a Celery worker that analyses studies and/or delivers results "
                                      "(needs a broker URL)")
    _config_arg(p)
    p.add_argument("--broker", help="broker URL (default: the config's `broker`)")
    p.add_argument("--queues", default="studies,dispatch",
                   help="studies (analysis), dispatch (delivery to the destinations) or both (default), "
                        "comma-separated: run them apart so a PACS that hangs never holds an analysis slot")
    p.add_argument("--concurrency", type=int, default=None,
                   help="tasks at once (default 1; 4 threads for a dispatch-only worker)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a config; print every error with file, line and field")
    c.add_argument("path", type=Path)
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("route", help="routing tools")
    rsub = p.add_subparsers(dest="route_command", required=True)
    r = rsub.add_parser("explain", help="which route fires for these files, and why not the others")
    _config_arg(r)
    r.add_argument("files", type=Path, nargs="+")
    r.add_argument("--calling-ae", default=None, help="calling AE title to route as (rules may match on it)")
    r.set_defaults(func=cmd_route_explain)

    p = sub.add_parser("predict", help="run the routed models on DICOM files offline and print the findings as JSON")
    _config_arg(p)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="write the SR and heatmap SC files here")
    p.add_argument("--calling-ae", default=None, help="calling AE title to route as (rules may match on it)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("retry", help="re-send results from the dead-letter folder")
    _config_arg(p)
    p.add_argument("entry", nargs="?", help="one dead-letter entry (default: all)")
    p.set_defaults(func=cmd_retry)
    if daemon_only:
        return parser

    from models import cli as models_cli

    models_cli.add_train_parser(sub)
    for name in ("add_evaluate_parser", "add_fit_side_parser", "add_compare_parser", "add_sort_parser"):
        adder = getattr(models_cli, name, None)
        if adder is not None:
            adder(sub)
    sub.choices["evaluate"].set_defaults(func=cmd_evaluate)
    return parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``bonebridge evaluate``: the models' command, except anatomy with ``--extra``/``--examples``, whose decision
    table runs the daemon's own anatomy decision and routing (:mod:`daemon.analyse.decision_table`)."""
    from models import cli as models_cli

    if args.task == "anatomy" and (args.extra or args.examples):
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from daemon.analyse.decision_table import run

        return run(args.weights, args.data, args.json, extra=args.extra or (), examples=args.examples or (),
                   features_cache=args.features_cache, config_path=args.config, compare_with=args.compare_with or (),
                   split=args.split, progress=not args.no_progress, ensemble=args.ensemble or ())
    return models_cli.run_evaluate(args)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(daemon_only=_command(words) in _DAEMON_COMMANDS and "-h" not in words[:1])
    args = parser.parse_args(words)
    from daemon.serve import setup_logging

    setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
