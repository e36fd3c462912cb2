"""The reference decoder: one Hugging Face `model.generate()` per pixel on the full sequence (prefix + block, image
and depth re-encoded every time), greedy under the same number grammar as the fast decoder. It is what the fast
decoder is checked and benchmarked against (`tests/test_decoder.py`, `vlm-depth bench decoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm_depth.infer.answers import AnswerRecorder, QueryAnswers, step_stats
from vlm_depth.prompts.chat import ChatLayout, QueryTokens
from vlm_depth.prompts.grammar import GrammarLogitsProcessor, NumberGrammar


def _naive_inputs(inputs: Any, query: QueryTokens, device: torch.device) -> dict[str, torch.Tensor]:
    block = torch.tensor(query.prompt + query.answer_prefix, dtype=torch.long)
    input_ids = torch.cat([inputs["input_ids"][0].cpu(), block])[None]
    mm_types = torch.cat([inputs["mm_token_type_ids"][0].cpu(), torch.zeros_like(block, dtype=torch.int)])[None]
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": mm_types.to(inputs["mm_token_type_ids"].dtype),
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
    }
    if inputs.get("depth_maps") is not None:
        out["depth_maps"] = inputs["depth_maps"]
    if query.pointer_xy:
        out["pointer_xy"] = torch.tensor(query.pointer_xy, dtype=torch.float32)
    return {k: v.to(device) for k, v in out.items()}


@torch.no_grad()
def decode_naive(
    model, layout: ChatLayout, inputs: Any, queries: Sequence[QueryTokens], progress: bool = False
) -> QueryAnswers:
    """Reference decoder: one `model.generate()` per query on the full sequence (prefix + block, image and depth
    re-encoded every time), greedy under the same grammar (`GrammarLogitsProcessor`). The expected value, spread,
    flags (FLAG_FORCED always checked: the full logits are there) and margins come from the raw logits of each
    generated step, computed as in `QueryDecoder`."""
    from transformers import LogitsProcessorList

    grammar = NumberGrammar.from_layout(layout)
    eos = layout.tokenizer.eos_token_id
    device = model.get_input_embeddings().weight.device
    steps = grammar.max_tokens
    record = AnswerRecorder(grammar, len(queries), device)
    choice_ids = grammar.choice_ids.to(device)
    for i, query in enumerate(tqdm(queries, desc="naive generate", unit="query", disable=not progress)):
        args = _naive_inputs(inputs, query, device)
        length = args["input_ids"].shape[1]
        out = model.generate(
            **args,
            logits_processor=LogitsProcessorList([GrammarLogitsProcessor(grammar, length, eos)]),
            max_new_tokens=steps + 1,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=layout.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        number = out.sequences[0, length:]
        state = grammar.start(1, device)
        for step, token in enumerate(number.tolist()):
            if bool(grammar.done(state)[0]):
                break
            logits = out.logits[step].to(device)
            stats = step_stats(grammar, logits[:, choice_ids], state, grammar.choices_of(logits.argmax(dim=-1)))
            choice = grammar.choices_of(torch.tensor([token], device=device))
            record.record(torch.tensor([i], device=device), step, stats, choice)
            state = grammar.advance(state, choice.clamp(min=0))
    return record.answers()
