"""Where a hosted model's tensors live: the dtype and device options of ``hookwire serve`` /
``start()``, the device inputs go to, and the rule for everything a request brings along.

A request's constants, resident values and seeded random draws are placed on the device of
the activation they meet, when they meet it (``hookwire.executor``): with a model spread over
several devices (``--device-map``) the activation at layer 20 may live on another GPU than
the one at layer 2.
"""
from __future__ import annotations

import torch

from hookwire.families import DTYPES


def parse_dtype(dtype) -> torch.dtype | None:
    """``"auto"``/None (keep: a checkpoint's own dtype, float32 for built-in models),
    ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")


def parse_device(device) -> torch.device | None:
    """None (the CPU for models built or loaded here; objects stay where they are),
    ``"auto"`` (the first GPU if there is one), ``"cpu"``, ``"cuda"``, ``"cuda:N"``."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA device")
        index = parsed.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        parsed = torch.device("cuda", index)
    return parsed


def input_device(hf_model) -> torch.device:
    device_map = getattr(hf_model, "hf_device_map", None)
    if device_map:
        # accelerate's dispatch: inputs go to the first device that is not offloaded.
        devices = [d for d in device_map.values() if d not in ("cpu", "disk", "meta")]
        main = devices[0] if devices else "cpu"
        return torch.device(f"cuda:{main}" if isinstance(main, int) else main)
    for p in hf_model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


__all__ = ["parse_dtype", "parse_device", "input_device", "model_dtype"]
