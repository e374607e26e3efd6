"""Where a decode step's time goes: every call the VM makes in one artifact's `decode`, timed.

Prefills a prompt, then times single-sequence decode steps call by call through the VM's
instrument hook (TVM 0.27 has no VM profiler): kernels and builtins by total time per step,
and the part of the step no call accounts for (the VM's own work, argument packing).
The hook's Python callback adds a few microseconds per call and lets TVM's worker threads fall
asleep between kernels (each multi-threaded kernel then pays a wake-up), so the step is slower
than in `relaxlm bench`; read the ranking and the call counts, not the absolute times.

On a GPU (`--device cuda`) kernels launch asynchronously, so the device is synchronized before
and after every call: each call's time is its kernel's (plus a few microseconds of sync and
launch), and the step is the sum of serialized calls, slower than the plain step printed first.
A runtime-only TVM (TVM_USE_RUNTIME_LIB=1) gets its device plugin loaded as in gpu_check.py.

    python scripts/profile_decode.py ARTIFACT [--threads 2] [--steps 8] [--prompt 64]
    python scripts/profile_decode.py ARTIFACT --device cuda --prompt 128

With --prefill, the same for the prefill of a `--prompt`-token prompt instead.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from relaxlm.runtime.loader import library_for_device, load_library
from relaxlm.runtime.model import CompiledModel

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import load_runtime_plugins  # a sibling script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--prefill", action="store_true", help="time prefill, not decode steps")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    args = ap.parse_args()

    kind = args.device.split(":")[0]
    load_runtime_plugins(kind)
    model = CompiledModel(args.artifact, device=args.device, max_batch_size=1, threads=args.threads)
    library = library_for_device(model.folder, model.manifest, args.device)
    vm = VirtualMachine(load_library(library, kind), model.device)
    sync = model.device.sync  # the CPU's returns at once: its kernels are synchronous
    begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end = tvm.get_global_func("vm.builtin.kv_state_end_forward")

    rng = np.random.default_rng(0)
    model.add_sequence(0)
    model.prefill([0], [rng.integers(0, model.vocab_size, args.prompt).tolist()])
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    started: list[float] = []

    def instrument(_func, symbol, before, _ret, *_args):
        sync()  # the previous call's kernels finish outside this call's time, this one's inside
        if before:
            started.append(time.perf_counter())
        else:
            totals[symbol] += time.perf_counter() - started.pop()
            counts[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    decode, prefill = vm["decode"], vm["prefill"]
    popn = tvm.get_global_func("vm.builtin.kv_state_popn")

    def run_step() -> float:
        if args.prefill:  # the prompt again, over the same positions
            popn(model.kv_cache, 0, args.prompt)
            tokens = rng.integers(0, model.vocab_size, (1, args.prompt)).astype("int32")
            inputs = [
                tvm.runtime.tensor(tokens, model.device),
                tvm.runtime.tensor(np.array([args.prompt - 1], "int32"), model.device),
            ]
            begin(model.kv_cache, ShapeTuple([0]), ShapeTuple([args.prompt]))
            function = prefill
        else:
            token = np.array([[int(rng.integers(model.vocab_size))]], "int32")
            inputs = [tvm.runtime.tensor(token, model.device)]
            begin(model.kv_cache, ShapeTuple([0]), ShapeTuple([1]))
            function = decode
        sync()
        start = time.perf_counter()
        function(*inputs, model.kv_cache, model.params)
        sync()
        elapsed = time.perf_counter() - start
        end(model.kv_cache)
        return elapsed

    run_step()  # warm-up
    plain = min(run_step() for _ in range(args.steps))
    vm.set_instrument(instrument)
    step = sum(run_step() for _ in range(args.steps))
    n = args.steps
    what = f"prefill of {args.prompt} tokens" if args.prefill else "decode step"
    print(f"{what}: {plain * 1e3:.3f} ms (VM call alone, best of {n})")
    print(f"{what}: {step / n * 1e3:.3f} ms (instrumented), {sum(counts.values()) / n:.0f} calls")
    print(f"{'call':60s} {'calls':>6s} {'us/step':>9s} {'share':>6s}")
    for symbol, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        per_step = counts[symbol] / n
        print(f"{symbol[:60]:60s} {per_step:6.0f} {total / n * 1e6:9.1f} {total / step:6.1%}")
    rest = step - sum(totals.values())
    print(f"{'(outside calls: VM dispatch)':60s} {'':6s} {rest / n * 1e6:9.1f} {rest / step:6.1%}")


if __name__ == "__main__":
    main()
