"""Per-request bounds on the work a body can ask for, checked before the work is done.

    budget = DecodeBudget(cfg.max_decoded_bytes)
    budget.charge(width * height * 3, "messages[0].content[0]: a 6000x6000 image")   # 400 past the limit
    check_json(body)                                  # 400 past MAX_JSON_DEPTH, or for a lone surrogate

A request's images (as decoded pixels) and its `image_embeds` tensors (as loaded) are charged to its
budget from what their headers and archive directories say, before a byte is decoded; the images
of one request are decoded one after another, so the budget bounds what a request holds at once.
With at most `max_queue` requests admitted, the server holds at most max_queue x max_decoded_bytes
of decoded request data.
"""

from __future__ import annotations

import re
import threading

from .errors import bad_request

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_JSON_DEPTH = 64  # a chat request is about 6 deep; vLLM caps structured-output schemas at 64 too


class DecodeBudget:
    def __init__(self, limit: int):
        self.limit, self.used = int(limit), 0
        self._lock = threading.Lock()

    @property
    def left(self) -> int:
        return self.limit - self.used

    def charge(self, nbytes: int, what: str) -> None:
        """Take `nbytes` for `what`, or refuse the request (400) when they do not fit."""
        with self._lock:
            if nbytes > self.limit - self.used:
                raise bad_request(
                    f"{what} would take {nbytes:,} bytes decoded; this request has {max(0, self.left):,} of its "
                    f"{self.limit:,}-byte decoding budget left (send smaller images or fewer of them)",
                    code="decoded_size_exceeded",
                )
            self.used += int(nbytes)


def check_json(value, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` (walked iteratively: a deep body cannot exhaust the
    stack), or holding a lone surrogate (a "\\ud800" escape JSON allows but UTF-8 cannot encode:
    no tokenizer or upstream takes it)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
            if any(_SURROGATE.search(k) for k in node):
                raise bad_request("the body holds a lone UTF-16 surrogate (not valid Unicode)", code="invalid_json")
        elif isinstance(node, list):
            children = node
        elif isinstance(node, str) and _SURROGATE.search(node):
            raise bad_request("the body holds a lone UTF-16 surrogate (not valid Unicode)", code="invalid_json")
        else:
            continue
        if depth > limit:
            raise bad_request(f"the body is nested deeper than {limit} levels", code="invalid_json")
        stack.extend((child, depth + 1) for child in children)
