"""The reload-vs-recompute table names the prefill path its measured points ran."""

from infermeter.report.derive import break_even, prefill_path
from infermeter.report.load import Record
from infermeter.report.select import Column, ColumnKey
from infermeter.report.tables import breakeven_table

COMPILED = {"mode": "compiled", "prefill": "bucketed", "prefill_chunk": 2048,
            "compile_prefill": False}
EAGER = {"mode": "eager", "prefill": "exact", "prefill_chunk": None}


def _record(kind, metrics, config, source):
    return Record(kind, {"name": "m"}, config, {"device_name": "gpu"}, metrics, (), source)


def _column(points):
    """Reload 1 ms per token; batch-1 generate Results of (prompt tokens, TTFT ms, config)."""
    case = {"layout": "engine", "host_memory": "pinned", "direction": "h2d", "method": "staged",
            "gbps": 1.0, "moving_time_ms": 1.0}
    copy = _record("copy", {"cases": [case], "kv_cache_bytes": 1e6 * 512},
                   {"batch_size": 1, "seq_len": 512}, "c")
    gens = [_record("generate", {"ttft_ms": ms}, {"batch_size": 1, "prompt_len": n, **cfg},
                    f"g{n}-{cfg['mode']}") for n, ms, cfg in points]
    return Column(ColumnKey("gpu", "m", 1), copies=[copy], generates=gens)


def _path_cell(column):
    tab = breakeven_table([column])
    return {row[0]: row[1] for row in tab.rows}["Prefill path of the points"]


def test_prefill_path_names_mode_bucketing_and_chunks():
    def path(**cfg):
        return prefill_path(_record("generate", {}, cfg, "g"))

    assert path(**COMPILED) == "compiled, bucketed, 2,048-token chunks"
    assert path(**EAGER) == "eager"
    assert path(mode="compiled", prefill="exact", compile_prefill=True) == \
        "compiled, exact, compiled layers"
    assert path(mode="compiled") == "compiled, prefill path not recorded"


def test_one_path_is_named_and_a_mix_is_said_with_its_lengths():
    one = _column([(512, 50.0, COMPILED), (2048, 300.0, COMPILED)])
    assert break_even(one).prefill_paths == ((512, "compiled, bucketed, 2,048-token chunks"),
                                             (2048, "compiled, bucketed, 2,048-token chunks"))
    assert _path_cell(one) == "compiled, bucketed, 2,048-token chunks"
    # at 512 the eager Result is faster, so that point is eager's; 2048 is compiled only
    mixed = _column([(512, 50.0, COMPILED), (512, 40.0, EAGER), (2048, 300.0, COMPILED)])
    assert _path_cell(mixed) == ("mixed paths: eager (512); "
                                 "compiled, bucketed, 2,048-token chunks (2,048)")
    assert "mixed paths" in breakeven_table([mixed]).caption
