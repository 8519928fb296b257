"""Flower ClientApp: trains on partition `partition-id` (exported from Hearth's agents)."""

import os
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hearthcmp.task import load_csv, load_init, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context):
    cfg = context.run_config
    data = Path(str(cfg["data-dir"]))
    pid = int(context.node_config["partition-id"])
    names, _ = load_init(data)
    x, y = load_csv(data / f"part-{pid}.csv")
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    rnd = int(msg.content["config"]["server-round"])
    new, loss = train(names, arrays, x, y, int(cfg["local-epochs"]), float(cfg["lr"]),
                      int(cfg["batch-size"]), float(cfg["momentum"]), seed=pid * 1000 + rnd)
    # Peak RSS of this ClientApp process (Flower starts one per message), for the table.
    rss = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1])
    log = cfg.get("log-file")
    if log:
        with open(str(log) + f".client{pid}", "a") as f:
            f.write(f"{rnd} {rss} {os.getpid()}\n")
    content = RecordDict({
        "arrays": ArrayRecord(new),
        "metrics": MetricRecord({"num-examples": len(y), "train_loss": loss}),
    })
    return Message(content=content, reply_to=msg)
