"""The three image classifiers: sex, abnormality (MURA) and anatomy, as :class:`models.train.loop.TaskSpec` s.

All three are a backbone with a linear head (:class:`models.nets.networks.ClassifierNet`) trained by the shared loop
in :mod:`models.train.loop`; this module only says, per task, where the examples come from, what the loss is, what is
measured on validation and what the model card records.

- **sex**: RSNA bone-age layout (``labels.csv`` with ``id,boneage,male``), one logit (male), BCE, AUROC. Cases are
  split by the same id hash as the bone-age model, so ``evaluate --split test`` sees the same held-out tenth.
- **abnormality**: MURA-v1.1, one logit (abnormal), BCE, AUROC. MURA's own ``valid`` split is the only public
  labelled evaluation set (its test set is hidden), so it is kept out of training entirely and is what
  ``bonebridge evaluate abnormality`` reports on. Early stopping and the decision threshold use a patient-hashed
  tenth of MURA ``train`` instead: a threshold tuned on the set it is then reported on would flatter the model.
  The threshold maximises Youden's J (sensitivity + specificity - 1) on that validation tenth.
- **anatomy**: softmax over the names a person gave (from the one vocabulary of
  :mod:`models.anatomy_vocabulary`), cross-entropy, top-1 accuracy. Examples come from one folder per class or
  from a ``clusters.yaml`` written by ``bonebridge sort`` and named by a person (clusters named null or
  ``discard`` are left out); from clusters, the default trainer is the linear probe of :mod:`models.train.anatomy`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from models.anatomy_vocabulary import VOCABULARY, canonical_name, in_vocabulary_order
from models.nets.checkpoint import INTENDED_USE, ModelCard
from models.data.datasets import read_class_folders, read_mura, read_rsna_boneage, split_of
from models.data.preprocess import Augment, Geometry
from models.train.loop import Example, TrainConfig, build_cache, train
from models.train.task_specs import binary_spec, multiclass_spec

LOGGER = logging.getLogger(__name__)

#: Every name an anatomy class may have; a model's classes are the subset its training data named.
ANATOMY_CLASSES: tuple[str, ...] = VOCABULARY
ABNORMALITY_CLASSES = ["normal", "abnormal"]
SEX_CLASSES = ["female", "male"]

MURA_LICENCE = (
    "MURA-v1.1 (Rajpurkar et al., 2017, arXiv:1712.06957), Stanford AIMI research use agreement: "
    "non-commercial research use only."
)
RSNA_LICENCE = (
    "RSNA Pediatric Bone Age Challenge training images (Halabi et al., Radiology 2019;290:498-503), "
    "research use only, with attribution."
)
SITE_LICENCE = "Site images sorted with `bonebridge sort`; governed by the site's own data agreement."



# --------------------------------------------------------------------------- cards and specs
def classifier_card(task: str, geometry: Geometry, architecture: str, classes: list[str], data_note: str,
                    licence: str, threshold: float | None = None) -> ModelCard:
    """The card template a classifier is trained under (``trained`` becomes true when the loop saves it)."""
    return ModelCard(
        task=task,  # type: ignore[arg-type]
        name=f"bonebridge-{task}",
        version="1.0.0",
        architecture=architecture,
        input_size=geometry.size,
        normalisation={"mean": list(geometry.mean), "std": list(geometry.std)},
        preprocessing=geometry.to_dict(),
        classes=list(classes),
        threshold=threshold,
        training_data=data_note,
        licence_note=licence,
        intended_use=INTENDED_USE[task],
        trained=False,
    )


# --------------------------------------------------------------------------- examples per task
def sex_examples(labels_csv: Path, images: Path | None = None) -> dict[str, list[Example]]:
    """RSNA cases as male/female examples, split by the id hash the bone-age model uses."""
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for case in read_rsna_boneage(labels_csv, images):
        male = float(case.male)
        splits[split_of(case.case_id)].append(Example(case.path, male, male, group="male" if male else "female"))
    return splits


def mura_patient(study: str) -> str:
    """The patient folder of a MURA study path (``.../XR_WRIST/patient00001/study1_positive``)."""
    return next((part for part in Path(study).parts if part.startswith("patient")), study)


def mura_examples(root: Path) -> dict[str, list[Example]]:
    """MURA ``train`` split into train / val by patient hash; MURA ``valid`` is kept as the test set."""
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for item in read_mura(root, "train"):
        key = split_of(mura_patient(item.study), val_fraction=0.1, test_fraction=0.0)
        splits[key].append(Example(item.path, float(item.label), group=item.group))
    try:
        splits["test"] = [Example(i.path, float(i.label), group=i.group) for i in read_mura(root, "valid")]
    except FileNotFoundError:
        LOGGER.warning("%s: no MURA valid split; nothing held out for `bonebridge evaluate`", root)
    return splits


def anatomy_class_index(name: str, classes: Sequence[str] = ANATOMY_CLASSES) -> int:
    """Index of a folder or cluster name among ``classes`` (``XR_WRIST`` and ``Wrist`` work too)."""
    key = canonical_name(name)
    if key not in classes:
        raise ValueError(f"{name!r} is not one of this model's classes ({', '.join(classes)})")
    return list(classes).index(key)


def anatomy_examples_from_folders(root: Path) -> tuple[dict[str, list[Example]], list[str]]:
    """``root/<class>/`` images, split by the hash of their path relative to ``root``; classes = folder names."""
    items, names = read_class_folders(root)
    classes = in_vocabulary_order(names)  # raises on a folder that is no anatomy name
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for item in items:
        label = anatomy_class_index(item.group, classes)
        key = Path(item.path).relative_to(root).as_posix()
        splits[split_of(key)].append(Example(item.path, float(label), group=classes[label]))
    return splits, classes


def _require(splits: dict[str, list[Example]], binary: bool, source: str) -> None:
    for name in ("train", "val"):
        if not splits[name]:
            raise ValueError(f"{source}: no {name} images after splitting; is the folder the right layout?")
    if binary:
        for name in ("train", "val"):
            labels = {e.target for e in splits[name]}
            if len(labels) < 2:
                raise ValueError(f"{source}: the {name} split has only one class ({labels}); cannot train/validate")


# --------------------------------------------------------------------------- entry point
@dataclass(frozen=True)
class ClassifierSource:
    """What ``bonebridge train sex|abnormality|anatomy`` trains on (the command line's words, typed)."""

    task: str  #: "sex", "abnormality" or "anatomy"
    data: Path | None = None  #: RSNA labels.csv (sex), FracAtlas folder or MURA root (abnormality), class folders
    images: Path | None = None  #: sex: the RSNA image folder when it is not beside labels.csv
    arch: str = "efficientnet_lite0"
    clusters: Path | None = None  #: anatomy: a clusters.yaml named by a person
    licence: str | None = None  #: anatomy from clusters: the images' licence note, for the card
    extra: tuple[str, ...] = ()  #: anatomy from clusters: ``DIR=PART`` folders (the world probe)
    features_cache: Path | None = None  #: anatomy with ``extra``: the pooled features' .npz
    finetune: bool = False  #: anatomy from clusters: fine-tune the whole network instead of the linear probe
    map_stride: int = 16  #: abnormality on FracAtlas: the learnt map's stride (16, or 8 for a finer map)


def train_classifier(request: ClassifierSource, geometry: Geometry, cfg: TrainConfig) -> tuple[Path, dict]:
    """``bonebridge train sex|abnormality|anatomy``: build the task's examples and card, then run the loop."""
    task = request.task
    architecture = request.arch
    data = Path(request.data) if request.data else None
    if task == "sex":
        if data is None:
            raise ValueError("train sex needs --data labels.csv (RSNA layout)")
        labels_csv = data / "labels.csv" if data.is_dir() else data
        splits = sex_examples(labels_csv, request.images)
        source = str(labels_csv)
        note = (f"{labels_csv.parent.name}: {len(splits['train'])} train / {len(splits['val'])} validation images "
                f"(sha256-of-id split; {len(splits['test'])} test images held out)")
        card = classifier_card("sex", geometry, architecture, SEX_CLASSES, note, RSNA_LICENCE, threshold=0.5)
        spec = binary_spec(card, tune_threshold=False, augment=Augment(degrees=15))
    elif task == "abnormality":
        if data is None:
            raise ValueError("train abnormality needs --data FRACATLAS_DIR or MURA_ROOT (the folder holding MURA-v1.1)")
        from models.data.fracatlas import is_fracatlas, read_fracatlas

        if is_fracatlas(data):
            from models.train.abnormality import train_fracture

            return train_fracture(read_fracatlas(data), data, geometry, cfg, architecture, request.map_stride)
        splits = mura_examples(data)
        source = str(data)
        note = (f"MURA-v1.1 train: {len(splits['train'])} train / {len(splits['val'])} validation images "
                f"(patient-hash split of MURA train); MURA valid ({len(splits['test'])} images) held out as test")
        card = classifier_card("abnormality", geometry, architecture, ABNORMALITY_CLASSES, note, MURA_LICENCE,
                               threshold=0.5)
        spec = binary_spec(card, tune_threshold=True, augment=Augment(degrees=15, hflip=True))
    elif task == "anatomy":
        clusters = request.clusters
        if clusters:
            from models.train.anatomy import examples_from_clusters

            found = examples_from_clusters(Path(clusters))
            splits, classes = found.splits, found.classes
            source, licence = str(clusters), request.licence or SITE_LICENCE
        elif data is not None:
            splits, classes = anatomy_examples_from_folders(data)
            source, licence = str(data), "As the licence of the class-folder images (record it here)."
        else:
            raise ValueError("train anatomy needs --data CLASS_FOLDERS or --clusters clusters.yaml")
        counts = {name: sum(e.group == name for e in splits["train"]) for name in classes}
        note = (f"{Path(source).name}: {len(splits['train'])} train / {len(splits['val'])} validation images "
                f"(split by id block or case id; {len(splits['test'])} test held out); train per class {counts}")
        card = classifier_card("anatomy", geometry, architecture, classes, note, licence)
        if clusters and request.extra:
            from models.train.anatomy_world import train_world_probe

            extras = [(Path(item.partition("=")[0]), item.partition("=")[2]) for item in request.extra]
            cache = request.features_cache or Path(cfg.out).with_suffix(".features.npz")
            if request.finetune:
                from models.train.anatomy_finetune import train_world_finetune

                return train_world_finetune(Path(clusters), extras, cfg, geometry, card, cache)
            return train_world_probe(Path(clusters), extras, cfg.out, geometry, card, cache, seed=cfg.seed,
                                     progress=cfg.progress)
        if clusters and not request.finetune:
            from models.train.anatomy import train_linear_probe

            _require(splits, binary=False, source=source)
            return train_linear_probe(Path(clusters), cfg.out, geometry, card, seed=cfg.seed, progress=cfg.progress)
        spec = multiclass_spec(card)
    else:
        raise ValueError(f"train_classifier does not train {task!r}")
    _require(splits, binary=task != "anatomy", source=source)
    LOGGER.info("%s: %d train, %d val images", task, len(splits["train"]), len(splits["val"]))
    caches = (build_cache(splits["train"], geometry, cfg.progress), build_cache(splits["val"], geometry, cfg.progress))
    return train(spec, splits["train"], splits["val"], cfg, caches=caches)
