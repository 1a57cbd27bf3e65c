"""The sweeps never drop a Result (the docs cite them): --merge and a part run again append, and
the summary reads each part's latest run."""

import json
from pathlib import Path

from infermeter.measure.result import Result, append_jsonl, read_results
from tests.benchmark_scripts import load_benchmark


def load_sweep():
    return load_benchmark("generation_sweep")


def result(part: str, tag: str, when: str = "2026-11-26T00:00:00") -> Result:
    return Result("generate", {"name": "debug"}, {"run": part, "tag": tag}, {"timestamp": when},
                  {})


def tags(path: Path) -> list[tuple[str, str]]:
    return [(r.config["run"], r.config["tag"]) for r in read_results(path)]


def test_merge_appends_what_it_brings_and_keeps_every_earlier_result(tmp_path):
    sweep = load_sweep()
    committed, brought = tmp_path / "committed.jsonl", tmp_path / "brought.jsonl"
    append_jsonl(committed, [result("seed", "old"), result("prefill", "old-a"),
                             result("prefill", "old-b"), result("context", "old")])
    later = "2026-12-04T00:00:00"
    append_jsonl(brought, [result("prefill", "new-a", later), result("prefill", "new-b", later)])
    assert sweep.merge_parts(brought, committed) == ["prefill"]
    assert tags(committed) == [("seed", "old"), ("prefill", "old-a"), ("prefill", "old-b"),
                               ("context", "old"), ("prefill", "new-a"), ("prefill", "new-b")]
    assert sweep.merge_parts(brought, committed) == ["prefill"]  # a second merge adds nothing
    assert len(tags(committed)) == 6
    # the summary reads each part's latest run: prefill's new pair, the others' only run
    latest = sweep.latest_runs(read_results(committed))
    assert [(r.config["run"], r.config["tag"]) for r in latest] == [
        ("seed", "old"), ("context", "old"), ("prefill", "new-a"), ("prefill", "new-b")]


def test_merge_into_a_missing_file_creates_it(tmp_path):
    sweep = load_sweep()
    brought, committed = tmp_path / "brought.jsonl", tmp_path / "new" / "committed.jsonl"
    committed.parent.mkdir()
    append_jsonl(brought, [result("hf", "x")])
    assert sweep.merge_parts(brought, committed) == ["hf"]
    assert tags(committed) == [("hf", "x")]


def test_the_tp_sweep_appends_a_part_run_again(tmp_path):
    sweep = load_benchmark("tp_sweep")
    path = tmp_path / "tp.jsonl"
    first = [json.dumps({"config": {"tp_sweep": "decode-13b", "n": i}}) for i in range(2)]
    sweep.append_part(path, first)
    again = [json.dumps({"config": {"tp_sweep": "decode-13b", "n": 9}})]
    sweep.append_part(path, again)
    assert path.read_text().splitlines() == first + again


def generate_result(part: str, batch: int, tok_s: float, mbu: float) -> Result:
    metrics = {"mbu_pct": mbu, "decode_tok_per_s": tok_s, "warmup_s": 80.0, "mfu_pct": None,
               "decode_tok_per_s_roofline": 220.0, "hbm_gbps_measured": 2960.0}
    return Result("generate", {"name": "llama-2-7b"},
                  {"run": part, "mode": "compiled", "batch_size": batch}, {}, metrics)


def test_targets_list_the_kernel_part_beside_the_default():
    """The kernel part gets its own MBU and batch-32 lines, labelled by the kernels its Results
    ran; its ratio is taken within the part, never against the default's batch 1."""
    sweep = load_sweep()
    results = [generate_result("seed", 1, 186.0, 84.2), generate_result("seed", 32, 3650.0, 70),
               generate_result("kernel", 1, 190.0, 86.0),
               generate_result("kernel", 32, 4180.0, 80.0)]
    results[2].config.update(matvec_kernel="inductor", decode_attention="triton")
    text = sweep.targets(results)
    assert "batch 1 decode MBU (512-token cache): 84.2 % (target >= 85 %) MISSED" in text
    assert ("batch 1 decode MBU, part kernel (products inductor, attention triton): 86.0 % "
            "(target >= 85 %) met") in text
    assert "batch 32 vs batch 1 decode tok/s: 19.6 x (target >= 20 x) MISSED" in text
    assert ("batch 32 vs batch 1, part kernel (products inductor, attention triton): 22.0 x "
            "(target >= 20 x) met") in text
    assert "part kernel" not in sweep.targets(results[:2])  # no kernel part: no kernel lines


def test_a_comparison_part_from_before_the_settings_were_recorded_ran_inductors_products():
    sweep = load_sweep()
    old = generate_result("kernel", 1, 174.2, 78.0)  # no matvec_kernel, no decode_attention
    assert sweep.kernels(old) == "products inductor, attention -"


def test_merge_goes_to_the_measuring_devices_file(tmp_path):
    """--merge on a CPU machine files a GPU's sweep under the GPU's name, not 'cpu'."""
    sweep = load_sweep()
    brought = tmp_path / "brought.jsonl"
    measured = result("seed", "x")
    measured.env = {"device_name": "NVIDIA H100 80GB HBM3"}
    append_jsonl(brought, [measured])
    assert sweep.merged_slug(brought) == "nvidia-h100-80gb-hbm3"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert sweep.merged_slug(empty) is None


