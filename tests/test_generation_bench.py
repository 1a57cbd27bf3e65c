"""Generation timing: synthetic clocks, statistics, case planning, memory checks, and the whole
benchmark on the `debug` preset (CPU, float32, eager), hf mode against eager, an OOM mid-sweep.

Nothing here decides pass/fail on a speed: values are checked for sign, count and bookkeeping.
GPU-only checks (CUDA events, compiled mode, MBU under 100%) are marked `gpu`.
"""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.checkpoint.load import load_weights
from infermeter.engine.generator import GenerationConfig
from infermeter.errors import InfermeterError
from infermeter.generate import loop, memory
from infermeter.generate.cases import PromptSet, plan_cases, prompt_sets, random_prompts
from infermeter.generate.job import run_generate
from infermeter.generate.request import EngineChoices, GenerateRequest, Timing, build_request
from infermeter.generate.timing import HostClock, RunTiming, StepRecorder, summarize
from infermeter.measure import roofline as rl
from infermeter.measure.fit import check_fit
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"]
ENV = {"device_name": "cpu"}


def request(**changes) -> GenerateRequest:
    base = {"source": "random:debug", "device": "cpu", "max_new_tokens": 6, "repeats": 3,
            "warmup": 0, "roofline": False}
    return build_request(**{**base, **changes})


# ---- timing and statistics with synthetic clocks -------------------------------------------
def test_step_recorder_with_a_synthetic_clock():
    ticks = iter([0.0, 0.010, 0.012, 0.015, 0.019])  # start, prefill, 3 decode steps (seconds)
    recorder = StepRecorder(HostClock(lambda: next(ticks)))
    for event, step in [("start", 0), ("prefill", 0), ("decode", 1), ("decode", 2),
                        ("decode", 3)]:
        recorder(event, step)
    timing = recorder.timing(batch_size=2, prompt_len=5, new_tokens=8)
    assert timing.ttft_ms == pytest.approx(10.0)
    assert timing.tpot_ms == pytest.approx([2.0, 3.0, 4.0])
    assert timing.decode_ms == pytest.approx(9.0) and timing.total_ms == pytest.approx(19.0)


def test_step_recorder_refuses_a_wrong_sequence():
    recorder = StepRecorder(HostClock(iter([0.0, 1.0]).__next__))
    recorder("decode", 1)
    recorder("prefill", 0)
    with pytest.raises(InfermeterError, match="expected start, prefill"):
        recorder.timing(1, 1)


