"""The recorded step's held state (engine/held_step.py): a step advances the token, done flags
and position in place and writes its token into the history; a second decode state takes the
buffers over and the first keeps its values. CPU float32, debug preset; the recorded branch is
forced (off a GPU the recording runs the step itself), so what is checked is the step's
function and the Generator's bookkeeping around it; the GPU tests in test_generate.py replay
the recorded graph itself."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator, _decode_in_place, _decode_one
from infermeter.engine.held_step import FIELDS, HeldSteps
from infermeter.engine.model import build_model
from infermeter.specs.presets import PRESETS

SPEC = PRESETS["debug"]
PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [5, 4, 3, 2, 1, 0, 128]]


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC, device="cpu", dtype=torch.float32)


def recorded(model, monkeypatch) -> Generator:
    """A Generator that takes its recorded branch on this CPU, the step's function eager."""
    gen = Generator(model, max_seq_len=64, step_graphs="recorded")
    gen._compiled_step = _decode_in_place
    monkeypatch.setattr(Generator, "step_graphs", property(lambda self: "recorded"))
    return gen


@torch.no_grad()
def test_the_step_in_place_is_the_step_that_returns(model):
    """_decode_in_place, traced as the compiled step is (functionalised: its input mutations
    ordered after their reads), against _decode_one eager, 6 steps from one prefill: the same
    tokens and done flags, the position one on a step, and each token in the history at the
    position it is fed at (the rows before untouched)."""
    config = GenerationConfig(max_new_tokens=8, greedy=False, top_p=0.9, seed=2)
    sampling = {"greedy": False, "temperature": 1.0, "top_p": 0.9}
    gen = Generator(model, max_seq_len=32)
    gen.prepare(2, 7, 8)
    tokens = torch.tensor(PROMPTS)
    want = gen.prefill(tokens, config)
    expected, done = [], want.done
    token, pos = want.token, want.input_pos.clone()
    for _ in range(6):
        token, done = _decode_one(model, token, pos, done, want.stop_ids, want.seed, **sampling)
        pos += 1
        expected.append(token)
    gen.prepare(2, 7, 8)  # the same cache, emptied
    state = gen.prefill(tokens, config)
    history = torch.full((33, 2), -1)
    step = torch.compile(_decode_in_place, backend="aot_eager", fullgraph=True, dynamic=False)
    start = int(state.input_pos)
    for _ in range(6):
        assert step(model, state.token, state.input_pos, state.done, state.stop_ids,
                    state.seed, history, **sampling) == ()
    assert torch.equal(history[start + 1:start + 7], torch.stack(expected))
    assert torch.equal(state.token, expected[-1]) and torch.equal(state.done, done)
    assert int(state.input_pos) == start + 6
    assert (history[:start + 1] == -1).all() and (history[start + 7:] == -1).all()


def test_recorded_generation_with_stops_is_eager_generation(model, monkeypatch):
    """Greedy with a stop id that one sequence samples: the loop's stop checks read the done
    flags the step advances in place, the output is eager's, cut where eager cuts it, and
    the returned tokens are the history's rows."""
    eager = GenerationConfig(max_new_tokens=12)
    free = Generator(model, max_seq_len=64).generate(PROMPTS, eager).output_token_ids
    stop = free[0][3]
    config = GenerationConfig(max_new_tokens=12, stop_ids={stop}, stop_check_interval=2,
                              compile=True)
    want = Generator(model, max_seq_len=64).generate(PROMPTS, replace(config, compile=False))
    gen = recorded(model, monkeypatch)
    got = gen.generate(PROMPTS, config)
    assert got.output_token_ids == want.output_token_ids and got.finished == want.finished
    assert got.finished[0] and got.output_token_ids[0] == free[0][:3]
    gen.prepare(2, 7, 12)
    state = gen.prefill(torch.tensor(PROMPTS), config)
    steps = [gen.decode_step(state, config) for _ in range(3)]
    (held,) = gen.held_steps._buffers.values()
    assert all(t.data_ptr() == held.history[8 + i].data_ptr() for i, t in enumerate(steps))
    assert [t.tolist() for t in steps] == [[row[i] for row in free] for i in range(1, 4)]


def fake_state(token: list[int], pos: int, seed: int) -> SimpleNamespace:
    """A DecodeState's five tensors."""
    return SimpleNamespace(token=torch.tensor(token), input_pos=torch.tensor([pos]),
                           done=torch.zeros(len(token), dtype=torch.bool),
                           stop_ids=torch.tensor([-1]), seed=torch.tensor(seed))


def values(state: SimpleNamespace) -> list[list]:
    return [getattr(state, name).tolist() for name in FIELDS]


def test_a_second_state_takes_the_buffers_over_and_the_first_keeps_its_values():
    """hold() copies a state in once and points its fields at the buffers; a second state of
    the same key takes them over, the first then holding copies of what it held (here after a
    'step' wrote the buffers); the first coming back is copied in again; a field set anew by
    the caller is copied in again too; another key has buffers of its own."""
    held = HeldSteps()
    first, second = fake_state([1, 2], 7, 3), fake_state([5, 6], 9, 4)
    buffers = held.hold(first, "key", 16)
    assert all(getattr(first, name) is getattr(buffers, name) for name in FIELDS)
    assert buffers.history.shape == (17, 2) and not buffers.history.any()
    assert held.hold(first, "key", 16) is buffers
    assert values(first) == [[1, 2], [7], [False, False], [-1], 3]
    buffers.token.copy_(torch.tensor([8, 9]))  # what a step writes
    buffers.input_pos.add_(1)
    assert held.hold(second, "key", 16) is buffers
    assert values(second) == [[5, 6], [9], [False, False], [-1], 4]
    assert first.token is not buffers.token
    assert values(first) == [[8, 9], [8], [False, False], [-1], 3]
    buffers.done.fill_(True)
    held.hold(first, "key", 16)
    assert values(first) == [[8, 9], [8], [False, False], [-1], 3]
    assert values(second) == [[5, 6], [9], [True, True], [-1], 4]
    assert second.done is not buffers.done
    first.token = torch.tensor([0, 0])  # set anew: copied in on the next hold
    held.hold(first, "key", 16)
    assert buffers.token.tolist() == [0, 0] and first.token is buffers.token
    other = held.hold(first, ("key", 2), 16)
    assert other is not buffers and first.token is other.token and values(first)[0] == [0, 0]
