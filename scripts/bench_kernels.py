"""Time one weight matmul (decode GEMV or prefill GEMM) per quantization scheme.

Builds `y = x @ W.T` through the same passes and CPU schedules as a model compile, runs it
with the best of many repeats (robust on a noisy host), and prints GB/s of weights streamed
next to GFLOP/s.

    python scripts/bench_kernels.py --n 32000 --k 768 --m 1 --quant q4 q8 none
"""

import argparse
import time

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.runtime.vm import VirtualMachine

from relaxlm.compiler import schedules
from relaxlm.compiler.fuse_dequantize_matmul import FuseDequantizeMatmul
from relaxlm.compiler.int8_dot import int8_dot_flavour
from relaxlm.compiler.pipeline import scheme_for_targets
from relaxlm.compiler.quantization import quantize, resolve_scheme
from relaxlm.compiler.quantize_weights import quantize_weights
from relaxlm.compiler.targets import resolve_target


class _Linear(nn.Module):
    def __init__(self, n: int, k: int):
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.proj(x)


def build(n: int, k: int, quant: str, target: str = "cpu"):
    preset = resolve_target(target)
    spec = {
        "forward": {
            "x": nn.spec.Tensor([1, "m", k], "float32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, _ = _Linear(n, k).export_tvm(spec)
    scheme = scheme_for_targets(resolve_scheme(quant), [preset], "float32", None)
    plan = None
    if scheme:
        int8_dot = int8_dot_flavour(preset.target())
        mod, plan = quantize_weights(mod, scheme, "float32")
        mod = FuseDequantizeMatmul(int8_dot)(mod)
    mod = tvm.transform.Sequential(
        [
            relax.transform.FuseTransposeMatmul(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(mod)
    target = preset.target()
    with target:
        mod = schedules.for_target(preset)(mod)
    ex = relax.build(mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline())
    w = np.random.default_rng(0).standard_normal((n, k)).astype("float32")
    parts = quantize(scheme, w, np.float32) if scheme else [w]
    nbytes = sum(p.nbytes for p in parts)
    return VirtualMachine(ex, tvm.cpu()), [tvm.runtime.tensor(p) for p in parts], nbytes, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32000)
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--m", type=int, default=1, help="rows of x: 1 = decode GEMV")
    ap.add_argument("--quant", nargs="+", default=["none", "q8", "q4"])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--target", default="cpu", help="a CPU this one runs the code of: cpu:haswell")
    args = ap.parse_args()
    x = tvm.runtime.tensor(
        np.random.default_rng(1).standard_normal((1, args.m, args.k)).astype("float32")
    )
    for quant in args.quant:
        vm, params, nbytes, _ = build(args.n, args.k, quant, args.target)
        f = vm["forward"]
        f(x, params)
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            f(x, params)
            best = min(best, time.perf_counter() - t)
        flops = 2 * args.m * args.n * args.k
        print(
            f"{quant:8s} m={args.m:4d} n={args.n} k={args.k}: {best * 1e3:7.3f} ms  "
            f"{nbytes / best / 1e9:6.2f} GB/s of weights  {flops / best / 1e9:7.1f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