def test_cuda_clock_records_events_and_syncs_once(monkeypatch):
    """CudaClock with fake events: made ahead, recorded on the stream, one sync at the end."""
    from infermeter.generate.timing import CudaClock

    log = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self, stream):
            self.at = len(log)
            log.append(("record", stream))

        def synchronize(self):
            log.append(("sync", self.at))

        def elapsed_time(self, end):
            return float(end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream0")
    clock = CudaClock(torch.device("cuda", 0), n_marks=3)
    recorder = StepRecorder(clock)
    for event, step in [("start", 0), ("prefill", 0), ("decode", 1), ("decode", 2)]:
        recorder(event, step)  # one more mark than planned: a fourth event is made
    assert log == [("record", "stream0")] * 4 and len(clock.events) == 4
    timing = recorder.timing(1, 4)
    assert log[-1] == ("sync", 3) and log.count(("sync", 3)) == 1  # only the last mark
    assert timing.ttft_ms == 1.0 and timing.tpot_ms == [1.0, 1.0]


def test_summarize_synthetic_runs():
    # Two repeats of batch 4, prompt 100, 3 decode steps (4 new tokens per sequence).
    repeats = [[RunTiming(4, 100, 20.0, [10.0, 10.0, 10.0], new_tokens=16)],
               [RunTiming(4, 100, 30.0, [10.0, 10.0, 20.0], new_tokens=16)]]
    metrics, samples, warnings = summarize(repeats)
    assert metrics["ttft_ms"] == pytest.approx(25.0)
    assert metrics["tpot_ms"]["n"] == 6 and metrics["tpot_ms"]["p50"] == pytest.approx(10.0)
    # decode tok/s per repeat: 4 x 3 / 30 ms = 400, 4 x 3 / 40 ms = 300; median 350.
    assert metrics["decode_tok_per_s"] == pytest.approx(350.0)
    # prefill tok/s: 400 tokens / 20 ms = 20,000 and / 30 ms = 13,333; median 16,667.
    assert metrics["prefill_tok_per_s"] == pytest.approx((20_000 + 40_000 / 3) / 2)
    # the seed's figures: 16 tokens, run time median of 50 ms and 70 ms = 60 ms.
    assert metrics["total_tokens"] == 16 and metrics["generation_time_s"] == pytest.approx(0.06)
    assert metrics["token_generation_speed"] == pytest.approx(16 / 0.06)
    assert samples["tpot_ms"] == [10.0, 10.0, 10.0, 10.0, 10.0, 20.0]
    assert samples["generation_ms"] == pytest.approx([50.0, 70.0])
    assert any("TTFT: only 2 samples" in w for w in warnings)
    assert any("noisy" in w for w in warnings)  # TTFT cov 20%


def test_summarize_flags_stalled_steps():
    steady = [[RunTiming(1, 8, 5.0, [1.0] * 60 + [9.0], new_tokens=62)] for _ in range(5)]
    _, _, warnings = summarize(steady)
    assert any("slow steps" in w for w in warnings)


# ---- planning -----------------------------------------------------------------------------
def test_plan_cases_sizes_caches_and_puts_modes_side_by_side():
    sets = prompt_sets((1, 4), (16,), (100,), DEBUG.vocab_size, seed=0, fixed=(1, 2))
    cases = plan_cases(DEBUG, sets, ("eager", "hf"), max_new_tokens=6)
    assert [(c.prompt_set.batch_size, c.prompt_set.prompt_len, c.mode) for c in cases] == [
        (1, 16, "eager"), (1, 16, "hf"), (1, 100, "eager"), (1, 100, "hf"),
        (4, 16, "eager"), (4, 16, "hf"), (4, 100, "eager"), (4, 100, "hf")]
    assert {c.cache_len for c in cases} == {256}  # 22 and 106 tokens, rounded up to 256
    assert cases[2].prompt_set.context == 100 and "context 100" in cases[2].label
    assert sets[0].prompts[0] == sets[2].prompts[0]  # batch 1 is batch 4's first row
    assert plan_cases(DEBUG, sets[:1], ("eager",), 6, max_seq_len=64)[0].cache_len == 64
    with pytest.raises(InfermeterError, match="does not fit"):
        plan_cases(DEBUG, sets, ("eager",), max_new_tokens=200)
    with pytest.raises(InfermeterError, match="unknown mode"):
        plan_cases(DEBUG, sets, ("fast",), 6)


def test_user_prompts_of_mixed_lengths_run_as_groups():
    user = PromptSet(((1, 2, 3), (4, 5), (6, 7, 8), (9, 10, 11)), "user")
    (case,) = plan_cases(DEBUG, [user], ("eager",), 4, max_batch=2)
    assert case.groups == ((0, 2), (3,), (1,)) and user.prompt_len is None
    assert random_prompts(2, 3, 10, seed=1) == random_prompts(2, 3, 10, seed=1)


# ---- memory -------------------------------------------------------------------------------
def test_check_fit_names_every_part():
    parts = memory.case_memory(PRESETS["llama-2-7b"], 32, 512, 4096, "fp16", "fp16", "eager")
    assert parts["KV cache"] == 32 * 4096 * 524_288  # 64 GiB
    with pytest.raises(InfermeterError) as err:
        check_fit("llama-2-7b", parts, 40 * 2**30, "free on the GPU", memory.ADVICE)
    text = str(err.value)
    assert "does not fit" in text and "weights 12.6 GiB" in text and "KV cache 64.0 GiB" in text
    assert "40.0 GiB free on the GPU" in text
    check_fit("fine", {"weights": 10}, 10, "free", memory.ADVICE)  # exactly fits: no error


def test_the_triton_all_reduce_buffer_counts_where_it_is_allocated():
    """At tp 2 the Triton kinds hold 40 MiB of symmetric memory a rank (13B: 80 sites x 2 slots
    of 256 KiB, and the flags); NCCL, one-shot and one GPU hold none."""
    spec = PRESETS["llama-2-13b"]
    for kind in ("triton", "triton-unfused", "auto"):
        parts = memory.case_memory(spec, 1, 80, 512, "bf16", "bf16", "compiled", 2, kind)
        assert parts["all-reduce buffer"] == 80 * 2 * 256 * 1024 + 80 * 128 * 4
    for tp, kind in ((2, "nccl"), (2, "one-shot"), (1, "triton")):
        parts = memory.case_memory(spec, 1, 80, 512, "bf16", "bf16", "compiled", tp, kind)
        assert "all-reduce buffer" not in parts


def test_a_cache_that_cannot_fit_fails_before_any_allocation(monkeypatch):
    """A GPU with 8 GiB free (mocked): llama-2-7b fp16 does not fit; nothing is loaded."""
    import infermeter.engine.checkpoint.load as checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))

    def no_allocation(*args, **kwargs):
        raise AssertionError("weights or buffers were allocated before the fit check")

    monkeypatch.setattr(checkpoint, "load_weights", no_allocation)
    monkeypatch.setattr(rl, "measure_roofline", no_allocation)
    with pytest.raises(InfermeterError) as err:
        run_generate(request(source="random:llama-2-7b", device="cuda", dtype="fp16",
                             roofline=True, modes=("compiled",)), ENV)
    text = str(err.value)
    assert "does not fit" in text and "weights 12.6 GiB" in text and "8.0 GiB free" in text


