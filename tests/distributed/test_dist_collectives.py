"""dist collectives on 2 real gloo ranks equal their single-process meaning."""

import numpy as np

from tests.multiproc import run_ranks


def _collectives(rank: int, world: int):
    from dataeff import dist

    # Uneven lengths per rank: rank r holds r+2 rows.
    part = np.full((rank + 2, 3), rank, dtype=np.float16)
    gathered = dist.all_gather_concat(part)
    centroids = dist.broadcast_array(np.arange(4.0).reshape(2, 2) if rank == 0 else None)
    objs = dist.all_gather_object({"rank": rank})
    dist.barrier()
    return gathered, centroids, objs, dist.rank(), dist.world_size()


def test_all_gather_uneven_broadcast_and_objects():
    results = run_ranks(_collectives, world=2)
    expected = np.concatenate([np.full((2, 3), 0, np.float16), np.full((3, 3), 1, np.float16)])
    for rank, (gathered, centroids, objs, r, w) in enumerate(results):
        assert (r, w) == (rank, 2)
        assert gathered.dtype == np.float16 and np.array_equal(gathered, expected)
        assert np.array_equal(centroids, np.arange(4.0).reshape(2, 2))
        assert objs == [{"rank": 0}, {"rank": 1}]
