"""Issue 25: probe variants on cached features, validation only. Rule (stated before running): among variants whose
validation knee (knee/leg) and chest accuracy are both >= 95 %, the highest FracAtlas class top-1 on validation images
as sent; ties -> fewer training rows."""
import json, sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
CLASSES = "elbow forearm hand shoulder wrist chest pelvis hip knee leg ankle foot".split()
REGION = {"elbow": "arm", "forearm": "arm", "hand": "hand", "wrist": "hand", "shoulder": "shoulder", "chest": "chest",
          "pelvis": "hip", "hip": "hip", "knee": "leg", "leg": "leg", "ankle": "leg", "foot": "leg"}
a = dict(np.load("runs/anatomy/features.npz"))
idx = {c: i for i, c in enumerate(CLASSES)}
lab = np.array([idx.get(l, -1) for l in a["label"]])
src, split, view, x = a["source"], a["split"], a["view"], a["x"]
own = np.isin(src, ["fracatlas", "rsna"])
extra = np.isin(src, ["knee-oai-224", "chest-kermany"])
ok = lab >= 0
val = ok & (split == "val") & (own | extra)
def report(w, b):
    p = (x @ w.T + b).argmax(1)
    r = {}
    for s in ["fracatlas", "rsna", "knee-oai-224", "chest-kermany"]:
        for v in ["original", "clahe", "equalised"]:
            m = val & (src == s) & (view == v)
            if v != "original" and s != "fracatlas": continue
            r[f"{s}/{v}"] = round(float((p[m] == lab[m]).mean()), 4)
            r[f"{s}/{v}/region"] = round(float(np.mean([REGION[CLASSES[i]] == REGION[CLASSES[j]] for i, j in zip(p[m], lab[m])])), 4)
    return r
def fit(rows, weights=None, C=0.03, cw="balanced"):
    sc = StandardScaler().fit(x[rows])
    m = LogisticRegression(C=C, max_iter=2000, class_weight=cw).fit(sc.transform(x[rows]), lab[rows], sample_weight=weights)
    s = np.where(sc.scale_ > 0, sc.scale_, 1)
    return m.coef_ / s, m.intercept_ - (m.coef_ * sc.mean_ / s).sum(1)
train = ok & (split == "train")
variants = {
  "own_only_original(1.0.0-like)": (train & own & (view == "original"), None, "balanced"),
  "all_original": (train & (own | extra) & (view == "original"), None, "balanced"),
  "all_views": (train & (own | extra), None, "balanced"),
  "all_views_noweight": (train & (own | extra), None, None),
}
# extras down-weighted so each extra source weighs what one mid-size FracAtlas class weighs
rows = train & (own | extra)
wts = np.where(extra[rows], 0.25, 1.0)
variants["all_views_extras_quarter"] = (rows, wts, None)
out = {}
for name, (rows, w8, cw) in variants.items():
    for C in (0.01, 0.03, 0.1):
        t = time.time()
        W, B = fit(rows, w8, C, cw)
        out[f"{name} C={C}"] = r = report(W, B)
        r["rows"] = int(rows.sum()); r["s"] = round(time.time() - t)
        print(name, C, json.dumps(r), flush=True)
json.dump(out, open("runs/anatomy_v/variants.json", "w"), indent=1)