def test_gemv_part_is_batch_1_with_the_triton_gemv_and_has_its_mbu_line():
    sweep = load_sweep()
    (request,) = sweep.part_requests("gemv")
    assert (request.batch_sizes, request.modes, request.engine.matvec_kernel) == \
        ((1,), ("compiled",), "triton")
    results = [generate_result("seed", 1, 178.0, 79.8), generate_result("gemv", 1, 190.0, 85.3)]
    results[1].config.update(matvec_kernel="triton", decode_attention="math")
    text = sweep.targets(results)
    assert ("batch 1 decode MBU, part gemv (products triton, attention math): 85.3 % "
            "(target >= 85 %) met") in text
    assert "part gemv" not in sweep.targets(results[:1])


def test_the_summary_goes_beside_the_results_and_to_out(tmp_path, monkeypatch, capsys):
    """benchmarks/sweep_common.py, which the generate sweeps and A/B scripts share: the summary
    is printed, written beside the JSONL as <stem>-summary.txt and, with $OUT set, copied there
    with the JSONL (not where --results is $OUT or a folder under it); no Results is exit 1."""
    common = load_benchmark("sweep_common")
    path, out = tmp_path / "results" / "x-gpu.jsonl", tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    assert common.write_summary(path, lambda results: "none", 0.0) == 1
    assert not out.exists()
    path.parent.mkdir()
    append_jsonl(path, [result("seed", "a"), result("seed", "b")])
    assert common.write_summary(path, lambda results: f"{len(results)} results", 0.0) == 0
    assert capsys.readouterr().out == "2 results\n"
    for folder in (path.parent, out):
        assert (folder / "x-gpu-summary.txt").read_text() == "2 results\n"
    assert tags(out / "x-gpu.jsonl") == [("seed", "a"), ("seed", "b")]
    monkeypatch.setenv("OUT", str(path.parent))
    assert common.write_summary(path, lambda results: "again", 0.0) == 0
    assert tags(path) == [("seed", "a"), ("seed", "b")]
    # --results a folder under $OUT (a second tree's A/B beside the first's): nothing copied
    # over $OUT's own file of that name, which holds the other run's Results
    other = out / "base" / "x-gpu.jsonl"
    other.parent.mkdir()
    append_jsonl(other, [result("base", "c")])
    monkeypatch.setenv("OUT", str(out))
    assert common.write_summary(other, lambda results: "base", 0.0) == 0
    assert tags(out / "x-gpu.jsonl") == [("seed", "a"), ("seed", "b")]
    assert (out / "x-gpu-summary.txt").read_text() == "2 results\n"
    assert (other.parent / "x-gpu-summary.txt").read_text() == "base\n"


def test_an_ab_line_is_the_ratio_of_per_run_medians_and_says_whether_the_ranges_meet():
    common = load_benchmark("sweep_common")
    runs = {"split": [2.0, 2.2, 2.1], "fused": [1.8, 1.9]}
    assert common.ab_line("m", runs, "split", "fused") == (
        "m: fused / split TPOT 0.881 (per-run medians, 3 and 2 runs; ranges apart)")
    runs["fused"].append(2.05)
    assert common.ab_line("m", runs, "split", "fused").endswith("ranges overlap)")
    assert common.ab_line("m", {"split": [2.0]}, "split", "fused") == \
        "m: fused / split: - (a side has no timed runs)"


def record_memory_events(monkeypatch) -> list[tuple[str, list[bool]]]:
    """From now on, each generate request's fit check ("fit") and each memory collect
    ("collect"), in order, each with whether every model loaded so far is gone (a weakref to
    it dead), in load order."""
    import weakref

    import infermeter.engine.checkpoint.load as checkpoint
    from infermeter.generate import memory

    models, events = [], []
    load, collect, check = checkpoint.load_weights, memory.collect, memory.check_cases_fit

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    def recorded(what, call):
        def wrapper(*args, **kwargs):
            events.append((what, [model() is None for model in models]))
            return call(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(checkpoint, "load_weights", loading)
    monkeypatch.setattr(memory, "collect", recorded("collect", collect))
    monkeypatch.setattr(memory, "check_cases_fit", recorded("fit", check))
    return events


def test_a_failed_request_gives_its_weights_back(tmp_path, monkeypatch, capsys):
    """A request that fails after loading its weights (a Generator refusing its options, say),
    as an A/B's case (run_ab_case) or in a sweep's part (run_parts), is one error line, and its
    model is gone and its memory collected before the next request can start: the next fit check
    counts torch's cached blocks as used."""
    from infermeter.errors import InfermeterError
    from infermeter.generate import loop
    from infermeter.generate.job import run_generate
    from infermeter.generate.request import build_request

    common = load_benchmark("sweep_common")
    events = record_memory_events(monkeypatch)

    def refusing(*args, **kwargs):
        raise InfermeterError("refused")

    monkeypatch.setattr(loop, "run_generation", refusing)
    request = build_request("random:debug", device="cpu", modes=("eager",), prompt_lens=(4,),
                            max_new_tokens=3, max_seq_len=16, repeats=1, roofline=False)
    common.run_ab_case(request, {}, tmp_path / "ab.jsonl", "debug", "split", 0, "kernels",
                       "step_kernels")
    assert capsys.readouterr().err == "debug split: error: refused\n"
    assert events == [("fit", []), ("collect", [True])]
    assert not (tmp_path / "ab.jsonl").exists()
    events.clear()
    common.run_parts(["seed"], lambda part, path, env: run_generate(request, env),
                     tmp_path / "sweep.jsonl", {}, 0.0)
    assert capsys.readouterr().err.endswith("seed\nseed: error: refused\n")
    assert events == [("fit", [True]), ("collect", [True, True])]