# ---- end to end on the debug preset ---------------------------------------------------------
def test_bookkeeping_end_to_end_on_debug():
    results, texts = run_generate(request(batch_sizes=(1, 2), prompt_lens=(16,), contexts=(100,)),
                                  ENV)
    assert len(results) == 4 and texts == [""]  # random weights, no tokenizer
    for result in results:
        m, cfg = result.metrics, result.config
        batch, prompt = cfg["batch_size"], cfg["prompt_len"]
        assert m["oom"] is False and m["ttft_ms"] > 0 and m["tpot_ms"]["p50"] > 0
        assert m["decode_steps"] == 5 and m["tpot_ms"]["n"] == 5 * 3  # steps x repeats
        assert len(result.samples["tpot_ms"]) == 15 and len(result.samples["ttft_ms"]) == 3
        assert m["total_tokens"] == batch * 6
        assert [len(ids) for ids in result.output_token_ids] == [6] * batch
        # decode excludes prefill: each run's time is its TTFT plus its decode steps exactly.
        for ttft, decode, whole in zip(result.samples["ttft_ms"], result.samples["decode_ms"],
                                       result.samples["generation_ms"]):
            assert whole == pytest.approx(ttft + decode) and decode < whole
        assert m["decode_tok_per_s"] > 0 and m["token_generation_speed"] > 0
        assert m["warmup_s"] > 0 and m["warmup_runs_s"] >= 0  # --warmup 0: no untimed runs
        assert m["decode_context_range"] == [prompt + 1, prompt + 5]
        assert m["bytes_per_decode_step"] > rl.decode_weight_bytes(DEBUG, "fp32", batch)
        assert m["prefill_flops"] == rl.prefill_flops(DEBUG, batch, prompt)
        assert m["mbu_pct"] is None and m["hbm_gbps_measured"] is None  # --no-roofline
        assert set(loop.METRIC_NAMES) <= set(m)
    assert results[1].config["context"] == 100 and results[0].config["context"] is None


def test_roofline_numbers_and_the_plausibility_flag():
    model = load_weights("random:debug", "cpu", "float32")
    sets = prompt_sets((1,), (8,), (), DEBUG.vocab_size, 0, ())
    cases = plan_cases(DEBUG, sets, ("eager",), 4)
    settings = GenerateRequest("random:debug", sampling=GenerationConfig(max_new_tokens=4),
                               timing=Timing(repeats=2, warmup=0))
    honest = rl.Roofline("cpu", hbm_gbps=1e6, matmul_tflops=1e6)  # peaks nothing can reach
    impossible = rl.Roofline("cpu", hbm_gbps=1e-9, matmul_tflops=1e-15)
    (ok,) = loop.run_generation(model, cases, settings, ENV, {}, honest)
    (bad,) = loop.run_generation(model, cases, settings, ENV, {}, impossible)
    assert 0 < ok.metrics["mbu_pct"] < 100 and 0 < ok.metrics["mfu_pct"] < 100
    assert not any("measurement error" in w for w in ok.warnings)
    assert bad.metrics["mbu_pct"] > 100 and bad.metrics["mfu_pct"] > 100
    assert sum("measurement error" in w for w in bad.warnings) == 2


