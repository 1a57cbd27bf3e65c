"""`infermeter generate`: a checkpoint (or random weights) + prompts -> timed generation -> Results.

The command times by default (generate/loop.py): warm-up apart, then repeated runs with TTFT,
TPOT, decode tokens/s, MBU / MFU against peaks measured in the same run, memory; one `generate`
Result per case (prompt set x mode), each with its output token ids, so the command stays the
correctness view of the engine too.

Prompts come as text (encoded with the checkpoint's tokenizer), as chat dialogs (Llama-2-chat /
Llama-3 formats, as Meta's example_chat_completion.py) or as raw token ids: all of them run as one
case, prompts of different lengths as separate batches (the engine's batch shares positions, no
padding). Without prompts: random ids of each --prompt-len / --context for each --batch-size, or,
when no length is given, --batch-size copies of a fixed 6-token prompt.
Everything a user can get wrong (lengths, memory, flags) is checked before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from infermeter.engine.devices import torch_device
from infermeter.errors import InfermeterError
from infermeter.generate.request import GenerateRequest
from infermeter.measure.result import Result
from infermeter.specs.loaders import text_model_note
from infermeter.specs.peer_buffers import uses_peer_buffer

if TYPE_CHECKING:
    from infermeter.generate.loop import Progress

DEFAULT_PROMPT_IDS = [1, 450, 4996, 17354, 1701, 29916]  # a fixed prompt for tokenizer-less runs


def find_tokenizer(request: GenerateRequest) -> Any:
    """The tokenizer named by --tokenizer-path, else the one beside the checkpoint, else None."""
    from infermeter.engine.text.tokenizer import load_tokenizer

    if request.tokenizer_path:
        return load_tokenizer(request.tokenizer_path)
    if request.source.startswith("random:"):
        return None
    folder = Path(request.source).expanduser()
    if folder.is_file():  # a GGUF file: the vocabulary it carries, if any
        from infermeter.engine.text.tokenizer import gguf_tokenizer

        return gguf_tokenizer(folder)
    for candidate in (folder, folder.parent):  # Meta downloads keep tokenizer.model one up
        if any((candidate / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            return load_tokenizer(candidate)
    return None


def build_prompts(request: GenerateRequest, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """The user's prompts as ids ([] when none were given)."""
    from infermeter.engine.text.chat import encode_dialog, load_dialogs, parse_prompt_ids

    prompts = [parse_prompt_ids(text, vocab_size) for text in request.prompt_ids]
    needs_tokenizer = request.prompts or request.dialogs_path
    if needs_tokenizer and tokenizer is None:
        raise InfermeterError("text prompts and dialogs need a tokenizer: give --tokenizer-path "
                              "(or use --prompt-ids)")
    prompts += [tokenizer.encode(text, bos=True) for text in request.prompts]
    if request.dialogs_path:
        prompts += [encode_dialog(tokenizer, dialog, request.chat_format)
                    for dialog in load_dialogs(request.dialogs_path)]
    return prompts


def _spec(request: GenerateRequest) -> tuple[Any, Any]:
    """(spec, what load_weights loads): the source, or the spec itself when max_positions
    raises a random model's context (its RoPE tables then cover the longer cache)."""
    from infermeter.engine.checkpoint.load import spec_for
    from infermeter.specs.model import check_engine_arch

    spec, folder, _ = spec_for(request.source)
    check_engine_arch(spec)
    if not request.max_positions:
        return spec, request.source
    if folder is not None:
        raise InfermeterError("max_positions applies to random weights only")
    spec = spec.with_updates(max_seq_len=request.max_positions)
    return spec, spec


def _prompt_sets(request: GenerateRequest, tokenizer: Any, vocab_size: int) -> list[Any]:
    from infermeter.generate.cases import PromptSet, prompt_sets

    user = build_prompts(request, tokenizer, vocab_size)
    if user and (request.batch_sizes or request.prompt_lens or request.contexts):
        raise InfermeterError("--batch-size, --prompt-len and --context make random prompts; "
                              "with --prompt, --prompt-ids or --dialogs the batch is those "
                              "prompts (use --max-batch-size to split them)")
    if user:
        return [PromptSet(tuple(tuple(p) for p in user), "user")]
    fixed = tuple(i % vocab_size for i in DEFAULT_PROMPT_IDS)
    return prompt_sets(request.batch_sizes or (1,), request.prompt_lens, request.contexts,
                       vocab_size, request.sampling.seed, fixed)


