"""(instruction, text) pairs -> token ids, attention masks and instruction lengths, as numpy arrays.

The joining and pooling rules are the reference's (InstructorEmbedding and sentence-transformers):
- the model sees `("".join([instruction, text.strip()])).strip()`, truncated to `max_seq_length` tokens
  with `</s>` kept last;
- the first `n = len(tokenize(instruction)) - 1` positions (the instruction's pieces without `</s>`) are
  left out of the mean pooling. The InstructorEmbedding 1.0.1 package, which made the published
  checkpoints, sets `n = 0` when `n <= 1` (rule "instructor"); sentence-transformers' `prompt=` does not
  (rule "sentence-transformers"). They differ only for instructions of a single piece. Rule "none" pools
  the instruction too (n = 0), as GTR and sentence-T5, trained without instructions, do.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np

from instructor_jax.runtime.fileio import check_no_links_out

log = logging.getLogger(__name__)

POOLING_RULES = ("instructor", "sentence-transformers", "none")
# Bounded-memory tokenization (see InstructionTokenizer._content_ids): texts per tokenizer call; characters
# per token a cut text keeps (English averages ~4 with T5's vocabulary); tokens kept past the limit.
TOKENIZE_BATCH = 256
CUT_CHARS_PER_TOKEN = 12
CUT_MARGIN = 8
# The most a text gives the tokenizer, as a multiple of the cut above: a text with no whitespace to cut at
# (CJK, a base64 blob, one 20 MB "word") is cut here, whatever its length, with a warning.
HARD_CUT_FACTOR = 8
WHITESPACE = re.compile(r"\s")
# Half of a UTF-16 surrogate pair, alone: a Python str may hold one (JSON's "\ud800" decodes to it), but it is
# not a character, and the tokenizer refuses it with a TypeError naming no input.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """None for valid text, else what is wrong with it (for an error message that names the input)."""
    found = LONE_SURROGATE.search(text)
    if found is None:
        return None
    return (f"holds a lone surrogate, U+{ord(found.group()):04X} at character {found.start()}, which is not a "
            "character (an escaped \\u{:04x} without its pair in JSON decodes to one); fix or drop the "
            "text".format(ord(found.group())))


def validate_pairs(pairs) -> list[tuple[str, str]]:
    """Checks that `pairs` is a list of [instruction, text] string pairs; returns them as tuples."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError("expected a list of [instruction, text] pairs, got "
                        f"{type(pairs).__name__}; wrap a single pair as [[instruction, text]]")
    checked = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence):
            raise TypeError(f"input {index} is a {type(pair).__name__}, not an [instruction, text] pair; "
                            "pass text with an instruction, e.g. ['Represent the sentence: ', text]")
        if len(pair) != 2:
            raise ValueError(f"input {index} has {len(pair)} elements; each input must be "
                             "[instruction, text] (an instruction may be '' but must be there)")
        for what, value in zip(("instruction", "text"), pair):
            if not isinstance(value, str):
                raise TypeError(f"input {index}: the {what} is a {type(value).__name__}, not a str")
            problem = lone_surrogate(value)
            if problem:
                raise ValueError(f"input {index}: the {what} {problem}")
        checked.append((pair[0], pair[1]))
    return checked


def join_instruction(instruction: str, text: str) -> str:
    """The reference's input string (InstructorEmbedding 1.0.1)."""
    return "".join([instruction, text.strip()]).strip()


@dataclasses.dataclass
class TokenizedPairs:
    """Unpadded token ids per input, and the number of leading positions the pooling skips."""

    input_ids: list[np.ndarray]  # each int32 [length_i], ending in </s>
    instruction_lengths: np.ndarray  # int32 [n]
    num_truncated: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int32)


