"""Check relaxlm's NCCL binding (runtime/nccl.py) and tensor-parallel shards on CUDA GPUs.

    python scripts/nccl_check.py                      # the collective alone
    python scripts/nccl_check.py --compile-only DIR   # here: a checkpoint whole and in 2 shards
    python scripts/nccl_check.py --run-only DIR       # on the GPU machine

The collective: on each GPU a one-rank communicator all-reduces float32, float16 and bfloat16
tensors that TVM allocated (sum, max, avg: the input comes back); with two or more GPUs, one
communicator over all of them (a thread per GPU, as Disco's ThreadedSession runs workers) sums
rank-dependent data, compared with numpy. NCCL refuses two ranks on one GPU, so a one-GPU
machine checks only the first part.

--compile-only writes a tiny GQA Llama compiled for `--target` whole and in 2 shards (the weights
are small: it travels); --run-only, where at least 2 GPUs are visible, runs both with relaxlm's
runtime and compares their logits through prefill, decode, fork and popn
(relaxlm/testing/split_parity.py), in float16's tolerance. Prints one line per check; exits 1 if
one fails.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np

SHARDS = 2


def check_collective() -> list[tuple[str, bool, str]]:
    """(check, passed, detail) rows for the binding on every visible GPU."""
    import tvm

    from relaxlm.runtime import nccl

    rows = [("libnccl loads", True, f"NCCL {nccl.version()}")]
    gpus = [i for i in range(16) if tvm.cuda(i).exist]
    if not gpus:
        return rows + [("a CUDA GPU is visible", False, "tvm.cuda(0).exist is False")]
    for gpu in gpus:
        comm = nccl.Communicator(nccl.unique_id(), 1, 0, gpu)
        for dtype in ("float32", "float16", "bfloat16"):
            for kind, name in ((0, "sum"), (3, "max"), (4, "avg")):
                send = np.arange(1000, dtype="float32").astype(_numpy_dtype(dtype))
                got = _allreduce(comm, send, dtype, kind, tvm.cuda(gpu))
                ok = np.array_equal(got.astype("float32"), send.astype("float32"))
                rows.append((f"cuda:{gpu} 1 rank {name} {dtype}", ok, ""))
    if len(gpus) >= 2:
        rows.append(_across(gpus))
    return rows


def _across(gpus: list[int]) -> tuple[str, bool, str]:
    """One communicator over `gpus`, a thread per rank; every rank's sum against numpy."""
    import tvm

    from relaxlm.runtime import nccl

    uid, results = nccl.unique_id(), {}
    sends = [np.full(4096, rank + 1, "float32") * np.arange(4096, dtype="float32") for rank in gpus]

    def rank(r: int) -> None:
        comm = nccl.Communicator(uid, len(gpus), r, gpus[r])
        results[r] = _allreduce(comm, sends[r], "float32", 0, tvm.cuda(gpus[r]))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(gpus))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    expected = np.sum(sends, axis=0)
    ok = len(results) == len(gpus) and all(np.array_equal(v, expected) for v in results.values())
    return (f"{len(gpus)} GPUs, 1 communicator: sum", ok, f"{len(results)} ranks answered")


def _allreduce(comm, send: np.ndarray, dtype: str, kind: int, device) -> np.ndarray:
    import tvm

    a = tvm.runtime.tensor(send, device)
    b = tvm.runtime.empty(send.shape, dtype, device)
    comm.allreduce(a.data_ptr(), b.data_ptr(), send.size, dtype, kind)
    device.sync()
    return b.numpy()


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return dtype


def compile_pair(folder: Path, target: str) -> None:
    import relaxlm
    from relaxlm.testing.tiny_models import make_model

    checkpoint = make_model(folder / "checkpoint", num_attention_heads=8, num_key_value_heads=4)
    for name, shards in (("whole", 1), ("sharded", SHARDS)):
        relaxlm.compile(
            checkpoint,
            output=folder / name,
            target=target,
            dtype="float16",
            tensor_parallel=shards,
            progress=False,
        )


def run_pair(folder: Path) -> tuple[str, bool, str]:
    import tvm

    from relaxlm.runtime.model import CompiledModel
    from relaxlm.testing.split_parity import assert_split_equals_whole

    if not tvm.cuda(SHARDS - 1).exist:
        return (f"{SHARDS} shards on {SHARDS} GPUs", False, f"fewer than {SHARDS} GPUs here")
    whole = CompiledModel(folder / "whole", device="cuda:0", max_batch_size=4)
    sharded = CompiledModel(folder / "sharded", device="cuda", max_batch_size=4)
    try:
        worst = assert_split_equals_whole(whole, sharded, atol=2e-2, decode_steps=4)
    except AssertionError as e:
        return (f"{SHARDS} shards against whole", False, str(e).splitlines()[0])
    return (f"{SHARDS} shards against whole", True, f"max |diff| {worst:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", type=Path, metavar="DIR")
    ap.add_argument("--run-only", type=Path, metavar="DIR")
    ap.add_argument("--target", default="cuda")
    args = ap.parse_args()
    if args.compile_only:
        compile_pair(args.compile_only, args.target)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_check import load_runtime_plugins

    load_runtime_plugins("cuda")
    rows = check_collective()
    if args.run_only:
        rows.append(run_pair(args.run_only))
    for name, ok, detail in rows:
        print(f"{'ok  ' if ok else 'FAIL'} {name:<40} {detail}")
    sys.exit(0 if all(ok for _, ok, _ in rows) else 1)


if __name__ == "__main__":
    main()
