"""Token layout of a depth conversation, shared by the training collator and the decoder.

One image gives one *prefix* (system turn, user turn with the image and the shared instruction) and any number of
*query blocks*. A block is the rest of the paper's single-pixel conversation: the fill/keep prompt with the pixel
identification and the question, the end of the user turn, the assistant header, then the answer split into
`answer_prefix` + `number` + `answer_suffix`. Prefix + one block is exactly the paper's training sample; packing
puts K blocks after one prefix (see `vlm_depth.model.packing`). Pieces are tokenised separately and concatenated,
so the decoder can force the template words and decode only the number's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlm_depth.prompts.numbers import format_meters
from vlm_depth.prompts.template import PromptTemplate
from vlm_depth.prompts.textualize import Query, Textualizer

DIGITS = "0123456789"


@dataclass
class QueryTokens:
    """Token ids of one query block; `number` is empty at inference (the decoder fills it)."""

    prompt: list[int]
    answer_prefix: list[int]
    number: list[int]
    answer_suffix: list[int]
    pointer_xy: list[tuple[float, float]] = field(default_factory=list)

    def ids(self) -> list[int]:
        return self.prompt + self.answer_prefix + self.number + self.answer_suffix

    def answer_slice(self) -> slice:
        """Positions of the supervised answer tokens (prefix words, number, suffix, end of turn) in `ids()`."""
        return slice(len(self.prompt), len(self.ids()))


class ChatLayout:
    """Builds prefix text and query blocks in Qwen2.5-VL's chat format for a tokenizer and a textualizer."""

    def __init__(self, tokenizer, textualizer: Textualizer, system: str = "You are a helpful assistant.") -> None:
        self.tokenizer = tokenizer
        self.textualizer = textualizer
        self.system = system
        self.digit_ids = [self._single_id(d) for d in DIGITS]
        self.point_id = self._single_id(".")
        self._turn_switch = self._encode("<|im_end|>\n<|im_start|>assistant\n")
        self._answer_prefix = self._encode(textualizer.answer_prefix())
        self._answer_suffix = self._encode(textualizer.answer_suffix() + "<|im_end|>")

    @classmethod
    def from_branch_config(cls, tokenizer, depth_cfg) -> ChatLayout:
        """The layout a checkpoint was trained with: template, query mode, decimals and pointer token of its
        `DepthBranchConfig`."""
        textualizer = Textualizer(
            PromptTemplate.load(depth_cfg.template), depth_cfg.query_mode, depth_cfg.decimals, depth_cfg.pointer_token
        )
        return cls(tokenizer, textualizer)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _single_id(self, char: str) -> int:
        ids = self._encode(char)
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits {char!r} into {len(ids)} tokens; numbers need single-char tokens")
        return ids[0]

    def prefix_text(self) -> str:
        """Chat text up to the end of the shared instruction, with one `<|image_pad|>` the processor expands."""
        return (
            f"<|im_start|>system\n{self.system}<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{self.textualizer.instruction()}"
        )

    def query_tokens(self, query: Query, grid_xy: tuple[float, float], label: float | None = None) -> QueryTokens:
        """Block for `query` whose pixel lies at `grid_xy` on the processor's resized grid; `label` in meters adds
        the number tokens (training), None leaves them empty (inference)."""
        # floor(g + 0.5), not round(): half-to-even would disagree with where resize_depth puts the pixel's depth
        grid_px = (math.floor(grid_xy[0] + 0.5), math.floor(grid_xy[1] + 0.5))
        prompt = self._encode(self.textualizer.query_prompt(query, grid_px))
        number = [] if label is None else self.number_ids(label)
        pointers = [grid_xy] if self.textualizer.query_mode == "pointer" else []
        return QueryTokens(
            prompt + self._turn_switch, list(self._answer_prefix), number, list(self._answer_suffix), pointers
        )

    def number_ids(self, meters: float) -> list[int]:
        """Token ids of `meters` formatted with the textualizer's decimals (one token per character)."""
        text = format_meters(meters, decimals=self.textualizer.decimals)
        return [self.point_id if c == "." else self.digit_ids[int(c)] for c in text]
