"""Post: the last word on what the model said, before anyone sees it.

Works chunk by chunk on streams (so tokens are not held back) and on the
final text: trimming and a hard cap on output length.

Its transforms touch text content only: tool calls and the rest of a
structured reply travel in ``raw``, which post never reads, and a reply the
client asked to be JSON (``verbatim``) is left exactly as the model wrote
it, since a trimmed or cut JSON document is a broken one.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from mpipeline.config import PostConfig
from mpipeline.messages import Completed, Failed, Message, TokenChunk
from mpipeline.stages.base import Stage, StageContext


class Post(Stage[TokenChunk | Completed | Failed, Message]):
    name = "post"

    def __init__(self, config: PostConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config

    def process(self, msg: TokenChunk | Completed | Failed) -> Iterable[Message]:
        if not isinstance(msg, Completed) or msg.verbatim:
            return (msg,)
        text = msg.text.strip() if self._config.strip else msg.text
        finish = msg.finish_reason
        if len(text) > self._config.max_output_chars:
            text = text[: self._config.max_output_chars]
            finish = "length"
        if text is msg.text and finish == msg.finish_reason:
            return (msg,)
        return (msgspec.structs.replace(msg, text=text, finish_reason=finish),)
