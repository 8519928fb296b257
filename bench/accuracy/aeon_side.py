"""Reference side of bench/accuracy: aeon's MiniRocketClassifier (MiniRocket features +
RidgeClassifierCV, aeon's defaults: 10,000 features) trained centrally on exactly the windows
Hearth's feature front end sees (written by bench-accuracy as .npy), then one table:
aeon MiniRocket | Hearth central | Hearth federated | Hearth size (float / int8)."""
import argparse
import json
import time

import numpy as np
from aeon.classification.convolution_based import MiniRocketClassifier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default="bench/accuracy/run.sh")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    rows = json.load(open(f"{a.work}/hearth.json"))
    for r in rows:
        w = r.get("windows")
        if not w:
            r["aeon"] = None
            continue
        xtr, ytr = np.load(w["x_train"]), np.load(w["y_train"])
        xte, yte = np.load(w["x_test"]), np.load(w["y_test"])
        accs = []
        t = time.time()
        for seed in range(a.seeds):
            c = MiniRocketClassifier(random_state=seed)
            c.fit(xtr.astype(np.float64), ytr)
            accs.append(float((c.predict(xte.astype(np.float64)) == yte).mean()))
        r["aeon"] = {"accuracy": accs, "mean": float(np.mean(accs)), "seconds": time.time() - t}
        print(f"{r['task']}: aeon MiniRocket {accs}", flush=True)

    def pct(v):
        return f"{v:.3f}"

    lines = [
        f"Command: `{a.command}`",
        "",
        "| task | Hearth family | aeon MiniRocket (central) | Hearth central | Hearth federated "
        "| fed − central | fed − aeon | model bytes f32 | int8 bytes (acc) | µs/window |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        aeon = r["aeon"]["mean"] if r["aeon"] else None
        lines.append(
            "| {task} | {fam} | {aeon} | {c} | {f} | {dc:+.3f} | {da} | {b} | {b8} ({a8}) | {lat:.0f} |".format(
                task=r["task"],
                fam=r["family"],
                aeon=pct(aeon) if aeon is not None else "n/a (not a series)",
                c=pct(r["central"]),
                f=pct(r["federated"]),
                dc=r["federated"] - r["central"],
                da=f"{r['federated'] - aeon:+.3f}" if aeon is not None else "",
                b=r["bytes_f32"],
                b8=r["bytes_int8"],
                a8=pct(r["int8_accuracy"]),
                lat=r["latency_us_per_window"],
            )
        )
    table = "\n".join(lines)
    print(table)
    open(f"{a.out}.md", "w").write(table + "\n")
    json.dump(rows, open(f"{a.out}.json", "w"), indent=1)


if __name__ == "__main__":
    main()
