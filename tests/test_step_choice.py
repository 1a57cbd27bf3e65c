"""engine/step_choice.py: what a compiled decode step runs when its kernels and replay are left
to "auto" (generate's default), and that the runner applies and records that choice."""

import pytest
import torch

from infermeter.engine.model import build_model
from infermeter.engine.step_choice import (
    SMALL_STEP_BYTES,
    StepChoice,
    choose_step,
    step_weight_bytes,
)
from infermeter.errors import InfermeterError
from infermeter.specs.presets import PRESETS

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_small_dense_models_take_the_fused_recorded_step_up_to_the_line():
    small = choose_step(int(SMALL_STEP_BYTES), CUDA, moe=False, tp=1, batch=1)
    assert (small.kernels, small.graphs) == ("fused", "recorded")
    assert "3.00 GB" in small.reason and "at most 3 GB" in small.reason
    large = choose_step(int(SMALL_STEP_BYTES) + 1, CUDA, moe=False, tp=1, batch=1)
    assert (large.kernels, large.graphs) == ("split", "trees")
    assert "over 3 GB" in large.reason


@pytest.mark.parametrize("device,moe,tp,batch,backend,why", [
    (CPU, False, 1, 1, None, "off a GPU"), (CUDA, True, 1, 1, None, "an MoE model"),
    (CUDA, False, 2, 1, None, "tp 2"), (CUDA, False, 1, 8, None, "batch 8"),
    (CUDA, False, 1, 1, "cudagraphs", "the cudagraphs backend")])
def test_what_was_not_measured_stays_split_in_the_trees_whatever_its_size(device, moe, tp,
                                                                         batch, backend, why):
    choice = choose_step(1000, device, moe=moe, tp=tp, batch=batch, backend=backend)
    assert (choice.kernels, choice.graphs) == ("split", "trees")
    assert choice.reason == f"auto: split, trees ({why})"
    assert choose_step(1000, device, moe, tp, batch, "inductor" if backend is None else backend,
                       "fused").reason == f"asked: fused, trees ({why})"


def test_a_qwen3_moe_batch_1_step_with_the_triton_experts_takes_the_fused_kernels_in_the_trees():
    """moe_fuses (q/k norms and the Triton experts, the measured case): fused, in the trees, at
    batch 1 on one GPU; a batch over 1, tp, the cudagraphs backend or no GPU keep split; an MoE
    model without it keeps split; a dense model ignores it."""
    fused = choose_step(10**11, CUDA, moe=True, tp=1, batch=1, moe_fuses=True)
    assert (fused.kernels, fused.graphs) == ("fused", "trees")
    assert fused.reason == "auto: fused, trees (an MoE model with q/k norms and the Triton " \
                           "experts, at batch 1)"
    for device, tp, batch, backend in ((CUDA, 1, 2, None), (CUDA, 2, 1, None),
                                       (CUDA, 1, 1, "cudagraphs"), (CPU, 1, 1, None)):
        kept = choose_step(10**11, device, True, tp, batch, backend, moe_fuses=True)
        assert (kept.kernels, kept.graphs) == ("split", "trees"), (device, tp, batch, backend)
    assert choose_step(10**11, CUDA, True, 1, 1).kernels == "split"
    assert choose_step(10**11, CUDA, False, 1, 1, moe_fuses=True).kernels == "split"

def test_kernels_asked_by_name_run_as_asked_with_their_own_replay_whatever_the_size():
    """The fused kernels in the recorded graph, split in the trees; the reason says they were
    asked for (the report's test for a comparison run)."""
    for size in (1000, int(SMALL_STEP_BYTES) * 10):
        for kernels, graphs in (("split", "trees"), ("fused", "recorded")):
            choice = choose_step(size, CUDA, False, 1, 1, None, kernels)
            assert (choice.kernels, choice.graphs) == (kernels, graphs)
            assert choice.reason == f"asked: {kernels}, {graphs}"


def test_a_step_reads_a_tied_head_once_and_no_untied_embedding_table():
    """debug in bfloat16: every parameter's bytes once; an untied embedding table (a step reads
    one row of it) left out, a tied one counted once, as the head it also is."""
    spec = PRESETS["debug"]
    for tied in (False, True):
        model = build_model(spec.with_updates(tie_embeddings=tied), on_meta=True,
                            dtype=torch.bfloat16)
        params = {id(p): p for p in model.parameters()}  # a tied Parameter is listed once
        total = sum(p.numel() * 2 for p in params.values())
        table = model.tok_embeddings.weight.numel() * 2
        assert step_weight_bytes(model) == (total if tied else total - table)


