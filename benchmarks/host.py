"""The host a benchmark figure belongs to: what memory.py and filter_gradient.py print first."""

import os

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def host_description() -> str:
    """The CPU model, its oneDNN-relevant flags, the core count and any ONEDNN_MAX_CPU_ISA cap: the
    host a figure belongs to."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [flag for flag in ISA_FLAGS if flag in flags] or ["none of " + ", ".join(ISA_FLAGS)]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    text = f"{model}, {os.cpu_count()} cores, flags: {' '.join(isa)}"
    return text + (f"; ONEDNN_MAX_CPU_ISA={cap} (oneDNN limited to it)" if cap else "")
