"""Incremental detokenization for streaming, with stop strings.

Text is emitted only once it is stable: a token that ends inside a multi-byte character, or text that might
be the start of a stop string, is held back until the next tokens settle it.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # tokens before this only give context for decoding
        self._read_offset = 0  # tokens before this are already turned into text
        self._pending = ""  # decoded but held back (possible stop-string prefix)
        self.text = ""  # all text emitted so far
        self.stopped = False
        self.num_tokens_at_stop: int | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that became final. After a stop string, returns '' forever."""
        if self.stopped:
            return ""
        for tok in new_token_ids:
            self.token_ids.append(tok)
            prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            full_text = self._decode(self.token_ids[self._prefix_offset:])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                self._pending += full_text[len(prefix_text):]
                self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            if self.stop:
                hit = self._find_stop()
                if hit is not None:
                    out = self._pending[:hit]
                    self._pending = ""
                    self.stopped = True
                    self.num_tokens_at_stop = len(self.token_ids)
                    self.text += out
                    return out
        return self._release(hold=True)

    def _find_stop(self) -> int | None:
        idx = [self._pending.find(s) for s in self.stop]
        idx = [i for i in idx if i >= 0]
        return min(idx) if idx else None

    def _release(self, *, hold: bool) -> str:
        keep = 0
        if hold and self.stop:
            # Hold back the longest tail that is a proper prefix of some stop string.
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self._pending)), 0, -1):
                    if self._pending.endswith(s[:n]):
                        keep = max(keep, n)
                        break
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of generation: release everything, including a trailing incomplete character (as U+FFFD,
        the same text a one-shot decode of all tokens gives)."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text):
            self._pending += full_text[len(prefix_text):]
            self._prefix_offset = self._read_offset = len(self.token_ids)
        return self._release(hold=False)


class TokenTexts:
    """Each token's text as the tokenizer decodes it alone (special tokens included), for logprobs: a token that
    holds part of a multi-byte character reads as U+FFFD, as in other OpenAI-compatible servers. Cached per id:
    logprobs name the same few thousand tokens over and over."""

    def __init__(self, tokenizer, *, max_cached: int = 1 << 16):
        self.tokenizer = tokenizer
        self.max_cached = max_cached
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._texts) >= self.max_cached:
                self._texts.clear()
            self._texts[token_id] = text
        return text
