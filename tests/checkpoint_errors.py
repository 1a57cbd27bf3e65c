"""The check every format's tests make of check_checkpoint (engine/checkpoint/load.py): its
error for a bad checkpoint is one line, the loader's own."""

from __future__ import annotations

import pytest

from infermeter.engine.checkpoint.load import check_checkpoint, load_weights
from infermeter.errors import InfermeterError


def check_error(source) -> str:
    """check_checkpoint's error for `source`: one line, the one load_weights raises."""
    with pytest.raises(InfermeterError) as checked:
        check_checkpoint(source)
    with pytest.raises(InfermeterError) as loaded:
        load_weights(source)
    assert str(checked.value) == str(loaded.value) and "\n" not in str(checked.value)
    return str(checked.value)
