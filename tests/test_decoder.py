"""The batched pixel-query decoder: number grammar, digit moments, shared-prefix attention, and equality of its
greedy answers with one `model.generate()` per pixel (the naive reference) on a briefly trained tiny checkpoint."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from trained_tiny import scene, train_tiny

from vlm_depth.infer.answers import number_moments
from vlm_depth.infer.decoder import QueryDecoder
from vlm_depth.infer.naive import decode_naive
from vlm_depth.infer.prefix_attention import shared_prefix_attention_forward
from vlm_depth.infer.readouts import chat_layout, pixel_queries
from vlm_depth.model.loading import load_model
from vlm_depth.prompts.digits import digit_places
from vlm_depth.prompts.grammar import POINT, GrammarLogitsProcessor, NumberGrammar
from vlm_depth.prompts.numbers import format_meters

NEAR_TIE = 1e-5
GRAMMAR = NumberGrammar(digit_ids=list(range(100, 110)), point_id=110, decimals=3, max_int_digits=3)


def _walk(grammar: NumberGrammar, text: str) -> bool:
    """True when `text` is a complete number of the grammar (every character allowed, done at the end)."""
    state = grammar.start(1)
    for char in text:
        if bool(grammar.done(state)[0]):
            return False
        choice = POINT if char == "." else int(char)
        if not bool(grammar.allowed(state)[0, choice]):
            return False
        state = grammar.advance(state, torch.tensor([choice]))
    return bool(grammar.done(state)[0])


def test_grammar_accepts_exactly_what_format_meters_writes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 1000, 300), [0.0, 0.0004, 1.0, 9.9995, 999.999, 5e6]])
    for value in values:
        assert _walk(GRAMMAR, format_meters(float(value), 3)), format_meters(float(value), 3)
    pattern = re.compile(r"(0|[1-9][0-9]{0,2})\.[0-9]{3}")
    for _ in range(3000):
        text = "".join(rng.choice(list("0123456789."), size=rng.integers(1, 9)))
        assert _walk(GRAMMAR, text) == bool(pattern.fullmatch(text)), text
    for bad in ("01.234", "1.23", "1.2345", "1234.567", ".123", "1..23", "12"):
        assert not _walk(GRAMMAR, bad)


def test_grammar_max_integer_digits_follow_the_formatter_clipping(tiny_ckpt):
    from vlm_depth.model.processor import DepthProcessor
    from vlm_depth.prompts.chat import ChatLayout
    from vlm_depth.prompts.template import PromptTemplate
    from vlm_depth.prompts.textualize import Textualizer

    tokenizer = DepthProcessor.from_pretrained(tiny_ckpt).tokenizer
    for decimals in (1, 3):
        layout = ChatLayout(tokenizer, Textualizer(PromptTemplate.load("paper"), decimals=decimals))
        grammar = NumberGrammar.from_layout(layout)
        assert grammar.max_int_digits == len(format_meters(1e9, decimals).split(".")[0]) == 3
        assert grammar.max_tokens == 3 + 1 + decimals


def test_logits_processor_masks_exactly_the_disallowed_tokens():
    eos = 7
    processor = GrammarLogitsProcessor(GRAMMAR, prompt_length=2, eos_token_id=eos)
    digits, point = list(range(100, 110)), [110]
    cases = {"": digits, "1": digits + point, "0": point, "567": point, "1.23": digits, "1.234": [eos]}
    for text, expected in cases.items():
        history = [1, 2] + [110 if c == "." else 100 + int(c) for c in text]
        out = processor(torch.tensor([history]), torch.zeros(1, 120))
        assert torch.isfinite(out[0]).nonzero().squeeze(1).tolist() == expected, text


def test_number_moments_match_hand_computation():
    # "12.305": digits at places 10, 1, 0.1, 0.01, 0.001; the point (step 2) carries no value.
    places = digit_places([101, 102, 110, 103, 100, 105], list(range(100, 110)), 110)
    means = np.array([1.0, 2.0, 0.0, 3.5, 0.0, 5.0, 0.0], dtype=np.float32)
    variances = np.array([0.0, 0.25, 0.0, 0.25, 0.0, 0.0, 0.0], dtype=np.float32)
    expected, spread = number_moments(places, means, variances)
    assert expected == pytest.approx(10 + 2 + 0.35 + 0.005, abs=1e-6)
    assert spread == pytest.approx(math.sqrt(0.25 + 0.01 * 0.25), abs=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_shared_prefix_attention_equals_sdpa_over_concatenated_keys(fused):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        layer_idx, num_key_value_groups, is_causal = 0, 3, True

    torch.manual_seed(0)
    batch, heads, kv_heads, n, own, prefix, dim = 5, 6, 2, 4, 7, 11, 8
    q = torch.randn(batch, n, heads, dim).transpose(1, 2)  # strided, as the attention layer passes it
    k, v = torch.randn(batch, kv_heads, own, dim), torch.randn(batch, kv_heads, own, dim)
    pk, pv = torch.randn(1, kv_heads, prefix, dim), torch.randn(1, kv_heads, prefix, dim)
    allowed = torch.rand(batch, 1, n, own) > 0.3
    allowed[..., -1] = True
    mask = torch.zeros(batch, 1, n, own).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got, _ = shared_prefix_attention_forward(Layer(), q, k, v, mask, prefix_kv=[(pk, pv)], fused=fused)
    full_k = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)
    full_v = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)
    full_mask = torch.cat([torch.zeros(batch, 1, n, prefix), mask], dim=-1)
    want, _ = sdpa_attention_forward(Layer(), q, full_k, full_v, full_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="session")
def trained(tiny_ckpt, tmp_path_factory):
    """query mode -> folder of a briefly trained tiny checkpoint (shared with test_complete.py)."""
    root = tmp_path_factory.getbasetemp()
    return lambda mode: train_tiny(tiny_ckpt, root / f"trained_tiny_{mode}", mode)


def _query_set(processor, layout, n: int, seed: int):
    """Processor inputs of a 64x48 scene and `n` query blocks at pixels with distinct grid cells (so distinct query
    text in coords mode): n // 2 keep queries at valid input pixels, the rest fill queries at missing ones."""
    rgb, gt = scene(48, 64, seed=seed)
    rng = np.random.default_rng(seed)
    sparse = np.where(rng.random(gt.shape) < 0.5, gt, 0).astype(np.float32)
    wanted = {True: n // 2, False: n - n // 2}  # keep?: count
    cells, picked = set(), []
    for row, col in zip(*np.divmod(rng.permutation(gt.size), gt.shape[1])):
        keep = bool(sparse[row, col] > 0)
        cell = tuple(round(c) for c in processor.to_grid_xy(col, row, gt.shape))
        if wanted[keep] and cell not in cells:
            cells.add(cell)
            picked.append((row, col))
            wanted[keep] -= 1
    rows, cols = np.array(picked).T
    kinds = ["keep" if sparse[r, c] > 0 else "fill" for r, c in picked]
    return (
        processor(rgb, sparse, text=layout.prefix_text()),
        pixel_queries(layout, processor, sparse, rows, cols),
        kinds,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["coords", "pointer"])
def test_fast_decoder_equals_naive_generate_per_pixel(trained, mode, record_property):
    model, processor = load_model(str(trained(mode)), device="cpu")
    layout = chat_layout(model, processor.tokenizer)
    inputs, queries, kinds = _query_set(processor, layout, 256, seed=7)
    assert len(queries) == 256 and kinds.count("keep") == kinds.count("fill") == 128
    # 3 chunks, the last one partial; check_forced: FLAG_FORCED as the naive decoder (full logits) reports it
    decoder = QueryDecoder(model, layout, max_queries_per_pass=100, check_forced=True)
    fast = decoder.decode(decoder.encode_prefix(inputs), queries)
    naive = decode_naive(model, layout, inputs, queries)
    ties = naive.margin < NEAR_TIE
    same = np.array([a == b for a, b in zip(fast.tokens, naive.tokens)])
    record_property(f"{mode}_near_ties", int(ties.sum()))
    print(f"{mode}: {len(queries)} queries, {int(ties.sum())} near-ties (top-two logits within {NEAR_TIE})")
    assert same[~ties].all(), f"{int((~same & ~ties).sum())} answers differ outside near-ties"
    assert ties.sum() <= len(queries) // 20
    np.testing.assert_array_equal(fast.value[~ties], naive.value[~ties])
    np.testing.assert_allclose(fast.expected[~ties], naive.expected[~ties], atol=1e-3)
    np.testing.assert_allclose(fast.spread[~ties], naive.spread[~ties], atol=1e-3)
    np.testing.assert_array_equal(fast.flags[~ties], naive.flags[~ties])
    # A briefly trained model answers in metres, not at the grammar's limits.
    assert np.median(fast.value) < 20 and np.isfinite(fast.value).all()


def test_grammar_head_gives_the_full_heads_answers(trained):
    """Decoding computes only the 11 grammar rows of the LM head; with `check_forced` the full projection is added
    for FLAG_FORCED alone. Both give the same greedy numbers and statistics, and the 11 rows' logits are the full
    head's (float summation order aside)."""
    from vlm_depth.infer.answers import FLAG_FORCED

    model, processor = load_model(str(trained("coords")), device="cpu")
    layout = chat_layout(model, processor.tokenizer)
    inputs, queries, _ = _query_set(processor, layout, 24, seed=5)
    decoders = [QueryDecoder(model, layout, max_queries_per_pass=16, check_forced=c) for c in (False, True)]
    fast, checked = (d.decode(d.encode_prefix(inputs), queries) for d in decoders)
    assert fast.tokens == checked.tokens
    for field in ("value", "expected", "spread", "margin"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(checked, field))
    np.testing.assert_array_equal(fast.flags, checked.flags & ~np.uint8(FLAG_FORCED))
    assert (checked.flags & FLAG_FORCED).any() and not (fast.flags & FLAG_FORCED).any()
    hidden = torch.randn(7, model.config.get_text_config().hidden_size)
    full = model.get_output_embeddings()(hidden)[:, decoders[0].grammar.choice_ids]
    torch.testing.assert_close(torch.nn.functional.linear(hidden, decoders[0].choice_weight), full, atol=1e-5, rtol=0)


def test_layouts_and_prefix_sharing_give_the_same_answers(trained):
    model, processor = load_model(str(trained("coords")), device="cpu")
    layout = chat_layout(model, processor.tokenizer)
    inputs, queries, _ = _query_set(processor, layout, 40, seed=3)
    queries = queries + queries[:5]  # duplicates are decoded once and answered alike
    results = []
    for packing, share in (("batch", True), ("batch", False), ("packed", True)):
        decoder = QueryDecoder(model, layout, max_queries_per_pass=16, packing=packing, share_common_prefix=share)
        results.append(decoder.decode(decoder.encode_prefix(inputs), queries))
    reference = results[0]
    assert reference.tokens[-5:] == reference.tokens[:5]
    for other in results[1:]:
        near = np.minimum(reference.margin, other.margin) < NEAR_TIE
        assert all(a == b for a, b, tie in zip(reference.tokens, other.tokens, near) if not tie)
        np.testing.assert_allclose(other.expected, reference.expected, atol=1e-3)


def test_bench_decoder_reports_speed_and_identical_answers(trained, capsys):
    import json

    from vlm_depth.cli import main

    argv = ["bench", "decoder", "--model", str(trained("coords")), "--query_pixels", "12", "--repeats", "1"]
    assert main([*argv, "--height", "48", "--width", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"query_pixels", "naive_pixels_per_s", "fast_pixels_per_s", "speedup", "overhead_vs_forward", "identical"}
    assert keys <= set(result) and result["query_pixels"] == 12 and result["identical"] is True
    assert result["speedup"] == pytest.approx(result["fast_pixels_per_s"] / result["naive_pixels_per_s"])
    assert all(result["seconds"][k] > 0 for k in ("naive", "fast", "prefix", "decode", "forward"))
    assert result["device"] == "cpu" and result["max_queries_per_pass"] == 128 and result["decode_tflop"] > 0
    assert result["agreement"] == {
        "dtype": "float32",
        "identical_share": 1.0,
        "max_value_diff_m": 0.0,
        "max_expected_diff_m": pytest.approx(0, abs=1e-3),
    }
    # bf16: a near-tie threshold of fp32 means nothing there, so agreement is a share and the largest differences
    assert main([*argv, "--height", "48", "--width", "64", "--dtype", "bfloat16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["identical"] is None and bf16["agreement"]["dtype"] == "bfloat16"
    assert 0 <= bf16["agreement"]["identical_share"] <= 1 and bf16["agreement"]["max_value_diff_m"] >= 0
