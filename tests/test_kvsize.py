"""KV-cache and weight sizing against values computed by hand, one kind of model at a time."""

import pytest

from infermeter.errors import InfermeterError
from infermeter.specs import sizes
from infermeter.specs.presets import PRESETS

MiB = 2**20


def test_seed_case_llama2_7b():
    # 32 layers x K,V x [1, 512, 32, 128] fp16 = 32 * 2 * 512 * 32 * 128 * 2 bytes = 256 MiB
    assert sizes.kv_cache_bytes(PRESETS["llama-2-7b"], 1, 512, "fp16") == 268_435_456
    assert sizes.kv_bytes_per_token(PRESETS["llama-2-7b"], "fp16") == 512 * 1024


def test_seed_case_llama2_13b_tp2():
    # 40 layers x 2 x 512 tokens x 20 of 40 heads x 128 x 2 bytes per rank
    spec = PRESETS["llama-2-13b"]
    assert sizes.kv_cache_bytes(spec, 1, 512, "fp16", tp=2) == 209_715_200
    assert sizes.kv_cache_bytes(spec, 1, 512, "fp16") == 2 * 209_715_200


def test_gqa_llama3_8b():
    spec = PRESETS["llama-3-8b"]  # 8 KV heads for 32 query heads
    assert sizes.kv_bytes_per_token(spec, "bf16") == 2 * 32 * 8 * 128 * 2 == 131_072
    assert sizes.kv_cache_bytes(spec, 4, 1000, "bf16") == 4 * 1000 * 131_072


@pytest.mark.parametrize("dtype, nbytes", [("fp32", 4), ("float16", 2), ("bf16", 2),
                                           ("fp8", 1), ("int8", 1), ("half", 2)])
def test_kv_dtypes(dtype, nbytes):
    spec = PRESETS["llama-3-8b"]
    assert sizes.kv_bytes_per_token(spec, dtype) == 2 * 32 * 8 * 128 * nbytes


def test_mqa_replicated_under_tp():
    spec = PRESETS["debug"].with_updates(n_heads=8, n_kv_heads=1, head_dim=8)
    whole = sizes.kv_cache_bytes(spec, 2, 100, "fp16")
    assert whole == 2 * 100 * 2 * 2 * 1 * 8 * 2  # batch, tokens, layers, K/V, head, dim, bytes
    # With one KV head, every rank keeps the whole cache.
    assert sizes.kv_cache_bytes(spec, 2, 100, "fp16", tp=4) == whole


def test_kv_heads_replicated_when_tp_exceeds_them():
    spec = PRESETS["llama-3-8b"]  # 8 KV heads
    per_rank = sizes.kv_cache_bytes(spec, 1, 1024, "bf16", tp=16)
    assert sizes.kv_heads_per_rank(spec, 16) == 1
    assert per_rank == 1024 * 32 * 2 * 1 * 128 * 2
    # 16 ranks hold twice the logical cache: each head lives on two ranks.
    assert 16 * per_rank == 2 * sizes.kv_cache_bytes(spec, 1, 1024, "bf16")


def test_mla_deepseek_v3():
    spec = PRESETS["deepseek-v3"]  # one latent of 512 + a rope key of 64, no K/V pair
    assert sizes.kv_bytes_per_token(spec, "bf16") == 61 * (512 + 64) * 2 == 70_272
    assert sizes.kv_cache_bytes(spec, 1, 4096, "bf16") == 4096 * 70_272
    # The latent is shared by all heads: every rank holds it whole.
    assert sizes.kv_cache_bytes(spec, 1, 4096, "bf16", tp=8) == 4096 * 70_272


def test_sliding_window_all_layers_mistral():
    spec = PRESETS["mistral-7b"]  # window 4096 on all 32 layers, 8 KV heads
    per_token_layer = 2 * 8 * 128 * 2
    assert sizes.kv_cache_bytes(spec, 1, 1000, "bf16") == 32 * 1000 * per_token_layer
    assert sizes.kv_cache_bytes(spec, 1, 32768, "bf16") == 32 * 4096 * per_token_layer
    assert sizes.kv_cache_bytes(spec, 3, 8192, "bf16") == 3 * 32 * 4096 * per_token_layer


def test_sliding_window_alternating_gemma2():
    spec = PRESETS["gemma-2-9b"]  # 21 layers slide (4096), 21 attend to everything
    per_token_layer = 2 * 8 * 256 * 2
    assert sizes.kv_cache_bytes(spec, 1, 8192, "bf16") == (21 * 8192 + 21 * 4096) * 8192
    assert sizes.kv_cache_bytes(spec, 1, 2048, "bf16") == 42 * 2048 * per_token_layer