def resolve_all_reduce(request: GenerateRequest, parallel: Any, spec: Any = None) -> str:
    """--tp-all-reduce auto: the Triton kernels where every rank can run them (one host's
    GPUs that reach each other), fused with the norms unless --compile-prefill (whose one-layer
    graph cannot hold that) or the model norms after attention and the FFN too (Gemma); NCCL
    otherwise (CPU ranks, several hosts, one GPU), and where the kernels' symmetric-memory
    buffers then cannot be had (run_generate falls back)."""
    if request.engine.tp_all_reduce != "auto":
        return request.engine.tp_all_reduce
    if not parallel:
        return "nccl"
    from infermeter.engine.parallel.all_reduce import peer_all_reduce_usable

    if not peer_all_reduce_usable(parallel):
        return "nccl"
    post_norms = spec is not None and spec.post_norms
    return "triton-unfused" if request.engine.compile_prefill or post_norms else "triton"


def _all_reduce_options(request: GenerateRequest, parallel: Any) -> dict[str, Any]:
    """The inductor options --tp-all-reduce asks for (none for NCCL's own kernels). run_generate
    resolves auto first; unresolved (one process) it can only mean NCCL."""
    kind = request.engine.tp_all_reduce
    if kind == "nccl" or (kind == "auto" and not parallel):
        return {}
    if not parallel:
        raise InfermeterError(f"--tp-all-reduce {kind} needs --tp 2 or more")
    if kind.startswith("triton"):  # our kernels, set on the loaded model
        if parallel.device.type != "cuda":
            raise InfermeterError(f"--tp-all-reduce {kind} needs CUDA GPUs "
                                  "(symmetric memory); this run's ranks are on the CPU")
        if kind == "triton" and request.engine.compile_prefill:  # fused with norms
            raise InfermeterError(f"--tp-all-reduce {kind} fuses each "
                                  "all-reduce with the next "
                                  "layer's norm, which --compile-prefill's one-layer graph "
                                  "cannot hold: use --tp-all-reduce triton-unfused with it")
        return {}
    if request.engine.compile_backend == "cudagraphs":
        raise InfermeterError(f"--tp-all-reduce {kind} is inductor's lowering: "
                              "it needs the inductor compile backend")
    from infermeter.engine.parallel.all_reduce import one_shot_compile_options

    return one_shot_compile_options(parallel)


def _check_timing(request: GenerateRequest) -> None:
    if request.timing.repeats < 1 or request.timing.warmup < 0:
        raise InfermeterError("--repeats must be at least 1 and --warmup not negative")


def _resolved(request: GenerateRequest, parallel: Any, all_reduce: str,
              tokenizer: Any) -> GenerateRequest:
    """The request with what this run resolved put back in: the tensor-parallel size, the
    all-reduce kind (auto picked) and the inductor options it needs, --until-eos's stop ids."""
    stop_ids = frozenset(tokenizer.stop_ids) if (request.until_eos and tokenizer) else frozenset()
    engine = dataclasses.replace(request.engine, tp_all_reduce=all_reduce)
    engine = dataclasses.replace(engine, compile_options=MappingProxyType(
        _all_reduce_options(dataclasses.replace(request, engine=engine), parallel)))
    return dataclasses.replace(request, tp=parallel.world if parallel else 1, engine=engine,
                               sampling=dataclasses.replace(request.sampling, stop_ids=stop_ids))


def _check_hf(cases: list[Any], parallel: Any, spec: Any = None) -> None:
    """The hf modes need transformers and one GPU: say so before anything is loaded or timed."""
    if not any(case.mode.startswith("hf") for case in cases):
        return
    from infermeter.engine.checkpoint.hf import hf_writable

    if spec is not None and not hf_writable(spec):
        raise InfermeterError(f"model {spec.name}: the hf mode cannot build a {spec.arch} "
                              "model from the engine's weights yet (use the engine's modes)")
    from infermeter.generate.hf import transformers_version

    if transformers_version() is None:
        raise InfermeterError("the hf mode needs transformers (pip install transformers)")
    if parallel:
        raise InfermeterError("the hf mode runs on one GPU (no --tp)")


def _base_config(request: GenerateRequest, device: Any, dtype: str, kv_dtype: str,
                 spec: Any) -> dict[str, Any]:
    """The Result's config fields that every case shares (the schema: docs/design.md)."""
    sampling = request.sampling
    return {"source": request.source, "device": str(device), "dtype": dtype,
            "kv_dtype": kv_dtype, "max_new_tokens": sampling.max_new_tokens,
            "greedy": sampling.greedy, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "seed": sampling.seed, "until_eos": request.until_eos,
            "repeats": request.timing.repeats, "warmup": request.timing.warmup,
            "max_batch_size": request.max_batch_size, "max_positions": spec.max_seq_len,
            "weights": "random" if request.source.startswith("random:") else "checkpoint",
            "weight_format": _weight_format(request, spec)}


