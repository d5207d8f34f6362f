"""quickstart: the ClientApp. It answers FedUGM (a delta and a Fisher) and Flower's own
strategies (the trained weights) alike."""

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_ugm.client import ProximalTerm, client_id, handle_query, load_global, ugm_reply
from fl_ugm.fisher import diagonal_fisher
from quickstart.task import Net, load_data
from quickstart.task import test as test_fn
from quickstart.task import train as train_fn

app = ClientApp()
device = "cuda" if torch.cuda.is_available() else "cpu"


def data(context: Context):
    return load_data(int(context.node_config["partition-id"]),
                     int(context.node_config["num-partitions"]),
                     int(context.run_config["batch-size"]), str(context.run_config["dataset"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune the global model on local data under the server's prior."""
    model = Net().to(device)
    load_global(msg, model)
    trainloader, _ = data(context)
    n = len(trainloader.dataset)
    prox = ProximalTerm(msg, model, n)  # FedUGM's prior δ, FedProx's μ, or nothing
    loss = train_fn(model, trainloader, int(context.run_config["local-epochs"]),
                    float(msg.content["config"]["lr"]), prox, device)
    # Σ over the n examples of the squared per-example gradients (sampled labels)
    fisher = diagonal_fisher(model, trainloader)
    return ugm_reply(msg, model, fisher=fisher, num_examples=n, client_id=client_id(context),
                     metrics={"train_loss": loss})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local validation data."""
    model = Net().to(device)
    load_global(msg, model)
    _, valloader = data(context)
    loss, accuracy = test_fn(model, valloader, device)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy,
                            "num-examples": len(valloader.dataset)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node serves (removal, resumed runs)."""
    return handle_query(msg, client_id(context))
