"""One rank of a real launch reports the process group ``ted_ds.distributed.init`` started.

    mpirun -np 2 -x MASTER_PORT=<p> python tests/harness/mp/group_port.py

Each rank prints one JSON line: its rank, world size, LOCAL_RANK, MASTER_ADDR, and the port of the
group's store (the TCP store rank 0 listens on), then a gloo all-reduce of the ranks proves the
group works.
"""

import json
import os

import torch
import torch.distributed as dist

from ted_ds import distributed

distributed.init(1)
store = dist.distributed_c10d._get_default_store()
while hasattr(store, "underlying_store"):  # env:// wraps the TCP store in PrefixStores
    store = store.underlying_store
total = distributed.all_reduce_sum(torch.tensor([float(distributed.rank())]))
print(json.dumps({"rank": distributed.rank(), "world": distributed.world_size(), "local_rank": os.environ["LOCAL_RANK"],
                  "master_addr": os.environ["MASTER_ADDR"], "store_port": store.port, "sum": total.item()}), flush=True)
distributed.shutdown()
distributed.leave(0)
