import numpy as np
import pytest
import torch

from lmlab.data.loader import TokenBatches, document_ids, eval_batches
from lmlab.errors import DataError


def test_windows_are_shifted_pairs_and_cover_an_epoch():
    tokens = np.arange(1001, dtype=np.uint16)
    tb = TokenBatches(tokens, seq_len=10, batch_size=4, seed=0)
    starts = []
    for _ in range(tb.n_windows // 4):
        x, y = tb.next()
        assert x.shape == (4, 10) and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
        starts += x[:, 0].tolist()
    assert sorted(starts) == list(range(0, 1000, 10))[: len(starts)] or len(set(starts)) == len(starts)
    assert len(set(starts)) == len(starts)  # no window twice within an epoch


def test_resume_mid_epoch_gives_identical_batches():
    tokens = np.random.default_rng(0).integers(0, 500, 5000).astype(np.uint16)
    a = TokenBatches(tokens, 16, 3, seed=7)
    for _ in range(50):  # crosses an epoch boundary (5000 // 16 = 312 windows, 104 batches/epoch)
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(80)]
    b = TokenBatches(tokens, 16, 3, seed=7)
    b.load_state_dict(state)
    got = [b.next() for _ in range(80)]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(expected, got))
    assert b.state.epoch == 1  # really went past an epoch


def test_ranks_split_the_global_batch():
    tokens = np.arange(4001, dtype=np.int64)
    single = TokenBatches(tokens, 8, 4, seed=1)
    r0 = TokenBatches(tokens, 8, 2, seed=1, rank=0, world_size=2)
    r1 = TokenBatches(tokens, 8, 2, seed=1, rank=1, world_size=2)
    for _ in range(30):
        x, _ = single.next()
        assert torch.equal(x, torch.cat([r0.next()[0], r1.next()[0]]))


def test_seed_changes_order_and_state_mismatch_is_an_error():
    tokens = np.arange(2001, dtype=np.int64)
    assert not torch.equal(TokenBatches(tokens, 8, 4, seed=1).next()[0], TokenBatches(tokens, 8, 4, seed=2).next()[0])
    state = TokenBatches(tokens, 8, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="global_batch"):
        TokenBatches(tokens, 8, 2, seed=1).load_state_dict(state)


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(DataError, match="corpus too small"):
        TokenBatches(np.arange(50), 16, 8)


def test_document_ids_and_eval_batches():
    x = torch.tensor([[5, 0, 7, 8, 0, 9]])
    assert document_ids(x, eos_id=0).tolist() == [[0, 0, 1, 1, 1, 2]]
    val = np.arange(101)
    batches = list(eval_batches(val, 10, 3, n_batches=2))
    assert [b[0].shape[0] for b in batches] == [3, 3]
    assert list(eval_batches(val, 10, 3, n_batches=2)).__len__() == 2  # fixed, repeatable
    halves = [list(eval_batches(val, 10, 3, 2, rank=r, world_size=2)) for r in (0, 1)]
    firsts = {int(b[0][0, 0]) for h in halves for b in h}
    assert len(firsts) == 4  # ranks evaluate different windows
