"""The built-in corpus and the step-addressed batch source."""

from __future__ import annotations

import numpy as np
import pytest

from meshpar.errors import MeshparError
from meshpar.train.data import TokenBatches, load_corpus, unigram_entropy


def test_corpus_is_large_real_text():
    corpus = load_corpus()
    assert corpus.dtype == np.uint8 and corpus.ndim == 1
    assert len(corpus) > 300_000
    text = bytes(corpus).decode("utf-8")  # valid UTF-8 throughout
    assert text.count(" the ") > 1000
    assert "def " in text and "class " in text
    assert np.mean(corpus < 128) > 0.99  # mostly ASCII English
    assert load_corpus() is not None and len(load_corpus()) == len(corpus)


def test_corpus_is_read_only():
    with pytest.raises(ValueError):
        load_corpus()[0] = 0


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 0, 1])) == pytest.approx(np.log(2))
    assert unigram_entropy(np.zeros(10, np.int32)) == pytest.approx(0.0)
    # Measured 3.26 nats on CPython 3.11; English bytes sit well below ln(256) = 5.55.
    assert 3.0 < unigram_entropy(load_corpus()) < 3.6
    with pytest.raises(MeshparError, match="empty"):
        unigram_entropy(np.array([], np.int32))
    with pytest.raises(MeshparError, match="integers"):
        unigram_entropy(np.array([0.5]))


def test_batch_is_a_pure_function_of_seed_and_step():
    data = TokenBatches(batch_size=4, seq_len=16, seed=3)
    a, b = data.batch(7), TokenBatches(batch_size=4, seq_len=16, seed=3).batch(7)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
    assert not np.array_equal(a["inputs"], data.batch(8)["inputs"])
    assert not np.array_equal(a["inputs"], TokenBatches(4, 16, seed=4).batch(7)["inputs"])


def test_batch_shapes_and_shift():
    data = TokenBatches(batch_size=3, seq_len=20, seed=0)
    batch = data.batch(0)
    assert set(batch) == {"inputs", "targets"}
    for key in ("inputs", "targets"):
        assert batch[key].shape == (3, 20) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    corpus = bytes(load_corpus())
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        window = bytes(inputs.astype(np.uint8)) + bytes([int(targets[-1])])
        assert window in corpus  # each row is one contiguous window of seq_len + 1 bytes


def test_iterate_resumes_at_step():
    data = TokenBatches(batch_size=2, seq_len=8, seed=1)
    it = data.iterate(start_step=5)
    for expected in (5, 6):
        step, batch = next(it)
        assert step == expected
        np.testing.assert_array_equal(batch["inputs"], data.batch(expected)["inputs"])
    first = next(iter(data))
    np.testing.assert_array_equal(first["inputs"], data.batch(0)["inputs"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0, seq_len=8), r"batch_size=0"),
        (dict(batch_size=2, seq_len=0), r"seq_len=0"),
        (dict(batch_size=2, seq_len=10_000_000), r"seq_len=10000000 .*corpus"),
        (dict(batch_size=2, seq_len=8, seed=-1), r"seed=-1"),
        (dict(batch_size=2.0, seq_len=8), r"batch_size=2.0 must be an int"),
    ],
)
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(MeshparError, match=match):
        TokenBatches(**kwargs)


def test_seq_len_equal_to_corpus_raises():
    with pytest.raises(MeshparError, match="seq_len"):
        TokenBatches(batch_size=1, seq_len=len(load_corpus()))


def test_bad_step_raises():
    data = TokenBatches(batch_size=1, seq_len=8)
    with pytest.raises(MeshparError, match=r"step=-1"):
        data.batch(-1)
    with pytest.raises(MeshparError, match=r"start_step=-2"):
        next(data.iterate(-2))