class InstructionTokenizer:
    """Wraps a transformers tokenizer with the reference's joining, truncation and pooling rules."""

    def __init__(self, tokenizer, max_seq_length: int = 512, pooling_rule: str = "instructor",
                 do_lower_case: bool = False):
        if pooling_rule not in POOLING_RULES:
            raise ValueError(f"pooling_rule must be one of {POOLING_RULES}, got {pooling_rule!r}")
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2 (one token and </s>), got {max_seq_length}")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.pooling_rule = pooling_rule
        self.do_lower_case = do_lower_case
        suffix = tokenizer("", add_special_tokens=True)["input_ids"]
        if len(suffix) != 1 or tokenizer("", add_special_tokens=False)["input_ids"]:
            raise ValueError("expected a T5-style tokenizer that appends exactly one end token and no "
                             f"start token; this one encodes '' as {suffix}")
        self.eos_id = suffix[0]
        # Truncation keeps an input's start, as the reference does, whatever the tokenizer's files say.
        if getattr(tokenizer, "truncation_side", "right") != "right":
            tokenizer.truncation_side = "right"
        self._instruction_cache: dict[str, int] = {}

    @classmethod
    def from_directory(cls, path, **kwargs) -> "InstructionTokenizer":
        from transformers import AutoTokenizer

        if pathlib.Path(path).is_dir():
            # The tokenizer files are read from here: none may be a link to a file elsewhere.
            check_no_links_out(path)
        try:
            # Never run a model directory's own Python (auto_map): transformers would otherwise ask
            # [y/N] on stdin, and a piped `y` runs it.
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:  # transformers raises many kinds; the user needs the path and the fix
            raise ValueError(f"could not load a tokenizer from {path}: {e}. The directory needs the "
                             "tokenizer files saved with the model (tokenizer.json, or spiece.model with "
                             "protobuf installed)") from e
        return cls(tokenizer, **kwargs)

    def _prepare(self, s: str) -> str:
        return s.lower() if self.do_lower_case else s

    def instruction_length(self, instruction: str) -> int:
        """Leading positions excluded from the pooling for this instruction."""
        n = self._instruction_cache.get(instruction)
        if n is None:
            # sentence-transformers strips every text it tokenizes, the prompt included.
            ids = self.tokenizer(self._prepare(instruction.strip()), add_special_tokens=True, truncation=True,
                                 max_length=self.max_seq_length, verbose=False)["input_ids"]
            # Both references tokenize the instruction with the same truncation as the input, so an
            # instruction that fills max_seq_length leaves exactly the final </s> to pool.
            n = min(len(ids), self.max_seq_length) - 1
            if (self.pooling_rule == "instructor" and n <= 1) or self.pooling_rule == "none":
                n = 0
            if n >= self.max_seq_length - 1:
                log.warning("the instruction %r... fills max_seq_length=%d tokens: its embeddings pool only </s>",
                            instruction[:40], self.max_seq_length)
            self._instruction_cache[instruction] = n
        return n

    def _content_ids(self, texts: list[str], limit: int) -> list[list[int]]:
        """The first `limit + 1 + CUT_MARGIN` (or fewer) content token ids of each text, in bounded memory.

        A tokenizer asked to truncate still encodes the whole text and keeps the rest as overflow, so the
        memory of a chunk of long documents would follow their full length. Instead each long text is cut
        first, at a whitespace after CUT_CHARS_PER_TOKEN characters per token that can fit: the tokenizers
        T5 uses segment each whitespace-separated word on its own, so the tokens before the cut are those
        of the whole text. A cut text that yields too few tokens to be sure (long runs of spaces, say) is
        tokenized again up to the hard cut. Nothing past HARD_CUT_FACTOR times the cut reaches the
        tokenizer: a text with no whitespace there is cut inside its "word", whose tokens near that far
        cut may differ from the whole text's (a warning says how many texts were). Texts go through the
        tokenizer a batch at a time, which bounds what it holds.
        """
        wanted = limit + 1 + CUT_MARGIN
        budget = CUT_CHARS_PER_TOKEN * wanted
        hard = HARD_CUT_FACTOR * budget
        cut, hard_cut = [], 0
        for text in texts:
            space = WHITESPACE.search(text, budget, hard) if len(text) > budget else None
            cut.append(text[:space.start()] if space else text[:hard])
            hard_cut += space is None and len(text) > hard
        out: list[list[int]] = []
        for start in range(0, len(cut), TOKENIZE_BATCH):
            batch = cut[start:start + TOKENIZE_BATCH]
            out.extend(self.tokenizer(batch, add_special_tokens=False, truncation=True, max_length=wanted,
                                      verbose=False)["input_ids"])
        for index, (text, prefix) in enumerate(zip(texts, cut)):
            if len(prefix) < min(len(text), hard) and len(out[index]) < wanted:
                out[index] = self.tokenizer(text[:hard], add_special_tokens=False, truncation=True,
                                            max_length=wanted, verbose=False)["input_ids"]
                hard_cut += len(text) > hard
        if hard_cut:
            log.warning("%d of %d texts are longer than %d characters with no whitespace to cut at: each was cut "
                        "at %d characters before tokenizing (to bound memory and time), and its tokens taken from "
                        "that prefix", hard_cut, len(texts), hard, hard)
        return out

    def tokenize(self, pairs, warn_truncation: bool = True) -> TokenizedPairs:
        pairs = validate_pairs(pairs)
        texts = [self._prepare(join_instruction(i, t)) for i, t in pairs]
        limit = self.max_seq_length - 1
        # Tokens beyond `limit` only tell which inputs were truncated (counted for the warning).
        content = self._content_ids(texts, limit) if texts else []
        input_ids, num_truncated = [], 0
        for ids in content:
            if len(ids) > limit:
                num_truncated += 1
                ids = ids[:limit]
            input_ids.append(np.asarray(list(ids) + [self.eos_id], dtype=np.int32))
        if num_truncated and warn_truncation:
            log.warning("%d of %d inputs are longer than max_seq_length=%d tokens and were truncated",
                        num_truncated, len(texts), self.max_seq_length)
        lengths = np.array([self.instruction_length(i) for i, _ in pairs], dtype=np.int32)
        return TokenizedPairs(input_ids, lengths, num_truncated)


def default_buckets(max_seq_length: int) -> tuple[int, ...]:
    """16, 32, 64, then steps of 64 up to max_seq_length: at most ~1/3 padding per input, and ~10
    programs for max_seq_length 512 (powers of two alone waste up to half of every long input)."""
    buckets = [b for b in (16, 32, 64) if b < max_seq_length]
    buckets += list(range(128, max_seq_length, 64))
    return tuple(buckets) + (max_seq_length,)


def check_bucket_values(buckets) -> tuple[int, ...]:
    """The buckets sorted, if there is at least one and each is a positive integer; else ValueError."""
    buckets = list(buckets)
    if not buckets or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in buckets):
        raise ValueError(f"buckets must be positive integers (at least one), got {buckets}")
    return tuple(sorted(int(b) for b in buckets))


def assign_buckets(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Index of the smallest bucket that holds each length."""
    buckets = np.asarray(sorted(buckets))
    if len(lengths) and lengths.max() > buckets[-1]:
        raise ValueError(f"a sequence of {lengths.max()} tokens exceeds the largest bucket {buckets[-1]}")
    return np.searchsorted(buckets, lengths, side="left")


def pad_batch(input_ids: Sequence[np.ndarray], length: int, batch_size: int | None = None):
    """Right-pads ids (pad id 0) to [batch_size, length]; returns (ids, attention_mask) int32."""
    batch_size = len(input_ids) if batch_size is None else batch_size
    ids = np.zeros((batch_size, length), dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=np.int32)
    for row, seq in enumerate(input_ids):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return ids, mask
