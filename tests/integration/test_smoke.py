from tests.helpers import gen_cluster, gen_test


def inc(x):
    return x + 1


@gen_test()
async def test_submit_and_gather():
    async with gen_cluster() as (c, s, workers):
        f = c.submit(inc, 1)
        assert await f == 2
        fs = c.map(inc, range(20))
        assert await c.gather(fs) == list(range(1, 21))
