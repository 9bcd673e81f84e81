"""The inference service's own limits on what one Score message may carry.

The gateway checks texts before they reach the model, but the service is a
network service of its own: whoever reaches its port must not get past the
gateway's limits by calling it directly. A text over `max_text_bytes` gets
a per-item INVALID_ARGUMENT result; so does every text of a message with
more than `max_message_texts` texts. Per item rather than ending the stream:
the stream is shared by every caller of one gateway process, and ending it
would fail (and resend) all their texts in flight for one bad message. The
service's maximum receive message size follows from both limits, so a
message that could never pass is refused by gRPC before it is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.channel_options import MESSAGE_MAX_ITEMS
from protos.errors import InvalidInput

__all__ = ["ScoreLimits"]

_ITEM_FRAMING = 32  # bytes of protobuf around one ScoreItem's text (id, timeout, tags, lengths), at most
_MESSAGE_SLACK = 64 * 1024


@dataclass(frozen=True)
class ScoreLimits:
    max_text_bytes: int = 8192       # the gateway's default --max-text-bytes: the two agree
    max_message_texts: int = 1024    # the gateway's client sends at most MESSAGE_MAX_ITEMS per message

    def __post_init__(self) -> None:
        if not 1 <= self.max_text_bytes <= 1 << 20:
            raise ValueError(f"max_text_bytes must be in 1..1048576, got {self.max_text_bytes}")
        if not MESSAGE_MAX_ITEMS <= self.max_message_texts <= 100_000:
            raise ValueError(f"max_message_texts must be in {MESSAGE_MAX_ITEMS}..100000 (the gateway sends up to "
                             f"{MESSAGE_MAX_ITEMS} texts per message), got {self.max_message_texts}")

    def max_message_bytes(self) -> int:
        """The largest Score message a client within the limits can send (cancel ids included)."""
        return self.max_message_texts * (self.max_text_bytes + _ITEM_FRAMING) + _MESSAGE_SLACK

    def message_error(self, texts: int) -> InvalidInput | None:
        if texts <= self.max_message_texts:
            return None
        return InvalidInput(f"the Score message carries {texts} texts; the limit is {self.max_message_texts} "
                            "(inference --max-message-texts): send fewer per message")

    def text_error(self, text: str) -> InvalidInput | None:
        limit = self.max_text_bytes
        if len(text) * 4 <= limit:  # no UTF-8 encoding of it can be longer: skip encoding
            return None
        size = len(text.encode("utf-8", "surrogatepass"))
        if size <= limit:
            return None
        return InvalidInput(f"the text is {size} bytes of UTF-8; the limit is {limit} (inference --max-text-bytes)")
