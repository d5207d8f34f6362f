"""Write each client's partition of the run's packaged dataset to its own data file, the
form a SuperNode loads through ``--node-config 'data-path="..."'`` (docs/deployment.md).

    python -m simulations.export_partitions OUT_DIR [key=value ...]   # run-config overrides
    python -m simulations.export_partitions --help

Writes ``OUT_DIR/client-<i>.safetensors`` (tensors ``inputs``, float32 [n, features], and
``labels``, int64 [n]) for i < num-clients, with the same seeded split as the simulations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from simulations.flower_app import client_partition
from simulations.runner import app_run_config, load_config, plain

USAGE = "usage: python -m simulations.export_partitions OUT_DIR [key=value ...]"


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        load_config(argv, [app_run_config()], prog="export_partitions", doc=__doc__)
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise SystemExit(f"{USAGE}\n(see --help)")
    out = Path(argv[0])
    cfg = plain(load_config(argv[1:], [app_run_config()], prog="export_partitions",
                            doc=__doc__))
    out.mkdir(parents=True, exist_ok=True)
    for partition in range(int(cfg["num-clients"])):
        x, y = client_partition(cfg, partition)
        path = out / f"client-{partition}.safetensors"
        save_file({"inputs": x.contiguous(), "labels": y.contiguous()}, str(path))
        print(f"{path}: {len(y)} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
