"""Anatomy 2.0.0 second candidate (issue 25): all four sources as sent, C 0.1 (chosen on validation), + T + OOD."""
import json, sys
from pathlib import Path
import numpy as np, torch
from models.train.anatomy import fit_probe
from models.nets.anatomy_ood import (MahalanobisOOD, expected_calibration_error, fit_temperature, softmax,
                                threshold_for_acceptance)
from models.nets.checkpoint import load_checkpoint, save_checkpoint, code_version
from daemon.analyse.decision_table import evaluate_heads

OUT = Path("runs/anatomy20b"); SHIPPED = Path("models/weights/anatomy.pt")
a = dict(np.load("runs/anatomy/features.npz"))
model, card = load_checkpoint(SHIPPED)
classes = list(card.classes)
idx = {c: i for i, c in enumerate(classes)}
y = np.array([idx.get(l, -1) for l in a["label"]])
src, split, view, x = a["source"], a["split"], a["view"], a["x"]
sources = ["fracatlas", "rsna", "knee-oai-224", "chest-kermany"]
known = (y >= 0) & np.isin(src, sources)
train = known & (split == "train") & (view == "original")
val_orig = known & (split == "val") & (view == "original")
val_all = known & (split == "val")
if "--test" not in sys.argv:
    w, b, choice = fit_probe(x[train], y[train], x[val_orig], y[val_orig], grid=(0.1,))
    logits = x[val_all] @ w.T + b
    T = fit_temperature(logits, y[val_all])
    ood = MahalanobisOOD.fit(x[train], y[train])
    thr = threshold_for_acceptance(ood.score(x[val_all]), 0.95)
    v = {"rows": int(val_all.sum()), "T": T, "thr": thr, "ece_before": expected_calibration_error(softmax(logits), y[val_all]),
         "ece_after": expected_calibration_error(softmax(logits, T), y[val_all]), **choice}
    print(json.dumps(v, indent=1))
    lin = model.head[-1]
    lin.weight.data = torch.from_numpy(np.asarray(w, dtype=np.float32)); lin.bias.data = torch.from_numpy(np.asarray(b, dtype=np.float32))
    sha = ood.save(OUT / "anatomy.ood.npz")
    counts = {c: int(((y == i) & train).sum()) for i, c in enumerate(classes)}
    card = card.model_copy(update={"version": "2.0.0", "code_version": code_version(),
        "training_data": f"{', '.join(sources)}: {int(train.sum())} train images as sent; per class {counts}; split by id block / case id (FracAtlas, RSNA) and patient (knee, chest sets)",
        "training": {"method": "linear probe on frozen ImageNet features (multinomial logistic regression), temperature-scaled, Mahalanobis OOD", **choice},
        "metrics": {"validation": v}, "metrics_split": "validation split",
        "calibration": {"temperature": T, "temperature_fitted_on": "validation split of the four sources, every view; NLL",
                        "ood": {"method": "min squared Mahalanobis distance to the class means, shared Ledoit-Wolf covariance on the training rows",
                                "file": "anatomy.ood.npz", "sha256": sha, "threshold": thr,
                                "rule": "accept 95% of the validation rows of the training sources (every view); chosen before any test image was read"}}})
    save_checkpoint(model.eval(), card, OUT / "anatomy.pt")
else:
    from daemon.config.schema import load_config
    config = load_config(Path("config/bonebridge.yaml"))
    r = evaluate_heads(a, OUT / "anatomy.pt", config)
    (OUT / "test_report.json").write_text(json.dumps(r, indent=1, default=float))
    print(json.dumps(r["top1"]["fracatlas"]), json.dumps(r["top1"]["rsna"]))
    print(json.dumps({k: v for k, v in r["calibration"].items() if not k.startswith("reliab")}))
    print(json.dumps(r.get("ood")))
    print(r["decisions_markdown"])
