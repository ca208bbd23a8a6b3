"""How anatomy 1.1.0 was made (issue 25): 1.0.0's head + temperature + Mahalanobis OOD, fitted from 1.0.0's cached features.

Validation choices only (temperature: NLL; threshold: 95th percentile of validation scores). `--test` reads test.

Needs the feature cache of 1.0.0's backbone (`runs/anatomy/features.npz`: one `models.train.anatomy_world.extract_features`
pass over the clusters file, the knee and chest sets and the examples; ~15,800 rows) and writes `runs/anatomy11/`.
"""
import json, shutil, sys
from pathlib import Path
import numpy as np
from models.nets.anatomy_ood import (MahalanobisOOD, expected_calibration_error, fit_temperature, softmax,
                                threshold_for_acceptance)
from daemon.analyse.decision_table import evaluate_heads
from models.eval.anatomy import head_of

OUT = Path("runs/anatomy11")
SHIPPED = Path("models/weights/anatomy.pt")
arrays = dict(np.load("runs/anatomy/features.npz", allow_pickle=False))
# the knee and chest sets are other sites for 1.0.0: keep only their test rows, so nothing of them is fitted on
keep = ~(np.isin(arrays["source"], ["knee-oai-224", "chest-kermany"]) & (arrays["split"] != "test"))
arrays = {k: v[keep] for k, v in arrays.items()}
w, b, classes, _, _, _ = head_of(SHIPPED)
index = {c: i for i, c in enumerate(classes)}
own = np.isin(arrays["source"], ["fracatlas", "rsna"]) & np.array([l in index for l in arrays["label"]])
y = np.array([index.get(l, -1) for l in arrays["label"]])
x = arrays["x"]
train, val = own & (arrays["split"] == "train"), own & (arrays["split"] == "val")
if "--test" not in sys.argv:
    logits = x[val] @ w.T + b
    temperature = fit_temperature(logits, y[val])
    ood = MahalanobisOOD.fit(x[train], y[train])
    scores = ood.score(x[val])
    threshold = threshold_for_acceptance(scores, 0.95)
    validation = {"rows_all_views": int(val.sum()), "temperature": temperature, "threshold": threshold,
                  "ece_before": expected_calibration_error(softmax(logits), y[val]),
                  "ece_after": expected_calibration_error(softmax(logits, temperature), y[val]),
                  "top1_all_views": float((logits.argmax(1) == y[val]).mean())}
    print(json.dumps(validation, indent=1))
    shutil.copyfile(SHIPPED, OUT / "anatomy.pt")
    sha = ood.save(OUT / "anatomy.ood.npz")
    card = json.loads(SHIPPED.with_suffix(".card.json").read_text())
    card["version"] = "1.1.0"
    card["calibration"] = {
        "temperature": temperature,
        "temperature_fitted_on": f"validation split of anatomy.clusters.yaml (FracAtlas, RSNA), every view of the "
                                 f"feature cache ({int(val.sum())} rows: as sent, CLAHE, equalised, gamma); NLL",
        "ece_validation": {"before": validation["ece_before"], "after": validation["ece_after"]},
        "ood": {"method": "min squared Mahalanobis distance of the pooled features to the class means, shared "
                          "Ledoit-Wolf covariance fitted on the training rows (FracAtlas, RSNA, every view)",
                "file": "anatomy.ood.npz", "sha256": sha, "threshold": threshold,
                "rule": "accept 95% of the validation rows of the training sources (every view); chosen before any "
                        "test image was read"},
    }
    (OUT / "anatomy.card.json").write_text(json.dumps(card, indent=2) + "\n")
else:
    from daemon.config.schema import load_config
    config = load_config(Path("config/bonebridge.yaml"))
    report = {"new": evaluate_heads(arrays, OUT / "anatomy.pt", config), "old": evaluate_heads(arrays, SHIPPED, config)}
    (OUT / "test_report.json").write_text(json.dumps(report, indent=1, default=float))
    for k in ("new", "old"):
        r = report[k]
        print("==", k, "T", r["temperature"], "thr", r["ood_threshold"])
        print(json.dumps(r["top1"]))
        print(json.dumps({a: v for a, v in r["calibration"].items() if not a.startswith("reliab")}))
        print(json.dumps(r.get("ood")))
        print(r["decisions_markdown"])
