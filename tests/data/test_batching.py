"""The token batch kind (one list of features and dtypes) and the host split of eval batches."""

import numpy as np
import pytest

from jaxlearn.data import pipeline
from jaxlearn.data.batching import TOKEN_FEATURES, eval_share, padding_row, per_shard_batch, stack_rows
from jaxlearn.data.errors import DataError


def rows(n, seq_len=3):
    """Row i has inputs i+1 (so 0 marks padding) and is scored."""
    return [dict(padding_row(seq_len), inputs=np.full(seq_len, i + 1, np.int32), loss_mask=np.ones(seq_len, np.float32))
            for i in range(n)]


def test_one_definition_of_the_token_batch():
    assert list(TOKEN_FEATURES) == ["inputs", "targets", "segment_ids", "positions", "loss_mask"]
    assert pipeline.FEATURES == tuple(TOKEN_FEATURES)
    pad = padding_row(5)
    assert {k: (v.dtype, v.shape, v.any()) for k, v in pad.items()} == {
        k: (np.dtype(dt), (5,), False) for k, dt in TOKEN_FEATURES.items()}
    batch = stack_rows(rows(2))
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        k: (np.dtype(dt), (2, 3)) for k, dt in TOKEN_FEATURES.items()}
    with pytest.raises(TypeError):
        TOKEN_FEATURES["rewards"] = np.float32  # read-only: no module can change the batch kind for the others


def test_eval_share_owned_shards_equal_their_concatenated_blocks():
    data = rows(11)  # global batches of 8: one full, one with 3 rows and 5 padding rows
    whole = eval_share(data, batch_size=8)
    assert [b["inputs"][:, 0].tolist() for b in whole] == [list(range(1, 9)), [9, 10, 11, 0, 0, 0, 0, 0]]
    assert whole[1]["loss_mask"][3:].sum() == 0
    singles = [eval_share(data, batch_size=8, shards=range(s, s + 1), shard_count=4) for s in range(4)]
    for hosts in ([range(0, 2), range(2, 4)], [range(0, 4)], [range(1, 3)]):
        for owned in hosts:
            got = eval_share(data, batch_size=8, shards=owned, shard_count=4)
            assert len(got) == len(whole)  # every host runs the same number of eval steps
            for i, b in enumerate(got):
                want = {k: np.concatenate([singles[s][i][k] for s in owned]) for k in TOKEN_FEATURES}
                assert all(np.array_equal(b[k], want[k]) for k in TOKEN_FEATURES)
    assert eval_share([], batch_size=8) == []


def test_bad_layouts_say_what_to_change():
    assert per_shard_batch(8, 3, 4) == 2
    with pytest.raises(DataError, match="batch_size=6 .* does not divide over 4 hosts"):
        per_shard_batch(6, 0, 4)
    with pytest.raises(DataError, match="shard_index 4 is not in"):
        eval_share(rows(3), batch_size=8, shards=range(3, 5), shard_count=4)
    with pytest.raises(DataError, match="contiguous"):
        eval_share(rows(3), batch_size=8, shards=range(0, 4, 2), shard_count=4)
