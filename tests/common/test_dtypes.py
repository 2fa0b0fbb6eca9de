"""The one dtype table: every spelling of a dtype agrees with torch, protobuf and safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from common.dtypes import DTYPES, UnknownDtype, dtype_name, row_of, torch_dtype, wire_row
from common.errors import InvalidRequest
from common.protocol import pb2
from common.wire import dtype_from_wire, dtype_to_wire


@pytest.mark.parametrize("row", DTYPES, ids=lambda r: r.name)
def test_row_agrees_with_torch_protobuf_and_safetensors(row):
    assert getattr(torch, row.name) is row.torch
    assert torch.empty((), dtype=row.torch).element_size() == row.element_bytes
    assert pb2.DType.Name(row.wire) == f"DTYPE_{row.name.upper()}"
    # safetensors writes the tag in the file header: read it from a real file.
    blob = save({"t": torch.zeros(1, dtype=row.torch)})
    assert f'"dtype":"{row.safetensors}"' in blob[8:].decode("utf-8", "replace")
    assert torch_dtype(row.name) is row.torch and dtype_name(row.torch) == row.name
    assert dtype_from_wire(dtype_to_wire(row.torch)) is row.torch and wire_row(row.wire) is row


def test_unknown_dtypes_are_refused_with_the_choices():
    with pytest.raises(UnknownDtype, match="choose from bfloat16, float16, float32"):
        row_of("int8")
    with pytest.raises(InvalidRequest, match="DTYPE_BFLOAT16, DTYPE_FLOAT16, DTYPE_FLOAT32"):
        dtype_from_wire(99)
    with pytest.raises(InvalidRequest):
        dtype_to_wire(torch.int8)
