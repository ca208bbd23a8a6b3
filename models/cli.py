"""``bonebridge train`` / ``evaluate`` / ``sort``: the model commands, registered on the main CLI's parser."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.data.preprocess import Geometry
from models.train.loop import TrainConfig


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a public data-set layout")
    p.add_argument("task", choices=["boneage", "sex", "abnormality", "anatomy"])
    p.add_argument("--data", type=Path, help="RSNA labels.csv (boneage/sex), FracAtlas folder or MURA root (abnormality), class folders (anatomy)")
    p.add_argument("--images", type=Path, help="RSNA image folder when not beside labels.csv")
    p.add_argument("--clusters", type=Path, help="anatomy: a clusters YAML written by `bonebridge sort` and named by a person")
    p.add_argument("--finetune", action="store_true",
                   help="anatomy from --clusters: train the whole network instead of a linear probe on frozen features "
                        "(with --extra: site-style augmentation, then temperature and OOD sidecar on its own features; "
                        "models/train/anatomy_finetune.py)")
    p.add_argument("--licence", help="anatomy from --clusters: the licence/attribution note of the sorted images, for the card")
    p.add_argument("--extra", action="append", metavar="DIR=PART",
                   help="anatomy from --clusters (issue 25): also train on a folder whose images all show PART "
                        "(knee-oai-224/images=knee), split by patient; adds contrast copies, temperature scaling and "
                        "the OOD sidecar (models/train/anatomy_world.py); repeatable")
    p.add_argument("--features-cache", type=Path, help="anatomy with --extra: .npz of the pooled features")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt); its card is written beside it")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--aspect", choices=["stretch", "pad"], default="pad")
    p.add_argument("--mask-labels", action="store_true", help="mask burned-in labels at inference (and train on masked)")
    p.add_argument("--crop-to-body", action="store_true",
                   help="crop every image to the body part's silhouette first (training and inference alike)")
    p.add_argument("--mask-probability", type=float, default=None,
                   help="fraction of training images masked (default 1.0 with --mask-labels, else 0)")
    p.add_argument("--reframe-probability", type=float, default=0.0,
                   help="boneage: fraction of training images taken from a copy cropped tightly on black or zoomed "
                        "out with padding (the ways a PACS's framing differs)")
    p.add_argument("--hflip", action="store_true",
                   help="boneage: mirror half the training images, so a right hand reads like a left one when its "
                        "header does not say which it is (abnormality always mirrors)")
    p.add_argument("--sex-loss-weight", type=float,
                   help="boneage: the sex head's weight in the loss, beside the age's L1 on standardised months "
                        "(default: models.train.boneage.SEX_LOSS_WEIGHT)")
    p.add_argument("--normalisation", choices=["imagenet", "radiograph"], default="imagenet",
                   help="input normalisation, kept in the card: ImageNet's colour statistics, or (x - 0.45) / 0.25 on "
                        "every channel (a grey radiograph in [0, 1])")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the GPU or CPU runs it natively (AVX-512 BF16, AMX), else fp32")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="validate and save an exponential moving average of the weights with this decay (0: none)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's weight decay")
    p.add_argument("--site-style-probability", type=float, default=0.0,
                   help="boneage: fraction of training images shown in a random site's processing (histogram "
                        "equalisation, CLAHE, unsharp masking, windowing, segmented on black)")
    p.add_argument("--smooth-l1-beta", type=float, default=0.0,
                   help="boneage: smooth L1 on standardised months with this beta (0: plain L1)")
    p.add_argument("--augment", choices=["default", "wide"], default="default",
                   help="boneage: augmentation strength (wide: rotation 20, scale 0.8-1.2, shift 10 %%, brightness)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="abnormality on FracAtlas: share of id blocks for validation, taken from train (the test split "
                        "does not move); 0.2 doubles the validation images that choose the epoch and threshold")
    p.add_argument("--map-stride", type=int, choices=[8, 16], default=16,
                   help="abnormality on FracAtlas: the learnt fracture map's stride (8: a finer map, one more "
                        "small convolution on the stride-8 features)")
    p.add_argument("--frozen-blocks", type=int, default=3,
                   help="abnormality on FracAtlas: backbone blocks kept frozen after the stem (0: fine-tune all)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--device")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--init-weights", type=Path,
                   help="start from this trained checkpoint of the same task with a fresh optimiser and schedule: "
                        "abnormality on FracAtlas continues a run (same geometry); boneage transfers a model trained at "
                        "another geometry (e.g. the 100 px thumbnails' model) to this one")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.data.preprocess import NORMALISATIONS

    mean, std = NORMALISATIONS[args.normalisation]
    geometry = Geometry(size=args.size, aspect=args.aspect, mask_labels=args.mask_labels,
                        crop_to_body=args.crop_to_body, mean=mean, std=std)
    if args.init_weights and args.task not in ("abnormality", "boneage"):
        raise SystemExit("--init-weights is for abnormality on a FracAtlas folder and for boneage only")
    mask_p = args.mask_probability if args.mask_probability is not None else (1.0 if args.mask_labels else 0.0)
    cfg = TrainConfig(
        out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
        seed=args.seed, mask_probability=mask_p, reframe_probability=args.reframe_probability, hflip=args.hflip,
        sex_loss_weight=args.sex_loss_weight,
        max_steps_per_epoch=args.max_steps_per_epoch, device=args.device,
        resume=not args.no_resume, progress=not args.no_progress, init_weights=args.init_weights,
        precision=args.precision, ema_decay=args.ema_decay, weight_decay=args.weight_decay,
        site_style_probability=args.site_style_probability, smooth_l1_beta=args.smooth_l1_beta, augment=args.augment,
        val_fraction=args.val_fraction, frozen_blocks=args.frozen_blocks,
    )
    if args.task == "boneage":
        from models.train.boneage import train_boneage

        path, best = train_boneage(args.data, args.out, geometry, cfg, args.arch, args.images)
    else:
        from models.train.classify import ClassifierSource, train_classifier

        source = ClassifierSource(task=args.task, data=args.data, images=args.images, arch=args.arch,
                                  clusters=args.clusters, licence=args.licence, extra=tuple(args.extra or ()),
                                  features_cache=args.features_cache, finetune=args.finetune,
                                  map_stride=args.map_stride)
        path, best = train_classifier(source, geometry, cfg)
    print(f"best epoch: {best}")
    print(f"wrote {path}")
    return 0


def add_fit_side_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-side", help="bone age: fit the right-hand detector on a checkpoint's frozen features "
                                        "(for headers that do not state the side)")
    p.add_argument("--weights", type=Path, required=True, help="a trained bone-age checkpoint")
    p.add_argument("--data", type=Path, required=True, help="RSNA labels.csv (left hands); its train split fits, val chooses")
    p.add_argument("--images", type=Path, help="RSNA image folder when not beside labels.csv")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write, with the head and its card entry")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_fit_side)


def run_fit_side(args: argparse.Namespace) -> int:
    import json

    from models.train.side import fit_side_head

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path, report = fit_side_head(args.weights, args.data, args.out, args.images, progress=not args.no_progress)
    print(json.dumps(report["validation"]))
    print(f"side head threshold {report['threshold']:.4f}; wrote {path}")
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a checkpoint on a labelled folder; JSON + plots, headline last")
    p.add_argument("task", choices=["boneage", "sex", "abnormality", "anatomy"])
    p.add_argument("--weights", type=Path, required=True, help="checkpoint (.pt) with its card beside it")
    p.add_argument("--data", type=Path,
                   help="RSNA folder (DIR/labels.csv + DIR/images), FracAtlas folder (DIR/dataset.csv + "
                        "DIR/images, boxes from DIR/fractures.csv) or MURA root (abnormality), or class folders or "
                        "a named clusters.yaml (anatomy)")
    p.add_argument("--labels", type=Path, help="RSNA labels.csv when it is not DIR/labels.csv")
    p.add_argument("--split", choices=["test", "val", "train", "all"], default=None,
                   help="id-hash split to evaluate (default all; `test` is the tenth training never saw); "
                        "abnormality on MURA always uses MURA-v1.1 valid; on FracAtlas the default is test on the "
                        "folder the model was trained on and every image on any other (the headline says which)")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--mask", dest="mask", action="store_true", default=None,
                      help="mask burned-in labels (default: as the model card says)")
    mask.add_argument("--no-mask", dest="mask", action="store_false", help="do not mask burned-in labels")
    p.add_argument("--tta", action="store_true", help="bone age: average the image and two small shifts")
    p.add_argument("--ensemble", type=Path, action="append", metavar="WEIGHTS",
                   help="bone age, abnormality: another checkpoint of the same task whose outputs are averaged with "
                        "--weights', as the daemon's models.<name>.ensemble runs them; anatomy (with --extra or "
                        "--examples): a fallback of the cascade, asked where the models before it are out of "
                        "distribution; repeatable")
    p.add_argument("--flip", action="store_true",
                   help="abnormality: also read the mirrored image and average (probability and map), as a card's "
                        "test_time_flip makes the daemon do")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="inference precision (default: the card's; bf16 only where the hardware runs it natively)")
    p.add_argument("--variants", action="store_true",
                   help="bone age: also measure the images reframed and processed as real ones differ (tight crop on "
                        "black, zoomed out, rotated 15 degrees both ways, MONOCHROME1 DICOM, a right hand with and "
                        "without its side, segmented on black and equalised, CLAHE)")
    p.add_argument("--regions", type=Path, action="append",
                   help="anatomy: independent region labels (FracAtlas dataset.csv, RSNA labels.csv), repeatable; "
                        "adds region-level accuracy")
    p.add_argument("--extra", action="append", metavar="DIR=PART",
                   help="anatomy (issue 25): a folder whose images all show PART (e.g. knee-oai-224/images=knee), "
                        "split by patient; repeatable. With --extra or --examples the report has calibration, OOD "
                        "AUROC and the decision table (daemon/analyse/decision_table.py)")
    p.add_argument("--examples", type=Path, action="append",
                   help="anatomy: a folder of test-only examples named by part (the MURA examples: ELBOW.png...)")
    p.add_argument("--compare-with", type=Path, action="append", help="anatomy: another checkpoint, same features")
    p.add_argument("--features-cache", type=Path, help="anatomy: .npz of the pooled features (reused when it matches)")
    p.add_argument("--config", type=Path, help="anatomy decision table: the BoneBridge config (default: the shipped one)")
    p.add_argument("--json", type=Path, required=True, help="where to write the report")
    p.add_argument("--plots", type=Path, help="folder for the PNG plots (default: beside the JSON)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.eval.evaluate import run_evaluate as evaluate_command

    if args.task == "anatomy" and (args.extra or args.examples):
        # The decision table runs the daemon's anatomy decision and routing; the models never import the daemon.
        raise SystemExit("evaluate anatomy --extra/--examples reads the daemon's decision table: run it as "
                         "`bonebridge evaluate anatomy ...`")
    if args.task == "anatomy" and args.ensemble:
        raise SystemExit("evaluate anatomy --ensemble measures a cascade by its decision table: add --extra DIR=PART "
                         "or --examples DIR")

    if args.plots is None:
        args.plots = args.json.parent
    return evaluate_command(args)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="two evaluate reports of the same images (bone age, or fracture AUROC and pointing), "
                                           "paired (candidate - base)")
    p.add_argument("base", type=Path, help="the report of the model that ships")
    p.add_argument("candidate", type=Path, help="the report of the model that would replace it")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    import json

    from models.eval.compare import abnormality_lines, compare_files

    try:
        result = compare_files(args.base, args.candidate)
    except (OSError, ValueError, KeyError) as exc:  # a missing, unreadable or mismatched report: say which, briefly
        raise SystemExit(f"bonebridge compare: {exc}") from None
    print(json.dumps(result, indent=2))
    if "auroc_difference" in result:
        print("\n".join(abnormality_lines(result)))
        return 0
    low, high = result["mae_difference_ci95"]
    print(f"candidate - base: {result['mae_difference_months']:+.2f} months (95 % CI {low:+.2f} to {high:+.2f}, "
          f"paired, n={result['n']}); better on {result['candidate_better_on']:.0%} of the images")
    return 0


def add_sort_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sort", help="cluster unlabeled radiographs into contact sheets + clusters.yaml to name")
    p.add_argument("--images", type=Path, required=True, action="append",
                   help="folder of PNG/JPEG/DICOM (.dcm) images, searched recursively; repeat to pool folders")
    p.add_argument("--out", type=Path, required=True, help="folder for cluster_XX.png and clusters.yaml")
    p.add_argument("--k", type=int, default=8, help="number of clusters (default 8)")
    p.add_argument("--weights", type=Path, help="embed with a trained checkpoint's features instead of ImageNet's")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone for ImageNet features (without --weights)")
    p.add_argument("--size", type=int, default=128, help="input size for ImageNet features (without --weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", type=Path, action="append",
                   help="known regions to measure the clusters against (NMI), never used to cluster: a FracAtlas "
                        "dataset.csv, an RSNA labels.csv (all hands) or a path,label CSV; repeatable")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_sort)


def run_sort(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.train.cluster import sort_images

    clusters, agreement = sort_images(args.images, args.out, k=args.k, weights=args.weights, arch=args.arch,
                                      size=args.size, progress=not args.no_progress, seed=args.seed,
                                      region_labels=args.labels)
    for cluster in clusters:
        print(f"cluster {cluster.index:02d}: {len(cluster.paths)} images -> {cluster.sheet}")
    if agreement:
        print(f"agreement with the known regions: NMI {agreement.get('nmi', float('nan')):.3f} over "
              f"{agreement['single_region_images']} single-region images (ARI {agreement.get('adjusted_rand', 0):.3f}; "
              f"NMI {agreement.get('nmi_with_mixed', float('nan')):.3f} counting 'mixed' as a region)")
    print(f"name the clusters in {args.out / 'clusters.yaml'}, then: "
          f"bonebridge train anatomy --clusters {args.out / 'clusters.yaml'} --out anatomy.pt")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bonebridge-models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_fit_side_parser(sub)
    add_compare_parser(sub)
    add_sort_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
