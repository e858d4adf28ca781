"""A communication failure named by its collective and caller."""

from __future__ import annotations


def test_a_communication_failure_is_named_by_its_collective_and_caller():
    from ted_ds.distributed import failed_collective

    c10d = "/site-packages/torch/distributed/distributed_c10d.py"
    namespace: dict = {}
    exec(compile("def all_gather_into_tensor():\n    raise RuntimeError('Timed out waiting 30000ms for recv')\n",
                 c10d, "exec"), namespace)

    def gather_params():  # a caller, as DeepSpeed's or ours would be
        namespace["all_gather_into_tensor"]()

    def raised(fn):
        try:
            fn()
        except RuntimeError as e:
            return e

    name = failed_collective(raised(gather_params))
    assert name.startswith("all_gather_into_tensor (called by ") and name.endswith(".gather_params)"), name

    def wait_on_handle():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")

    assert failed_collective(raised(wait_on_handle)).startswith("wait() of an asynchronous collective (called by ")

    def not_comm():
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    assert failed_collective(raised(not_comm)) is None