def _weight_format(request: GenerateRequest, spec: Any) -> str | None:
    """A GGUF checkpoint's quant type as stored ("gguf Q4_1"); None for other weights."""
    from infermeter.specs.gguf_meta import facts_for

    facts = None if request.source.startswith("random:") else facts_for(spec)
    return facts.weight_format if facts else None


def run_generate(request: GenerateRequest, env: dict[str, Any],
                 progress: Progress | None = None,
                 on_result: Callable[[Result], None] | None = None
                 ) -> tuple[list[Result], list[str]]:
    """Check, load, time every case; the Results (rank 0's, gathered, under tensor parallelism)
    and the decoded texts of the first case's outputs ('' each without a tokenizer)."""
    from infermeter.engine.checkpoint.load import load_weights
    from infermeter.engine.dtypes import run_dtypes
    from infermeter.generate import memory
    from infermeter.generate.cases import plan_cases
    from infermeter.generate.loop import run_generation
    from infermeter.measure.roofline import measure_roofline

    device = torch_device(request.device)
    dtype, kv_dtype = run_dtypes(device, request.dtype, request.kv_dtype)
    spec, weights = _spec(request)
    tokenizer = find_tokenizer(request)
    cases = plan_cases(spec, _prompt_sets(request, tokenizer, spec.vocab_size), request.modes,
                       request.max_new_tokens, request.max_seq_len, request.max_batch_size)
    _check_timing(request)
    # ---- tensor parallelism (engine/parallel/): tp is None unless torchrun started us ----
    from infermeter.engine.parallel.group import init_distributed
    from infermeter.measure.ranks import gather_result

    parallel = init_distributed(request.device, request.tp)
    device = parallel.device if parallel else device
    asked = request.engine.tp_all_reduce
    request = _resolved(request, parallel, resolve_all_reduce(request, parallel, spec), tokenizer)
    # ---- end tensor parallelism ----
    _check_hf(cases, parallel, spec)
    memory.check_cases_fit(spec, cases, dtype, kv_dtype, device, request.tp,
                           request.engine.tp_all_reduce,
                           request.max_new_tokens * request.timing.repeats,
                           request.engine.prefill_chunk, request.engine.prefill_kind,
                           request.engine.moe_kernel, request.engine.chunk_attention,
                           request.engine.compile_backend or "inductor",
                           request.engine.compile_prefill)
    peaks = measure_roofline(device) if request.timing.roofline else None  # before the weights
    model = load_weights(weights, device, dtype, seed=request.sampling.seed, parallel=parallel)
    notes = []
    if parallel and uses_peer_buffer(request.tp, request.engine.tp_all_reduce):  # counted above
        from infermeter.engine.parallel.all_reduce import use_peer_all_reduce
        from infermeter.engine.parallel.peer_all_reduce import PeerBufferUnavailable

        try:
            use_peer_all_reduce(model, parallel, fuse_norm=request.engine.tp_all_reduce == "triton")
        except PeerBufferUnavailable as err:
            if asked != "auto":  # the user's explicit choice: one error line (cli.py)
                raise
            # auto only guessed that the buffers would come: every rank got this error
            # (for_group agrees on it) and the model still has its NCCL all-reduces, so
            # every rank goes on with NCCL, recorded as such (request -> Result config).
            notes.append(f"--tp-all-reduce auto fell back to NCCL: {err}")
            request = _resolved(request, parallel, "nccl", tokenizer)
    if request.until_eos and tokenizer is None:
        notes.append("--until-eos without a tokenizer: no stop ids known, ran fixed length")
    if (text_only := text_model_note(spec)) is not None:  # Gemma 3 from 4B: no vision tower
        notes.append(text_only)
    results: list[Result] = []

    def finish(result: Result) -> None:
        result.warnings[:0] = notes
        result = gather_result(result, parallel)  # every rank's metrics, the slowest's
        results.append(result)
        if on_result:
            on_result(result)

    run_generation(model, cases, request, env, _base_config(request, device, dtype, kv_dtype,
                                                            spec), peaks, progress, finish)
    # The weights' blocks would stay in torch's caching allocator, which the next request's fit
    # check in this process (an A/B's or a sweep's next case) counts as used: run_generation
    # gives back each case's memory but not the weights, held here until now. Its collects
    # already dropped dynamo's caches.
    del model
    memory.collect(device, compiled=False)
    first = next((r.output_token_ids for r in results if r.output_token_ids), [])
    texts = [tokenizer.decode(ids) if tokenizer else "" for ids in first]
    return results, texts