def test_an_out_of_memory_case_is_recorded_and_the_sweep_goes_on(monkeypatch):
    real = loop.time_case

    def fake(model, case, settings, progress):
        if case.prompt_set.batch_size == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")
        return real(model, case, settings, progress)

    monkeypatch.setattr(loop, "time_case", fake)
    results, _ = run_generate(request(batch_sizes=(2, 1), prompt_lens=(8,)), ENV)
    oom, fine = results
    assert oom.metrics["oom"] is True and oom.metrics["ttft_ms"] is None
    assert oom.metrics["decode_tok_per_s"] is None and oom.output_token_ids is None
    assert oom.warnings[0].startswith("out of memory: CUDA out of memory")
    assert fine.metrics["oom"] is False and fine.metrics["ttft_ms"] > 0


def test_hf_mode_gives_the_eager_greedy_tokens():
    pytest.importorskip("transformers")
    results, _ = run_generate(request(batch_sizes=(2,), prompt_lens=(12,), repeats=2,
                                      modes=("eager", "hf")), ENV)
    eager, hf = results
    assert hf.config["mode"] == "hf" and hf.config["transformers"]
    assert hf.output_token_ids == eager.output_token_ids
    assert hf.metrics["tokens_vs_first_mode"] == {"mode": "eager", "identical": True,
                                                  "first_mismatch": None}
    assert hf.metrics["tpot_ms"]["n"] == 5 * 2 and hf.metrics["ttft_ms"] > 0


