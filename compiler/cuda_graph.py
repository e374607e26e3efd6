"""CUDA graphs for decode: TVM's RewriteCUDAGraph, told what it may capture.

`relax.transform.RewriteCUDAGraph` (in TVM's default build pipeline, enabled by the PassContext
key below) lifts runs of kernel launches into functions that `vm.builtin.cuda_graph.
run_or_capture` records once per shape and then replays, and moves statically planned storage
into `vm.builtin.cuda_graph.get_cached_alloc`. On relaxlm's graph it captures nothing unless
told two things about `decode`:

- an upper bound on `batch_size` (`tir_var_upper_bound`): without it every activation's
  storage has a symbolic size, memory planning leaves it dynamic and no launch is static;
- `batch_size` as a capture key (`relax.rewrite_cuda_graph.capture_symbolic_vars`): a
  symbolic input dimension is otherwise never static; with it, one graph per batch size.

Even then a decode step is not one graph: each layer's attention is a call into the paged KV
cache (`vm.builtin.attention_kv_cache_*`), and the pass never captures a `vm.builtin` call
(the cache's auxiliary data is built on the host each step), so a step replays num_layers + 1
graphs around num_layers attention calls; the token-embedding gather (it reads `input_ids`, an
input, not a static buffer) and the logits head (its output leaves the function) run outside.
Prefill keeps its launches: its `seq_len` takes any value up to the chunk, a graph each.
"""

import tvm
from tvm import relax

# TVM's PassContext key that switches RewriteCUDAGraph on (off by default).
USE_CUDA_GRAPH = "relax.backend.use_cuda_graph"
CAPTURED_FUNCTIONS = ("decode",)
BATCH_VAR = "batch_size"


def mark_for_capture(mod: tvm.IRModule, max_batch_size: int) -> tvm.IRModule:
    """`mod` with its decode function annotated so RewriteCUDAGraph captures its kernels, one
    graph per batch size up to `max_batch_size` (the size memory is planned for)."""
    functions = {}
    for gvar, func in mod.functions.items():
        if gvar.name_hint in CAPTURED_FUNCTIONS and isinstance(func, relax.Function):
            func = func.with_attr("tir_var_upper_bound", {BATCH_VAR: max_batch_size})
            func = func.with_attr("relax.rewrite_cuda_graph.capture_symbolic_vars", [BATCH_VAR])
        functions[gvar] = func
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)
