"""Reading a built IRModule in tests."""

import re

import tvm


def called_kernels(mod: tvm.IRModule, function: str, containing: str = "") -> list[str]:
    """The PrimFuncs Relax function `function` calls (R.call_tir), by name, those whose name
    contains `containing`."""
    called = set(re.findall(r"R\.call_tir\((?:cls\.)?(\w+),", mod[function].script()))
    return sorted(name for name in called if containing in name)
