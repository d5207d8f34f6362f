"""quickstart: the ServerApp. FedUGM in place of FedAvg, with a ledger, resume and removal."""

import json
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fl_ugm import FedUGM
from quickstart.task import Net, load_test_data, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    ledger = str(cfg["ledger"]) or None
    strategy = FedUGM(fraction_evaluate=float(cfg["fraction-evaluate"]),
                      ledger=ledger, resume=bool(cfg["resume"]))
    testloader = load_test_data(str(cfg["dataset"]))

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, testloader, "cpu")
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]),
                            train_config=ConfigRecord({"lr": float(cfg["learning-rate"])}),
                            evaluate_fn=global_evaluate)
    arrays = result.arrays if len(result.arrays) else ArrayRecord(Net().state_dict())
    if cfg["remove-client"]:
        arrays, report = strategy.remove(grid, str(cfg["remove-client"]),
                                         evaluate_fn=global_evaluate)
        log(INFO, "removed client %s: %s", cfg["remove-client"], json.dumps(
            {k: report[k] for k in ("method", "metrics_before", "metrics_after")}))
    if cfg["final-model"]:
        state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        save_file(state, str(cfg["final-model"]))
        log(INFO, "final model written to %s", cfg["final-model"])
