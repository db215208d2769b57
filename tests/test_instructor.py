"""`Instructor` end to end against sentence-transformers (the PyTorch reference)."""

import numpy as np
import pytest

from instructor_jax import Instructor
from instructor_jax.reference import instructor_embedding_reference, reference_embeddings
from tests.conftest import REFERENCE_NAMES

INSTRUCTIONS = [
    "Represent the Wikipedia question for retrieving supporting documents: ",
    "",  # no instruction
    "Represent the scientific abstract for clustering; it is a long instruction with many pieces, "
    "more pieces than most texts have, so that the pooling mask starts late: ",
    "Represent: ",
]
TEXTS = [
    "where is the food stored in a yam plant",
    "",  # empty text: only </s> (or the instruction's tail) is pooled
    "  Café, naïve, Zürich 東京 ☃ — unicode  ",
    "the old bridge measures heavy rain. " * 30,  # longer than max_seq_length
    "x",
]
PAIRS = [[i, t] for i in INSTRUCTIONS for t in TEXTS]


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_embeddings_match_sentence_transformers(reference_models, name):
    directory, reference = reference_models[name]
    model = Instructor.from_pretrained(directory)
    expected = reference_embeddings(reference, PAIRS)
    for batch_size in (1, 3, 32):
        got = model.encode(PAIRS, batch_size=batch_size)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() < 1e-5, (name, batch_size)


def test_instructor_rule_for_single_piece_instructions(relu_reference):
    directory, reference = relu_reference
    model = Instructor.from_pretrained(directory, pooling_rule="instructor")
    one_piece = next(w for w in ("x", ":", "a") if model.tokenizer.tokenizer(w)["input_ids"].__len__() == 2)
    pairs = [[one_piece, t] for t in TEXTS] + [[INSTRUCTIONS[0], t] for t in TEXTS]
    # n <= 1 pools the instruction's piece too, which sentence-transformers' prompt= would leave out.
    expected = instructor_embedding_reference(reference, pairs)
    assert np.abs(model.encode(pairs) - expected).max() < 1e-5
    assert np.abs(reference_embeddings(reference, pairs[:len(TEXTS)]) - expected[:len(TEXTS)]).max() > 1e-3


def test_input_order_and_independence_from_other_inputs(relu_instructor):
    together = relu_instructor.encode(PAIRS, batch_size=4)
    alone = np.stack([relu_instructor.encode([p])[0] for p in PAIRS[::5]])
    np.testing.assert_allclose(together[::5], alone, atol=1e-6, rtol=0)
    reversed_ = relu_instructor.encode(PAIRS[::-1], batch_size=4)[::-1]
    np.testing.assert_allclose(together, reversed_, atol=1e-6, rtol=0)


def test_one_instruction_for_all_texts(relu_instructor):
    got = relu_instructor.encode(TEXTS, instruction=INSTRUCTIONS[0])
    np.testing.assert_array_equal(got, relu_instructor.encode([[INSTRUCTIONS[0], t] for t in TEXTS]))


def test_empty_input_gives_empty_array(relu_instructor):
    out = relu_instructor.encode([])
    assert out.shape == (0, relu_instructor.dim) and out.dtype == np.float32


def test_compile_count_is_bounded_by_buckets(relu_instructor):
    model = relu_instructor
    rng = np.random.default_rng(0)
    before = model.compile_count
    for n in (1, 7, 40):
        texts = ["word " * int(k) for k in rng.integers(0, 80, size=n)]
        model.encode(texts, instruction="Represent the sentence: ", batch_size=8)
    buckets = (16, 32, 64)  # default_buckets(64)
    assert model.compile_count - before <= len(buckets)


def test_bad_inputs_are_reported_by_index(relu_instructor):
    with pytest.raises(TypeError, match="input 1: the text is a bytes"):
        relu_instructor.encode([["a", "b"], ["a", b"bytes"]])
    with pytest.raises(ValueError, match="input 0 has 3 elements"):
        relu_instructor.encode([["a", "b", "c"]])


def test_save_pretrained_round_trip(relu_instructor, tmp_path):
    relu_instructor.save_pretrained(tmp_path / "native")
    again = Instructor.from_pretrained(tmp_path / "native")
    np.testing.assert_array_equal(again.encode(PAIRS), relu_instructor.encode(PAIRS))
    with pytest.raises(FileExistsError, match="overwrite"):
        relu_instructor.save_pretrained(tmp_path / "native")


@pytest.mark.parametrize("name", ["relu-2x4", "nondefault"])
def test_export_loads_in_plain_sentence_transformers(reference_models, tmp_path, name):
    from sentence_transformers import SentenceTransformer

    directory, reference = reference_models[name]
    model = Instructor.from_pretrained(directory)
    model.export_sentence_transformers(tmp_path / "st", prompts={"query": INSTRUCTIONS[0]})
    exported = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert exported.prompts["query"] == INSTRUCTIONS[0]
    assert exported.max_seq_length == model.config.max_seq_length
    expected = reference_embeddings(reference, PAIRS)  # the PyTorch original, not our own output
    assert np.abs(reference_embeddings(exported, PAIRS) - expected).max() < 1e-5
    by_name = exported.encode([TEXTS[0]], prompt_name="query", show_progress_bar=False)
    assert np.abs(by_name - expected[:1]).max() < 1e-5


def test_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="download the model on one that is online"):
        Instructor.from_pretrained("hkunlp/instructor-nonexistent-model")
    with pytest.raises(OSError, match=r"`hf download hkunlp/instructor-nonexistent-model --local-dir DIR`"):
        Instructor.from_pretrained("hkunlp/instructor-nonexistent-model")  # the CLI huggingface_hub 1.x+ installs
    with pytest.raises(FileNotFoundError, match="/no/such/dir does not exist"):
        Instructor.from_pretrained("/no/such/dir")


def test_a_mistyped_local_path_is_a_missing_path_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs/modl does not exist; did you mean runs/model\?"):
        Instructor.from_pretrained("runs/modl")


def test_none_rule_pools_the_instruction_too(relu_reference):
    """GTR / sentence-T5 style: what sentence-transformers gives for the joined text with no prompt."""
    from instructor_jax.model.tokenization import join_instruction

    directory, reference = relu_reference
    model = Instructor.from_pretrained(directory, pooling_rule="none")
    expected = reference.encode([join_instruction(i, t) for i, t in PAIRS], show_progress_bar=False)
    assert np.abs(model.encode(PAIRS) - expected).max() < 1e-5


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

def test_buckets_the_command_line_refuses_are_refused(relu_instructor):
    for buckets in ([], [0, 64], [-1, 64], [True, 64], [16.5, 64], ["64"]):
        with pytest.raises(ValueError, match=r"buckets must be positive integers \(at least one\)"):
            relu_instructor.encode([["", "a"]], buckets=buckets)
    assert relu_instructor.encode([["", "a"]], buckets=[np.int64(64), 16]).shape == (1, relu_instructor.dim)
