"""Token lengths of whole conversations, exactly as training will see them, fast enough for 100k examples.

The length of an example is the number of tokens of its chat-template rendering (no generation
prompt), tokenized without adding special tokens: the same `input_ids` `phitune.chat.encode_chat`
builds. Two things make it fast:

- Rendering: Jinja costs ~60 us per conversation. Most templates paste each message's content
  verbatim between fixed pieces that depend only on the sequence of roles, so the template is
  rendered once per role sequence with placeholder contents, and conversations are then assembled by
  string joins. Whether the template really treats content verbatim is checked, not assumed: with a
  whitespace/brace probe at start-up, and against the real template for the first conversation of
  every role sequence. A template that fails either check (e.g. one that trims content) is rendered
  by Jinja for every conversation: slower, never wrong.
- Tokenizing: one `encode_batch_fast` call per chunk in the Rust tokenizer (all cores, no offsets),
  which releases the GIL, so the caller parses the next chunk while this one is tokenized. The
  tokenizer splits text at its added tokens (`<|im_start|>`...) before anything else and encodes the
  pieces independently, so a conversation's length is the number of added tokens plus the lengths of
  the pieces between them; pieces that repeat (system prompts, separators) are counted once and
  remembered. That identity holds only for added tokens without lstrip/rstrip/single_word (Phi-3's
  have rstrip) and without a normalizer before matching; otherwise whole texts are encoded. It is
  also checked against whole-text encoding on the first texts counted.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from phitune.chat import render

_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never produced by a template itself
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
_PROBE = "  probe {{ x }} \n\t with spaces  "
_MEMO_MAX = 4096  # remembered pieces (bounded memory)
_CHECK_TEXTS = 64
_SHAPES_MAX = 1024  # role sequences with a cached skeleton; rarer shapes are rendered by Jinja


class TemplateRejected(Exception):
    """The chat template raised for this conversation (e.g. a role order the model does not accept)."""


class TokenCounter:
    """Render conversations with a tokenizer's chat template and count their tokens in batches."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        self._backend = _plain_backend(tokenizer)
        self._splitter = _added_token_splitter(self._backend) if self._backend is not None else None
        self._memo: dict[str, int] = {}
        self.seconds = 0.0  # wall time spent counting (on whichever thread calls count)
        self._checked = False
        self._skeletons: dict[tuple[str, ...], list[str] | None] = {}
        self._verified: set[tuple[str, ...]] = set()
        self.fast_render = self._probe_verbatim()

    def _probe_verbatim(self) -> bool:
        """True when the template pastes content unchanged (checked on padded, brace-laden content)."""
        probe = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE + "!"}]
        try:
            skeleton = self._skeleton(("user", "assistant"))
            return skeleton is not None and _fill(skeleton, probe) == render(self.tokenizer, probe)
        except Exception:  # any template error: fall back to plain rendering
            return False

    def _skeleton(self, roles: tuple[str, ...]) -> list[str] | None:
        """The template's text around each content for this role sequence, or None if not separable."""
        if roles not in self._skeletons:
            if len(self._skeletons) >= _SHAPES_MAX:
                return None
            placeholders = [{"role": r, "content": _PLACEHOLDER.format(i)} for i, r in enumerate(roles)]
            try:
                parts = _PLACEHOLDER_RE.split(render(self.tokenizer, placeholders))
            except Exception:
                parts = []
            # split() alternates text, index, text...: separable iff every content appears once, in order.
            ok = parts[1::2] == [str(i) for i in range(len(roles))]
            self._skeletons[roles] = parts[0::2] if ok else None
        return self._skeletons[roles]

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The conversation as the template writes it; raises TemplateRejected when the template refuses it."""
        skeleton = None
        if self.fast_render and all(len(m) == 2 for m in messages):  # only role + content: nothing else to render
            roles = tuple(m["role"] for m in messages)
            skeleton = self._skeleton(roles)
            if skeleton is not None and roles not in self._verified:
                if _fill(skeleton, messages) != self._render_template(messages):
                    self._skeletons[roles] = skeleton = None
                self._verified.add(roles)
        return _fill(skeleton, messages) if skeleton is not None else self._render_template(messages)

    def _render_template(self, messages: Sequence[dict[str, Any]]) -> str:
        try:
            return render(self.tokenizer, messages)
        except Exception as exc:  # Jinja's raise_exception, or any error a template's own logic hits
            raise TemplateRejected(str(exc) or type(exc).__name__) from None

    def count(self, texts: list[str]) -> list[int]:
        """Token count of each rendered text (special tokens only where the template wrote them)."""
        start = time.perf_counter()
        try:
            return self._count(texts)
        finally:
            self.seconds += time.perf_counter() - start

    def _count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self._backend is None:
            return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if self._splitter is None:
            return self._encode(texts)
        counts = self._count_pieces(texts)
        if not self._checked:  # the identity above, checked once on real texts
            sample = texts[:_CHECK_TEXTS]
            if counts[: len(sample)] != self._encode(sample):
                self._splitter = None
                return self._encode(texts)
            self._checked = True
        return counts

    def _encode(self, texts: list[str]) -> list[int]:
        return [len(e) for e in self._backend.encode_batch_fast(texts, False)]

    def _count_pieces(self, texts: list[str]) -> list[int]:
        memo, split = self._memo, self._splitter.split
        parts_of = [split(t)[0::2] for t in texts]  # the text between added tokens (capturing split: every other item)
        seen = Counter(p for parts in parts_of for p in parts)
        missing = [p for p in seen if p not in memo]
        counts = dict(zip(missing, self._encode(missing)))
        # Remember only what repeats within a chunk (system prompts, separators): unique turns would just churn the memo.
        for p in missing:
            if seen[p] > 1 and len(memo) < _MEMO_MAX:
                memo[p] = counts[p]
        counts.update((p, memo[p]) for p in seen if p not in counts)
        return [len(parts) - 1 + sum(counts[p] for p in parts) for parts in parts_of]


def _plain_backend(tokenizer: Any) -> Any:
    """A private copy of the Rust tokenizer without truncation or padding (a saved one may carry either), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    own.encode_special_tokens = backend.encode_special_tokens
    return own


def _added_token_splitter(backend: Any) -> re.Pattern[str] | None:
    """A regex that splits text where the tokenizer itself does (its added tokens), or None when that is not exact."""
    added = list(backend.get_added_tokens_decoder().values())
    if not added or backend.encode_special_tokens:
        return None
    if any(t.lstrip or t.rstrip or t.single_word or (t.normalized and backend.normalizer is not None) for t in added):
        return None
    # Longest first: at one position the regex takes the first alternative, the tokenizer the longest match.
    contents = sorted({t.content for t in added}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, contents)) + ")")


def _fill(skeleton: list[str], messages: Sequence[dict[str, Any]]) -> str:
    out = [skeleton[0]]
    for piece, message in zip(skeleton[1:], messages):
        out.append(message["content"])
        out.append(piece)
    return "".join(out)
