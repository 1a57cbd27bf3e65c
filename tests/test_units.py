import pytest

from infermeter.errors import InfermeterError
from infermeter.units import canonical_dtype, dtype_bytes, format_bytes, parse_size


@pytest.mark.parametrize("text, value", [
    ("80GiB", 80 * 2**30), ("80 GiB", 80 * 2**30), ("80gib", 80 * 2**30), ("80G", 80 * 2**30),
    ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
    ("1024", 1024), ("2TiB", 2 * 2**40), ("4KB", 4000), (4096, 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "80 parsecs", "-5GB", "0", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(InfermeterError):
        parse_size(text)


@pytest.mark.parametrize("name, canonical, nbytes", [
    ("fp32", "float32", 4), ("float32", "float32", 4), ("torch.float16", "float16", 2),
    ("half", "float16", 2), ("BF16", "bfloat16", 2), ("fp8", "float8", 1),
    ("float8_e4m3fn", "float8", 1), ("int8", "int8", 1),
])
def test_dtypes(name, canonical, nbytes):
    assert canonical_dtype(name) == canonical and dtype_bytes(name) == nbytes


def test_unknown_dtype():
    with pytest.raises(InfermeterError, match="unknown dtype 'fp4'"):
        canonical_dtype("fp4")


def test_format_bytes():
    assert format_bytes(268_435_456) == "256.0 MiB"
    assert format_bytes(80 * 2**30) == "80.0 GiB"
    assert format_bytes(12) == "12 B"
