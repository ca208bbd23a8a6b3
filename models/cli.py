"""``bonebridge train`` / ``evaluate`` / ``sort``: the model commands, registered on the main CLI's parser."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.preprocess import Geometry
from models.train import TrainConfig


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a public data-set layout")
    p.add_argument("task", choices=["boneage", "sex", "abnormality", "anatomy"])
    p.add_argument("--data", type=Path, help="RSNA labels.csv (boneage/sex), MURA root (abnormality), class folders (anatomy)")
    p.add_argument("--images", type=Path, help="RSNA image folder when not beside labels.csv")
    p.add_argument("--clusters", type=Path, help="anatomy: a clusters YAML written by `bonebridge sort` and named by a person")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt); its card is written beside it")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--aspect", choices=["stretch", "pad"], default="pad")
    p.add_argument("--mask-labels", action="store_true", help="mask burned-in labels at inference (and train on masked)")
    p.add_argument("--mask-probability", type=float, default=None,
                   help="fraction of training images masked (default 1.0 with --mask-labels, else 0)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--device")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    geometry = Geometry(size=args.size, aspect=args.aspect, mask_labels=args.mask_labels)
    mask_p = args.mask_probability if args.mask_probability is not None else (1.0 if args.mask_labels else 0.0)
    cfg = TrainConfig(
        out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
        seed=args.seed, mask_probability=mask_p, max_steps_per_epoch=args.max_steps_per_epoch, device=args.device,
        resume=not args.no_resume, progress=not args.no_progress,
    )
    if args.task == "boneage":
        from models.boneage import train_boneage

        path, best = train_boneage(args.data, args.out, geometry, cfg, args.arch, args.images)
    else:
        from models.classify import train_classifier

        path, best = train_classifier(args, geometry, cfg)
    print(f"best epoch: {best}")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bonebridge-models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
