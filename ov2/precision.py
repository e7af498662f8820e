"""Precision that fits the hardware: `bf16: auto` (the default of every training and evaluation config).

    use, why = resolve_bf16("auto", torch.device("cpu"))   # (False, "this CPU multiplies bf16 in software (AVX2)")
    use = announce("auto", device, run=out)                 # the same, said once on stderr and kept in status.json
    check_bf16("yes", "stage1.bf16")                        # -> "true"; ConfigError for anything but auto/true/false

`auto` turns bf16 autocast on only where the device multiplies bf16 natively: a CUDA device of compute capability
8.0 or more, or a CPU where oneDNN reports bf16 support (avx512_bf16 or AMX). Elsewhere bf16 is emulated and slow
(an AVX2-only CPU ran a LLaVA step 28x slower under bf16 autocast than in float32), so `auto` means float32 there.
`true` and `false` force it either way. `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` makes a newer CPU
report what an AVX2-only one does.
"""

from __future__ import annotations

import sys

import torch

from ov2.config import ConfigError

CHOICES = ("auto", "true", "false")
_WORDS = {"auto": "auto", "true": "true", "1": "true", "yes": "true", "on": "true",
          "false": "false", "0": "false", "no": "false", "off": "false"}


def check_bf16(value, key: str = "bf16") -> str:
    """A config value (bool or string) as one of auto / true / false, or ConfigError naming `key`."""
    word = _WORDS.get(str(value).strip().lower())
    if word is None:
        raise ConfigError(f"{key}: expected auto, true or false, got {value!r}")
    return word


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` multiplies bf16 natively, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        return native, f"CUDA compute capability {major}.{minor} ({'>=' if native else '<'} 8.0)"
    if device.type == "cpu":
        isa = torch.backends.cpu.get_cpu_capability()
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True, f"this CPU multiplies bf16 natively (oneDNN bf16, {isa})"
        return False, f"this CPU multiplies bf16 in software ({isa}, no avx512_bf16 or AMX)"
    return False, f"no native bf16 known for device type {device.type!r}"


def resolve_bf16(setting, device: torch.device | str) -> tuple[bool, str]:
    """(use bf16 autocast, a line saying why) for a setting auto / true / false on `device`."""
    word = check_bf16(setting)
    if word != "auto":
        return word == "true", f"bf16: {word} (forced)"
    native, why = native_bf16(device)
    return native, f"bf16: auto -> {'bf16 autocast' if native else 'float32'}: {why}"


def announce(setting, device: torch.device | str, run=None, main: bool = True) -> bool:
    """resolve_bf16, with its line said once (by the main process) on stderr and recorded as `precision` in the
    status.json of the run folder `run` (a running stage's); returns whether to use bf16 autocast."""
    use, line = resolve_bf16(setting, device)
    if main:
        print(line, file=sys.stderr, flush=True)
        if run is not None:
            from ov2.runfolder import write_status

            write_status(run, "running", precision=line)
    return use
