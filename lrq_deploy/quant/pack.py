"""Packing integer codes into bytes.

Layout (the same as ONNX INT4/UINT4 and INT2/UINT2 tensors): codes are packed along the last
dimension, little end first. For 4-bit codes byte j holds element 2j in bits 0-3 and element
2j+1 in bits 4-7. For 2-bit codes byte j holds element 4j+i in bits 2i..2i+1.
3-bit codes are stored in 4-bit containers, 6-bit codes in bytes (neither ONNX nor the
kernels have a 3- or 6-bit type).
"""

from __future__ import annotations

import torch

from lrq_deploy.errors import LrqError

__all__ = ["container_bits", "pack_codes", "unpack_codes"]

_CONTAINER = {2: 2, 3: 4, 4: 4, 6: 8, 8: 8}


def container_bits(bits: int) -> int:
    if bits not in _CONTAINER:
        raise LrqError(f"no packed layout for {bits}-bit codes (supported: {sorted(_CONTAINER)})")
    return _CONTAINER[bits]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., K] -> packed uint8 [..., K * container_bits / 8]."""
    width = container_bits(bits)
    if codes.dtype != torch.uint8:
        raise LrqError(f"codes must be uint8, got {codes.dtype}")
    if int(codes.max()) >= 2**bits if codes.numel() else False:
        raise LrqError(f"codes exceed the {bits}-bit range")
    per_byte = 8 // width
    if codes.shape[-1] % per_byte:
        raise LrqError(f"last dimension {codes.shape[-1]} is not a multiple of {per_byte} for {bits}-bit packing")
    if per_byte == 1:
        return codes.contiguous()
    parts = codes.reshape(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * width
    return (parts << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes."""
    width = container_bits(bits)
    per_byte = 8 // width
    if per_byte == 1:
        return packed.contiguous()
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * width
    parts = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**width - 1)
    return parts.reshape(*packed.shape[:-1], -1).to(torch.uint8)
