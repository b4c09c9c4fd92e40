"""The packed layout of integer codes: the one definition, for torch tensors and numpy arrays.

Layout (the same as ONNX INT4/UINT4 and INT2/UINT2 tensors): codes are packed along the last
dimension (numpy: over the flattened array, as ONNX raw data), little end first. For 4-bit codes
byte j holds element 2j in bits 0-3 and element 2j+1 in bits 4-7. For 2-bit codes byte j holds
element 4j+i in bits 2i..2i+1. 3-bit codes are stored in 4-bit containers, 6-bit codes in bytes
(neither ONNX nor the kernels have a 3- or 6-bit type).

The checkpoint (QuantLinear), the ONNX lowering and the kernels' tests all pack and unpack here.
torch is imported only by the torch functions, so the scheme can ask `container_bits` cheaply.
"""

from __future__ import annotations

import numpy as np

from lrq_deploy.errors import LrqError

__all__ = ["container_bits", "pack_array", "pack_codes", "unpack_array", "unpack_codes"]

_CONTAINER = {2: 2, 3: 4, 4: 4, 6: 8, 8: 8}


def container_bits(bits: int) -> int:
    if bits not in _CONTAINER:
        raise LrqError(f"no packed layout for {bits}-bit codes (supported: {sorted(_CONTAINER)})")
    return _CONTAINER[bits]


def _shifts(width: int) -> tuple[int, list[int]]:
    per_byte = 8 // width
    return per_byte, [i * width for i in range(per_byte)]


def pack_codes(codes, bits: int):
    """torch uint8 codes [..., K] -> packed uint8 [..., K * container_bits / 8]."""
    import torch

    width = container_bits(bits)
    if codes.dtype != torch.uint8:
        raise LrqError(f"codes must be uint8, got {codes.dtype}")
    if int(codes.max()) >= 2**bits if codes.numel() else False:
        raise LrqError(f"codes exceed the {bits}-bit range")
    per_byte, shifts = _shifts(width)
    if codes.shape[-1] % per_byte:
        raise LrqError(f"last dimension {codes.shape[-1]} is not a multiple of {per_byte} for {bits}-bit packing")
    if per_byte == 1:
        return codes.contiguous()
    parts = codes.reshape(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    return (parts << torch.tensor(shifts, dtype=torch.int32, device=codes.device)).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed, bits: int):
    """Inverse of pack_codes (torch)."""
    import torch

    width = container_bits(bits)
    per_byte, shifts = _shifts(width)
    if per_byte == 1:
        return packed.contiguous()
    parts = (packed.to(torch.int32).unsqueeze(-1) >> torch.tensor(shifts, dtype=torch.int32, device=packed.device))
    return (parts & (2**width - 1)).reshape(*packed.shape[:-1], -1).to(torch.uint8)


def pack_array(codes: np.ndarray, bits: int) -> bytes:
    """Codes (unsigned, or signed in two's complement) packed over the flattened array, as ONNX
    raw data: the last byte is padded with zeros when the count is not a multiple of a byte."""
    width = container_bits(bits)
    flat = (np.asarray(codes).astype(np.int16).reshape(-1) & (2**width - 1)).astype(np.uint8)
    per_byte, shifts = _shifts(width)
    if per_byte == 1:
        return flat.tobytes()
    flat = np.concatenate([flat, np.zeros((-flat.size) % per_byte, np.uint8)])
    parts = flat.reshape(-1, per_byte).astype(np.uint32) << np.array(shifts, dtype=np.uint32)
    return parts.sum(axis=1).astype(np.uint8).tobytes()


def unpack_array(packed, bits: int, count: int | None = None, signed: bool = False) -> np.ndarray:
    """Inverse of pack_array: packed bytes (or a uint8 array, unpacked along its last dimension)
    -> int16 codes; `count` keeps the first codes of the flattened result (drops padding)."""
    width = container_bits(bits)
    data = np.frombuffer(packed, dtype=np.uint8) if isinstance(packed, (bytes, bytearray)) else np.asarray(packed, np.uint8)
    per_byte, shifts = _shifts(width)
    if per_byte == 1:
        values = data.astype(np.int16)
    else:
        values = ((data[..., None] >> np.array(shifts, dtype=np.uint8)) & (2**width - 1)).astype(np.int16)
        values = values.reshape(*data.shape[:-1], -1)
    if count is not None:
        values = values.reshape(-1)[:count]
    if signed:
        values = np.where(values >= 2 ** (width - 1), values - 2**width, values).astype(np.int16)
    return values