def test_moe_kv_is_the_dense_attention_and_weights_split_total_active():
    mixtral = PRESETS["mixtral-8x7b"]
    assert sizes.kv_bytes_per_token(mixtral, "bf16") == sizes.kv_bytes_per_token(
        PRESETS["mistral-7b"], "bf16")
    total = sizes.weight_bytes(mixtral, "bf16")
    active = sizes.weight_bytes(mixtral, "bf16", active=True)
    # 6 of 8 experts idle per token: 32 layers x 6 experts x 3 x 4096 x 14336 params x 2 bytes
    assert total - active == 32 * 6 * 3 * 4096 * 14336 * 2


def test_weight_bytes_per_rank():
    spec = PRESETS["llama-2-13b"]
    norms = (2 * 40 + 1) * 5120  # replicated on every rank
    total = sizes.param_count(spec)
    assert sizes.weight_bytes_per_rank(spec, "fp16", 2) == ((total - norms) // 2 + norms) * 2
    assert sizes.weight_bytes_per_rank(spec, "fp16", 1) == total * 2


def test_weights_per_rank_include_replicated_kv_heads():
    spec = PRESETS["llama-3-8b"]
    kv_params = 32 * 2 * 4096 * 8 * 128
    # At tp 16 each of 8 KV heads lives on 2 ranks: one extra copy of wk/wv spread over 16.
    extra = sizes.weight_bytes_per_rank(spec, "bf16", 16) - sizes.weight_bytes_per_rank(
        spec.with_updates(n_kv_heads=16), "bf16", 16)
    own_share = 2 * (kv_params // 16 - 2 * kv_params // 16)  # wk, wv for 8 vs 16 heads
    assert extra == kv_params // 16 * 2 + own_share


@pytest.mark.parametrize("tp, message", [(3, "does not divide"), (0, "must be positive"),
                                         (-2, "must be positive")])
def test_bad_tp(tp, message):
    with pytest.raises(InfermeterError, match=message):
        sizes.kv_cache_bytes(PRESETS["llama-2-7b"], 1, 512, "fp16", tp=tp)


def test_tp_that_neither_divides_nor_multiplies_kv_heads():
    spec = PRESETS["debug"].with_updates(n_heads=12, n_kv_heads=4)
    with pytest.raises(InfermeterError, match="neither divides"):
        sizes.check_tp(spec, 6)


@pytest.mark.parametrize("batch, seq", [(0, 512), (1, 0), (-1, 5)])
def test_non_positive_sizes(batch, seq):
    with pytest.raises(InfermeterError, match="must be positive"):
        sizes.kv_cache_bytes(PRESETS["llama-2-7b"], batch, seq, "fp16")


def test_what_fits_on_an_80gib_gpu():
    spec = PRESETS["llama-2-7b"]
    fit = sizes.kv_budget(spec, "fp16", 1, 80 * 2**30, reserve=0)
    assert fit.weight_bytes_per_rank == 6_738_415_616 * 2
    assert fit.kv_budget_bytes == 80 * 2**30 - 6_738_415_616 * 2 == 72_422_514_688
    assert sizes.max_batch(spec, 512, "fp16", 1, fit.kv_budget_bytes) == 269  # 269.8 caches
    assert sizes.max_seq_len(spec, 64, "fp16", 1, fit.kv_budget_bytes) == 2158
    assert sizes.max_seq_len(spec, 1, "fp16", 1, fit.kv_budget_bytes) == 4096  # model max


def test_max_seq_len_with_windows_is_the_exact_boundary():
    spec = PRESETS["gemma-2-9b"]
    budget = 3 * 2**29  # 1.5 GiB: 21 * s + 21 * 4096 token-layers of 8 KiB -> s = 5266
    longest = sizes.max_seq_len(spec, 1, "bf16", 1, budget)
    assert longest == 5266
    assert sizes.kv_cache_bytes(spec, 1, longest, "bf16") <= budget
    assert sizes.kv_cache_bytes(spec, 1, longest + 1, "bf16") > budget


def test_nothing_fits_when_weights_exceed_memory():
    spec = PRESETS["llama-2-70b"]
    fit = sizes.kv_budget(spec, "fp16", 1, 80 * 2**30, reserve=0)
    assert fit.kv_budget_bytes < 0
    assert sizes.max_batch(spec, 512, "fp16", 1, fit.kv_budget_bytes) == 0
    assert sizes.max_seq_len(spec, 1, "fp16", 1, fit.kv_budget_bytes) == 0


def test_kvsize_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, infermeter.specs.sizes, infermeter.specs.loaders, infermeter.kv.job; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