@pytest.mark.parametrize("name,dtype,fused", [
    # the models the line was drawn from (step-kernels-recorded-nvidia-h200-summary.txt, and
    # 1B's later A/B: step-line-1b-nvidia-h100-80gb-hbm3.jsonl); 3B, never timed fused, stays split
    ("smollm2-135m", torch.float16, True), ("qwen2.5-0.5b", torch.bfloat16, True),
    ("llama-3.2-1b", torch.bfloat16, True), ("llama-3.2-3b", torch.bfloat16, False),
    ("llama-3.1-8b", torch.bfloat16, False)])
def test_the_measured_models_fall_on_the_side_their_ab_put_them(name, dtype, fused):
    model = build_model(PRESETS[name], on_meta=True, dtype=dtype)
    choice = choose_step(step_weight_bytes(model), CUDA, moe=False, tp=1, batch=1)
    assert (choice.kernels == "fused") == fused, choice.reason


def test_the_runner_applies_the_choice_and_records_why(monkeypatch):
    """The rule gets the model's step bytes, device, MoE-ness, ranks, the case's largest batch, the
    backend, the kernels asked and whether an MoE step would take the measured fused case; the
    Generator gets the chosen replay (or the one named), every layer the chosen kernels. The
    Result's config.step_choice is the default's reason where the step runs what the default would
    (kernels and the Generator's replay), even if asked for by name, else "asked: <kernels>,
    <replay>"."""
    from infermeter.engine.checkpoint.load import load_weights
    from infermeter.generate import modes as modes_module
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.modes import EngineRunner
    from infermeter.generate.request import EngineChoices, GenerateRequest

    seen = []

    def rule(weight_bytes, device, moe, tp, batch, backend, kernels="auto", moe_fuses=None):
        seen.append((weight_bytes, device.type, moe, tp, batch, backend, kernels, moe_fuses))
        picked = "fused" if kernels == "auto" else kernels
        return StepChoice(picked, "trees", f"why {picked}")  # off a GPU: the trees, as here

    monkeypatch.setattr(modes_module, "choose_step", rule)
    model = load_weights("random:debug", "cpu", "float32")
    sets = prompt_sets((1,), (4,), (), PRESETS["debug"].vocab_size, 0, ())
    compiled, eager = (plan_cases(PRESETS["debug"], sets, (mode,), 4, None, None)
                       for mode in ("compiled", "eager"))

    def runner_for(**choices) -> EngineRunner:
        return EngineRunner(model, compiled[0], GenerateRequest(
            "random:debug", engine=EngineChoices(**choices)))

    runner = runner_for()
    facts = (step_weight_bytes(model), "cpu", False, 1, 1, None)
    # the choice, then the default's; moe_fuses: q/k norms and the Triton experts (not here)
    assert seen == [(*facts, "auto", False), (*facts, "auto", False)]
    assert {layer.step_kernels for layer in model.layers} == {"fused"}
    assert runner.generator._step_graphs_asked == "trees"
    assert runner.describe()["step_choice"] == "why fused"
    eager_runner = EngineRunner(model, eager[0], GenerateRequest("random:debug"))
    assert eager_runner.describe()["step_choice"] is None  # no compiled step
    runner = runner_for(step_kernels="split")
    assert {layer.step_kernels for layer in model.layers} == {"split"}
    assert runner.describe()["step_choice"] == "why split"  # the asked kernels' own reason
    # asked for by name, but what the default runs: the default's reason
    assert runner_for(step_kernels="fused").describe()["step_choice"] == "why fused"
    monkeypatch.setattr(modes_module, "choose_step",
                        lambda *facts, **kw: StepChoice("split", "recorded", "why recorded"))
    named = runner_for(step_kernels="split", step_graphs="recorded")
    assert named.generator._step_graphs_asked == "recorded"
    # off a GPU the Generator replays no graph: what ran, neither reason's replay
    assert named.describe()["step_choice"] == "asked: split, trees"


@pytest.mark.parametrize("field,value", [("step_kernels", "megakernel"),
                                         ("step_graphs", "graphs")])
def test_an_unknown_step_setting_is_one_clear_error(field, value):
    from infermeter.generate.request import EngineChoices

    with pytest.raises(InfermeterError, match=f"unknown {field.replace('_', ' ')} '{value}' "
                       r"\(use auto or "):
        EngineChoices(**{field: value})