@pytest.mark.parametrize("changes", [
    {"tie_embeddings": True},
    {"arch": "qwen2", "qkv_bias": True},
    {"arch": "mistral", "sliding_window": 8, "sliding_window_layers": (0, 1)},  # ring wraps
], ids=["tied", "qwen2-bias", "mistral-window"])
def test_hf_runner_matches_the_engine_on_other_shapes(changes):
    pytest.importorskip("transformers")
    from infermeter.engine.generator import GenerationConfig, Generator
    from infermeter.engine.model import build_model
    from infermeter.generate.hf import HFRunner

    model = build_model(DEBUG.with_updates(**changes), seed=3)
    prompt = torch.randint(0, DEBUG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(max_new_tokens=20)
    marks = []
    out = HFRunner(model, config, compile=False).run(prompt, lambda e, s: marks.append(e))
    assert out.output_token_ids == Generator(model, 64).generate(prompt, config).output_token_ids
    assert marks == ["start", "prefill"] + ["decode"] * 19 and out.num_decode_steps == 19


def test_progress_reports_every_run():
    class Recorder:
        def start(self, total):
            self.total, self.labels = total, []

        def advance(self, label):
            self.labels.append(label)

    bar = Recorder()
    run_generate(request(batch_sizes=(1,), prompt_lens=(4,), modes=("eager",)), ENV,
                 progress=bar)
    assert bar.total == len(bar.labels) == 1 + 3 and "warm-up" in bar.labels[0]


def test_warmup_is_timed_apart_from_the_untimed_and_the_timed_runs(monkeypatch):
    """warmup_s is the mode's warm-up alone (a short run in eager mode; compile and capture in
    compiled mode), the untimed full runs (--warmup) count in warmup_runs_s, and neither leaks
    into a timed run (TTFT + decode steps). One fake clock drives every reading: the warm-up
    takes 7 s on it, an untimed run 100 s, and each mark of a timed run 2^-10 s after the last."""
    from types import SimpleNamespace

    from infermeter.generate.modes import EngineRunner
    from infermeter.generate.timing import HostClock

    clock = SimpleNamespace(now=0.0)
    tick = 2.0**-10  # seconds: exact in binary, so every difference below is exact
    real_warmup, real_run = EngineRunner.warmup, EngineRunner.run

    def warmup(self, shapes):
        real_warmup(self, shapes)
        clock.now += 7.0

    def run(self, tokens, hook):
        if hook is loop._no_hook:  # an untimed run (time_case's --warmup loop)
            out = real_run(self, tokens, hook)
            clock.now += 100.0
            return out

        def ticking(event, step):
            clock.now += tick
            hook(event, step)
        return real_run(self, tokens, ticking)

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(loop, "make_clock", lambda device, n: HostClock(lambda: clock.now))
    monkeypatch.setattr(EngineRunner, "warmup", warmup)
    monkeypatch.setattr(EngineRunner, "run", run)
    (result,), _ = run_generate(request(batch_sizes=(1,), prompt_lens=(8,), warmup=2), ENV)
    m, ms = result.metrics, tick * 1e3
    assert m["warmup_s"] == 7.0 and m["warmup_runs_s"] == 2 * 100.0
    assert result.samples["ttft_ms"] == [ms] * 3  # start -> prefill: one tick
    assert result.samples["tpot_ms"] == [ms] * 5 * 3  # 6 new tokens: 5 decode steps a run
    assert result.samples["generation_ms"] == [6 * ms] * 3
    assert m["decode_time_ms"] == 5 * ms and m["ttft_ms"] == ms


# ---- GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_modes_timed_with_cuda_events():
    """Compiled, eager and hf on a small llama on the GPU: events give sane, plausible numbers."""
    spec = "random:" + "llama-3.2-1b"
    results, _ = run_generate(build_request(
        source=spec, device="cuda", dtype="bf16", batch_sizes=(1,), prompt_lens=(128,),
        max_new_tokens=32, repeats=3, modes=("compiled", "eager", "hf")), {"device_name": "gpu"})
    for result in results:
        m = result.metrics
        assert m["oom"] is False and m["tpot_ms"]["n"] == 31 * 3
        assert 0 < m["mbu_pct"] <= 100 and 0 < m["mfu_pct"] <= 100, result.warnings
        assert m["peak_allocated_bytes"] > m["bytes_per_decode_step"] * 0.9
        assert m["warmup_s"] > 0 and m["hbm_gbps_measured"] > 100
    compiled, eager, _ = results
    assert compiled.metrics["decode_tok_per_s"] > eager.metrics["decode_tok_per_s"]


def test_matvec_kernel_setting_reaches_every_linear_and_the_result_says_what_ran(monkeypatch):
    """--matvec-kernel triton: every Linear of the model (the fused ones too) is set; the
    Result records "triton" only for a compiled batch-1 case where Triton runs, "inductor"
    for other compiled cases, nothing in eager mode."""
    from infermeter.commands.generate import MATVEC_KERNELS
    from infermeter.engine.linear import MATVEC_KERNELS as ENGINE_KINDS
    from infermeter.engine.linear import Linear
    from infermeter.generate.modes import EngineRunner

    assert MATVEC_KERNELS == ENGINE_KINDS
    model = load_weights("random:debug", "cpu", "float32")
    sets = prompt_sets((1,), (4,), (), PRESETS["debug"].vocab_size, 0, ())
    compiled, eager = (plan_cases(PRESETS["debug"], sets, (mode,), 4, None, None)
                       for mode in ("compiled", "eager"))
    assert EngineChoices().matvec_kernel == "triton"  # the default, as the CLI's
    EngineRunner(model, compiled[0], GenerateRequest("random:debug",
                                                     engine=EngineChoices(matvec_kernel="inductor")))
    assert {m.matvec_kernel for m in model.modules() if isinstance(m, Linear)} == {"inductor"}
    settings = GenerateRequest("random:debug", engine=EngineChoices(matvec_kernel="triton"))
    runner = EngineRunner(model, compiled[0], settings)
    kinds = {m.matvec_kernel for m in model.modules() if isinstance(m, Linear)}
    assert kinds == {"triton"} and model.layers[0].attention.wqkv is not None  # fused too
    from infermeter.engine import linear as linear_module  # takes_gemv, the shared rule

    monkeypatch.setattr(linear_module, "triton_runs_on", lambda x: True)
    runner.batch_sizes = [1]
    assert runner.describe()["matvec_kernel"] == "triton"
    runner.batch_sizes = [2]  # two rows: F.linear, as inductor compiles it
    assert runner.describe()["matvec_kernel"] == "inductor"
    monkeypatch.setattr(linear_module, "triton_runs_on", lambda x: False)
    runner.batch_sizes = [1]
    assert runner.describe()["matvec_kernel"] == "inductor"  # no Triton here: fell back
    assert EngineRunner(model, eager[0], settings).describe()["matvec_kernel"] is None
