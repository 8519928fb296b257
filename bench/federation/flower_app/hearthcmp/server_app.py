"""Flower ServerApp: FedAvg weighted by examples from Hearth's initial weights, every client
every round, held-out accuracy on Hearth's test split after every round (logged with a
timestamp for the round times)."""

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from hearthcmp.task import accuracy, load_csv, load_init

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    data = Path(str(cfg["data-dir"]))
    n = int(cfg["num-clients"])
    names, init = load_init(data)
    xt, yt = load_csv(data / "test.csv")
    log = Path(str(cfg["log-file"]))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc = accuracy(names, arrays.to_numpy_ndarrays(), xt, yt)
        with open(log, "a") as f:
            f.write(json.dumps({"round": server_round, "accuracy": acc, "t": time.time()}) + "\n")
        return MetricRecord({"accuracy": acc})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                      min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(init),
                   num_rounds=int(cfg["num-server-rounds"]),
                   train_config=ConfigRecord({"lr": float(cfg["lr"])}), evaluate_fn=evaluate)
