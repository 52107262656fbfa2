"""Hashed embedding tables: hashing, missing ids, touched rows, row-wise sparse updates."""

from __future__ import annotations

import torch

from model.embedding import HashedEmbedding, RowWiseAdagrad, SparseOptim, make_sparse_optimizer


def test_same_id_same_vector_and_missing_is_zero() -> None:
    table = HashedEmbedding(1000, 8, n_hashes=3)
    ids = torch.tensor([[5, 0, -9_000_000_000_000_000_000 // 10], [5, 2**62 + 17, 0]])
    out = table(ids)
    assert out.shape == (2, 3, 8)
    assert torch.equal(out[0, 0], out[1, 0])
    assert out[0, 1].abs().sum() == 0 and out[1, 2].abs().sum() == 0
    assert out[0, 2].abs().sum() > 0  # negative ids hash fine


def test_hash_is_fixed_across_instances_and_in_range() -> None:
    ids = torch.randint(-(2**63), 2**63 - 1, (10_000,))
    a, b = HashedEmbedding(777, 4, 2, seed=3), HashedEmbedding(777, 4, 2, seed=3)
    ba = a.bucket_ids(ids)
    assert torch.equal(ba, b.bucket_ids(ids))
    assert int(ba.min()) >= 0 and int(ba.max()) < 777
    assert not torch.equal(ba, HashedEmbedding(777, 4, 2, seed=4).bucket_ids(ids))  # tables differ
    # the hashes spread ids: every bucket is used by 10k ids
    assert len(torch.unique(ba[:, 0])) == 777


def test_several_hashes_soften_collisions() -> None:
    ids = torch.arange(1, 2001)
    one = HashedEmbedding(500, 4, n_hashes=1).bucket_ids(ids)
    two = HashedEmbedding(500, 4, n_hashes=2).bucket_ids(ids)
    full_collisions_1 = len(ids) - len(torch.unique(one, dim=0))
    full_collisions_2 = len(ids) - len(torch.unique(two, dim=0))
    assert full_collisions_2 < full_collisions_1 / 10


def test_touched_rows_and_sparse_step_change_only_those_rows() -> None:
    table = HashedEmbedding(200, 4, n_hashes=2)
    opt = make_sparse_optimizer(SparseOptim.ROWWISE_ADAGRAD, [table.weight], lr=0.1)
    before = table.weight.detach().clone()
    ids = torch.tensor([3, 0, 99])
    table(ids).pow(2).sum().backward()
    assert table.weight.grad.is_sparse
    opt.step()
    touched = table.touched_rows()
    changed = (table.weight.detach() != before).any(1).nonzero().flatten()
    assert torch.equal(torch.sort(changed).values, touched)
    assert len(touched) <= 4  # 2 real ids x 2 hashes; id 0 reads nothing
    table.clear_touched()
    assert len(table.touched_rows()) == 0
    with torch.no_grad():
        table(ids)  # scoring does not count as touching
    table.eval()
    table(ids)
    assert len(table.touched_rows()) == 0


def test_set_rows_applies_a_delta() -> None:
    src, dst = HashedEmbedding(50, 3, seed=1), HashedEmbedding(50, 3, seed=1)
    ids = torch.tensor([11, 12])
    src(ids).sum().backward()
    RowWiseAdagrad([src.weight], lr=0.5).step()
    rows = src.touched_rows()
    dst.set_rows(rows, src.get_rows(rows))
    assert torch.equal(src(ids), dst(ids))
