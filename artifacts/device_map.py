"""Device maps: which device runs which decoder layers of a model split into pipeline stages.

    cuda:0:0-23,cpu:24-31      layers 0..23 on the first GPU, 24..31 on the CPU
    cpu:0:0-1,cpu:1:2-3        two CPU "devices" (TVM's cpu(0), cpu(1): one host, two VMs)

Each item is `DEVICE:LAYERS`: DEVICE a kind (`cpu`, `cuda`, `metal`, `vulkan`, `webgpu`) with an
optional ordinal (`cuda:1`; none means 0), LAYERS `a-b` (inclusive) or one layer `a`. Items
follow the layer order and together cover every layer once. The first stage also embeds the
tokens, the last also holds the final norm and the logits head. `--gpu-layers N` is the
llama.cpp spelling: the last N layers (and the logits head) on the GPU, the others and the
token embeddings on the CPU.

Shared by the compiler (which builds one library per stage) and the runtime (which loads each
stage on its device), so it imports nothing but relaxlm's errors.
"""

import re
from dataclasses import dataclass

from relaxlm.errors import RelaxlmError

DEVICE_KINDS = ("cpu", "cuda", "metal", "vulkan", "webgpu")
GPU_KINDS = DEVICE_KINDS[1:]
_ITEM = re.compile(r"(?P<kind>[a-z]+)(?::(?P<ordinal>\d+))?:(?P<first>\d+)(?:-(?P<last>\d+))?")
_EXAMPLE = "e.g. cuda:0:0-23,cpu:24-31"


@dataclass(frozen=True)
class Stage:
    """Decoder layers [first, end) on one device."""

    device: str  # "cpu:1", "cuda:0": kind and ordinal
    first: int
    end: int

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]

    def __str__(self) -> str:
        layers = f"{self.first}" if self.end == self.first + 1 else f"{self.first}-{self.end - 1}"
        return f"{self.device}:{layers}"


def parse_device_map(text: str) -> list[Stage]:
    """The stages of a device map string, in layer order; RelaxlmError naming the item that is
    malformed, names an unknown device, or overlaps, skips or reverses the layers before it.
    Whether the map covers a model's layers is `check_layers`'s business."""
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise RelaxlmError(f"device map {text!r} is empty; write DEVICE:LAYERS items, {_EXAMPLE}")
    stages: list[Stage] = []
    for item in items:
        m = _ITEM.fullmatch(item)
        if m is None:
            raise RelaxlmError(
                f"device map {text!r}: item {item!r} is not DEVICE:FIRST-LAST (layers counted "
                f"from 0, both included), {_EXAMPLE}"
            )
        if m["kind"] not in DEVICE_KINDS:
            raise RelaxlmError(
                f"device map {text!r}: unknown device {m['kind']!r} in {item!r}; devices are "
                f"{', '.join(DEVICE_KINDS)}, with an optional ordinal (cuda:1)"
            )
        first = int(m["first"])
        last = int(m["last"]) if m["last"] is not None else first
        if last < first:
            raise RelaxlmError(
                f"device map {text!r}: item {item!r} has its layers backwards; write {first}-{last}"
                f" as {last}-{first}"
            )
        stage = Stage(f"{m['kind']}:{int(m['ordinal'] or 0)}", first, last + 1)
        if stages:
            before = stages[-1]
            if first < before.end:
                raise RelaxlmError(
                    f"device map {text!r}: {item!r} overlaps {str(before)!r} (layer "
                    f"{first} is on both); give each layer one device, in layer order"
                )
            if first > before.end:
                missing = _layers(before.end, first)
                raise RelaxlmError(
                    f"device map {text!r}: layer{missing} on no device (between {str(before)!r} "
                    f"and {item!r}); give every layer a device, in layer order"
                )
        elif first != 0:
            raise RelaxlmError(
                f"device map {text!r}: layer{_layers(0, first)} on no device; the first item "
                "starts at layer 0"
            )
        stages.append(stage)
    return stages


def check_layers(stages: list[Stage], num_layers: int, text: str = "") -> None:
    """RelaxlmError unless the stages end exactly at the model's last layer."""
    what = f"device map {text!r}" if text else "the device map"
    end = stages[-1].end
    if end > num_layers:
        raise RelaxlmError(
            f"{what} names layer {end - 1}, but the model has {num_layers} layers "
            f"(0-{num_layers - 1})"
        )
    if end < num_layers:
        raise RelaxlmError(
            f"{what}: the model has {num_layers} layers, and layer{_layers(end, num_layers)} on "
            f"no device; extend the last item to {num_layers - 1}"
        )


def gpu_layers_map(gpu_layers: int, num_layers: int, gpu: str = "cuda") -> list[Stage]:
    """llama.cpp's `-ngl N`: the last N layers on the GPU (`gpu`, ordinal 0), the rest on the
    CPU; one stage when N is 0 or at least the layer count."""
    if not isinstance(gpu_layers, int) or gpu_layers < 0:
        raise RelaxlmError(f"gpu_layers={gpu_layers!r} is invalid; set it to an integer >= 0")
    if gpu not in GPU_KINDS:
        raise RelaxlmError(f"gpu_layers needs a GPU kind ({', '.join(GPU_KINDS)}), not {gpu!r}")
    split = max(num_layers - gpu_layers, 0)
    if split == 0:
        return [Stage(f"{gpu}:0", 0, num_layers)]
    if split == num_layers:
        return [Stage("cpu:0", 0, num_layers)]
    return [Stage("cpu:0", 0, split), Stage(f"{gpu}:0", split, num_layers)]


def resolve_stages(
    device_map: str | None, gpu_layers: int | None, num_layers: int, gpu: str = "cuda"
) -> list[Stage]:
    """The stages a device map or a GPU layer count asks for, checked against the model."""
    if device_map is not None and gpu_layers is not None:
        raise RelaxlmError("pass a device map or gpu_layers, not both")
    if device_map is not None:
        stages = parse_device_map(device_map)
        check_layers(stages, num_layers, device_map)
        return stages
    return gpu_layers_map(gpu_layers, num_layers, gpu)


def _layers(first: int, end: int) -> str:
    """' 3 is' / 's 3-5 are' for a message."""
    return f" {first} is" if end == first + 1 else f"s {first}-{end - 1} are"
