"""The manifest's schema: what `Manifest.read` accepts before anything native sees an artifact.

A damaged manifest must be one clear error, never a traceback or a crash in a kernel (a page
size of 0 divides by zero in the KV cache; a wrong vocabulary size reads past the embedding
table). The types are checked by pydantic; the relations between fields (each parameter's
shard exists, files stay inside the artifact) below it.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as _ValidationError

from .safetensors_io import DTYPES

Positive = Field(ge=1)


class _Open(BaseModel):
    # Fields a later relaxlm may add are kept; only the ones read here are checked.
    model_config = ConfigDict(extra="allow", strict=True)


class Param(_Open):
    name: StrictStr
    shape: list[StrictInt]
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    shard: StrictStr


class ShardFile(_Open):
    size: StrictInt = Field(ge=0)
    sha256: StrictStr


class Library(ShardFile):
    library: StrictStr


class Stage(Library):
    device: StrictStr
    layers: list[StrictInt] = Field(min_length=2, max_length=2)
    params: list[StrictStr]
    kv_cache: dict[str, Any]


class TensorParallel(_Open):
    shards: StrictInt = Field(ge=2)
    split: dict[str, StrictInt]
    workers: list[list[StrictStr]]


class KVCache(_Open):
    page_size: StrictInt = Positive
    num_layers: StrictInt = Positive
    num_q_heads: StrictInt = Positive
    num_kv_heads: StrictInt = Positive
    head_dim: StrictInt = Positive


class LoraAdapter(_Open):
    path: StrictStr
    sha256: StrictStr
    r: StrictInt = Positive
    alpha: StrictInt | StrictFloat
    target_modules: list[StrictStr] | StrictStr | None


class LoraSlotTarget(_Open):
    in_: StrictInt = Field(alias="in", gt=0)
    out: StrictInt = Positive
    A: StrictStr
    B: StrictStr


class LoraSlots(_Open):
    slots: StrictInt = Positive
    max_rank: StrictInt = Positive
    targets: dict[str, LoraSlotTarget] = Field(min_length=1)


class TokenizerFiles(_Open):
    files: list[StrictStr]


class ManifestSchema(_Open):
    relaxlm_version: StrictStr
    tvm_version: StrictStr
    architecture: StrictStr
    model_config_: dict[str, Any] = Field(alias="model_config")
    dtype: StrictStr
    quantization: dict[str, Any]
    context_window: StrictInt = Positive
    prefill_chunk_size: StrictInt = Positive
    vocab_size: StrictInt = Positive
    kv_cache: dict[str, Any]
    params: list[Param]
    shards: dict[str, ShardFile]
    targets: dict[str, Library]
    tokenizer: TokenizerFiles
    source: dict[str, Any] = {}
    task: Literal["generate", "embed", "transcribe", "synthesize"] = "generate"
    embedding: dict[str, Any] = {}
    lora: list[LoraAdapter] = []  # older artifacts have none
    lora_slots: dict[str, Any] = {}  # artifacts without adapter slots have none
    vision: dict[str, Any] = {}  # text models have none
    speech: dict[str, Any] = {}  # speech models only
    stages: list[Stage] = []  # models split across devices only
    tensor_parallel: dict[str, Any] = {}  # tensor-parallel shards only
    format: StrictStr
    format_version: StrictInt
    created: StrictStr = ""


def manifest_problems(data: Any) -> list[str]:
    """What is wrong with a parsed manifest.json, one line per problem; empty when it is sound."""
    if not isinstance(data, dict):
        return [f"the manifest is a JSON {type(data).__name__}, not an object"]
    try:
        manifest = ManifestSchema.model_validate(data)
    except _ValidationError as e:
        return [f"field {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5]]
    problems = []
    if manifest.task in ("generate", "transcribe"):
        try:
            KVCache.model_validate(manifest.kv_cache)
        except _ValidationError as e:
            problems += [
                f"field kv_cache.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                for err in e.errors()[:5]
            ]
    names = [p.name for p in manifest.params]
    if len(set(names)) != len(names):
        problems.append("a parameter name appears twice in params")
    if manifest.lora_slots:
        try:
            slots = LoraSlots.model_validate(manifest.lora_slots)
        except _ValidationError as e:
            problems += [
                f"field lora_slots.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                for err in e.errors()[:5]
            ]
        else:
            weights = [w for t in slots.targets.values() for w in (t.A, t.B)]
            if missing := [w for w in weights if w not in set(names)]:
                problems.append(f"lora_slots names weights params lacks: {', '.join(missing[:3])}")
    for k, stage in enumerate(manifest.stages):
        if missing := [n for n in stage.params if n not in set(names)]:
            problems.append(f"stage {k} takes parameters params lacks: {', '.join(missing[:3])}")
        try:
            KVCache.model_validate(stage.kv_cache)
        except _ValidationError:
            problems.append(f"stage {k} has a damaged kv_cache")
    if manifest.tensor_parallel:
        try:
            tp = TensorParallel.model_validate(manifest.tensor_parallel)
        except _ValidationError:
            problems.append("tensor_parallel is damaged (shards >= 2, split, workers)")
        else:
            if len(tp.workers) != tp.shards:
                problems.append(f"tensor_parallel lists {len(tp.workers)} workers for {tp.shards}")
            for k, worker in enumerate(tp.workers):
                if missing := [n for n in worker if n not in set(names)]:
                    problems.append(f"shard {k} takes parameters params lacks: {missing[:3]}")
    ends = [0, *(s.layers[1] for s in manifest.stages)]
    stages = enumerate(manifest.stages)
    if any(s.layers[0] != ends[k] or s.layers[1] <= s.layers[0] for k, s in stages):
        problems.append("stages do not cover the layers in order, each at least one")
    for p in manifest.params:
        if p.shard not in manifest.shards:
            problems.append(f"parameter {p.name} lies in shard {p.shard!r}, which shards lacks")
        if any(d < 0 for d in p.shape):
            problems.append(f"parameter {p.name} has a negative dimension {p.shape}")
    files = [
        *manifest.shards,
        *(t.library for t in manifest.targets.values()),
        *(s.library for s in manifest.stages),
        *manifest.tokenizer.files,
    ]
    problems += [f"file {f!r} lies outside the artifact" for f in files if not _inside(f)]
    config_vocab = manifest.model_config_.get("vocab_size")
    if isinstance(config_vocab, int) and config_vocab != manifest.vocab_size:
        problems.append(
            f"vocab_size {manifest.vocab_size} differs from the model config's {config_vocab}"
        )
    return problems[:5]


def _inside(relative: str) -> bool:
    parts = relative.split("/")
    return bool(relative) and not relative.startswith("/") and ".." not in parts


def param_problems(params: list[dict], shards: list[str], index: dict) -> list[str]:
    """How the manifest's params disagree with the tensors in the shards (`index`: name ->
    TensorInfo); empty when every parameter is there, as declared, in the written order."""
    problems = []
    missing = [p["name"] for p in params if p["name"] not in index]
    if missing:
        problems.append(f"params not in the shards: {', '.join(missing[:5])}")
    declared = {p["name"] for p in params}
    if extra := [name for name in index if name not in declared]:
        problems.append(f"shard tensors the manifest does not list: {', '.join(extra[:5])}")
    for p in params:
        info = index.get(p["name"])
        if info is not None and (list(info.shape), info.dtype) != (p["shape"], DTYPES[p["dtype"]]):
            problems.append(
                f"{p['name']} is {list(info.shape)} {info.dtype} in its shard, "
                f"{p['shape']} {p['dtype']} in the manifest"
            )
    # The compiler writes the tensors in the graph's parameter order; the library takes them
    # in that order, so a manifest listing them otherwise would bind the wrong weights.
    placed = [
        (shards.index(p["shard"]), index[p["name"]].offset) for p in params if p["name"] in index
    ]
    if placed != sorted(placed):
        problems.append("params are not listed in the order they were written")
    return problems[:5]
