"""Joining, truncation and instruction lengths against the transformers tokenizer and the reference rules."""

import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from instructor_jax.reference import TINY_TOKENIZER
from instructor_jax.model.tokenization import InstructionTokenizer, join_instruction, pad_batch, validate_pairs

QUERY = "Represent the Wikipedia question for retrieving supporting documents: "


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


def test_join_rule_of_instructor_embedding_1_0_1():
    assert join_instruction(QUERY, "  where is it \n") == QUERY + "where is it"
    assert join_instruction(QUERY, "") == QUERY.strip()
    assert join_instruction("", " text ") == "text"


def test_ids_and_truncation_match_the_transformers_tokenizer(hf_tokenizer, caplog):
    tok = InstructionTokenizer(hf_tokenizer, max_seq_length=24)
    pairs = [[QUERY, "where is the food stored in a yam plant"], ["", ""], ["x", "Zürich 東京 ☃"],
             ["Represent the sentence: ", "word " * 50]]
    with caplog.at_level(logging.WARNING):
        out = tok.tokenize(pairs)
    for (instruction, text), ids in zip(pairs, out.input_ids):
        expected = hf_tokenizer(join_instruction(instruction, text), truncation=True, max_length=24)["input_ids"]
        assert ids.tolist() == expected
    assert out.num_truncated == 2
    assert "2 of 4 inputs are longer than max_seq_length=24" in caplog.text


def test_instruction_lengths_follow_each_rule(hf_tokenizer):
    pieces = len(hf_tokenizer(QUERY)["input_ids"]) - 1
    one_piece = next(w for w in ("x", ":", "a") if len(hf_tokenizer(w)["input_ids"]) == 2)
    instructor = InstructionTokenizer(hf_tokenizer, pooling_rule="instructor")
    modern = InstructionTokenizer(hf_tokenizer, pooling_rule="sentence-transformers")
    assert instructor.instruction_length(QUERY) == modern.instruction_length(QUERY) == pieces > 1
    assert instructor.instruction_length(one_piece) == 0  # InstructorEmbedding 1.0.1: n <= 1 -> 0
    assert modern.instruction_length(one_piece) == 1
    assert instructor.instruction_length("") == modern.instruction_length("") == 0


def test_pad_batch():
    ids, mask = pad_batch([np.array([5, 6, 1]), np.array([1])], length=4, batch_size=3)
    assert ids.tolist() == [[5, 6, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("bad, error, message", [
    ("just a string", TypeError, "list of \\[instruction, text\\] pairs"),
    ([["only one"]], ValueError, "input 0 has 1 elements"),
    ([["a", "b"], ["a", "b", "c"]], ValueError, "input 1 has 3 elements"),
    ([["a", 3]], TypeError, "input 0: the text is a int"),
    ([[None, "b"]], TypeError, "input 0: the instruction is a NoneType"),
    (["a text without instruction"], TypeError, "input 0 is a str"),
])
def test_bad_pairs_get_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        validate_pairs(bad)


def test_long_texts_are_truncated_while_tokenizing(hf_tokenizer):
    """Memory stays bounded by inputs x max_seq_length: the tokenizer never sees, nor hands back, a whole
    long text; the ids and the truncation count are those of tokenizing everything and cutting."""
    from instructor_jax.model.tokenization import CUT_MARGIN

    seen, returned = [], []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, texts, **kwargs):
            out = self.inner(texts, **kwargs)
            batch = texts if isinstance(texts, list) else [texts]
            seen.extend(len(t) for t in batch)
            returned.extend(len(x) for x in (out["input_ids"] if isinstance(texts, list) else [out["input_ids"]]))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    tok = InstructionTokenizer(Recording(hf_tokenizer), max_seq_length=24)
    spaces = "a" + " " * 3000 + " ".join(["b"] * 40)  # few tokens per character: cut, then tokenized whole
    pairs = [["Represent the sentence: ", "word " * 5000], ["", "short"], [QUERY * 50, "x"], ["", spaces]]
    out = tok.tokenize(pairs, warn_truncation=False)
    full = InstructionTokenizer(hf_tokenizer, max_seq_length=10 ** 6).tokenize(pairs, warn_truncation=False)
    assert max(returned) <= 24 + CUT_MARGIN and max(seen[:3]) < 1000 and out.num_truncated == 3
    for cut, whole in zip(out.input_ids, full.input_ids):
        np.testing.assert_array_equal(cut, np.append(whole[:-1][:23], whole[-1]))


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_a_lone_surrogate_is_named_by_input(hf_tokenizer):
    with pytest.raises(ValueError, match=r"input 1: the text holds a lone surrogate, U\+D800 at character 2"):
        validate_pairs([["a", "b"], ["", "ok\ud800"]])
    with pytest.raises(ValueError, match=r"input 0: the instruction holds a lone surrogate, U\+DFFF"):
        InstructionTokenizer(hf_tokenizer).tokenize([["\udfff: ", "text"]])
    assert validate_pairs([["", "\U0001f600 a pair is fine"]])  # an astral character is no surrogate in a str


@pytest.mark.fast
def test_a_long_text_without_whitespace_is_cut_before_the_tokenizer(hf_tokenizer, caplog):
    from instructor_jax.model.tokenization import CUT_CHARS_PER_TOKEN, CUT_MARGIN, HARD_CUT_FACTOR

    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, texts, **kwargs):
            seen.extend(len(t) for t in (texts if isinstance(texts, list) else [texts]))
            return self.inner(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    hard = HARD_CUT_FACTOR * CUT_CHARS_PER_TOKEN * (23 + 1 + CUT_MARGIN)
    blob = "riverbank" * 20_000  # one 180,000-character word; "ab" runs of a base64 blob, CJK, ... alike
    pairs = [["Represent the sentence: ", blob], ["", "   " + "x" * (hard + 10)], ["", "short"]]
    with caplog.at_level(logging.WARNING):
        out = InstructionTokenizer(Recording(hf_tokenizer), max_seq_length=24).tokenize(pairs, warn_truncation=False)
    assert max(seen) <= hard
    assert "2 of 3 texts are longer than" in caplog.text and f"cut at {hard} characters" in caplog.text
    full = InstructionTokenizer(hf_tokenizer, max_seq_length=10 ** 6).tokenize(pairs[:1], warn_truncation=False)
    np.testing.assert_array_equal(out.input_ids[0], np.append(full.input_ids[0][:23], full.input_ids[0][-1]))
