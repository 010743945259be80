"""The main job on the embedded default: ``Client()`` starts a local cluster.

Run with ``bash scripts/main.sh`` (which sets up the environment first).
"""

import logging
import time

from cluster import Client, as_completed


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    # No address: start a scheduler and one worker process per core on loopback.
    with Client() as client:
        info = client.scheduler_info()
        print(f"cluster at {info['address']} with {len(info['workers'])} workers")

        # A map, then a tree reduction whose inputs move worker to worker.
        squares = client.map(square, range(1000))
        layer = squares
        while len(layer) > 1:
            layer = [client.submit(add, *layer[i:i + 2]) if i + 1 < len(layer) else layer[i]
                     for i in range(0, len(layer), 2)]
        total = layer[0].result()
        assert total == sum(x * x for x in range(1000)), total
        print(f"sum of squares below 1000: {total}")

        # Results as they come in.
        done = [f.result() for f in as_completed(client.map(square, range(10)))]
        print(f"as_completed gave {len(done)} results")

        # A failing task raises its own exception here, with the remote traceback.
        try:
            client.submit(lambda: 1 / 0).result()
        except ZeroDivisionError as e:
            print(f"task failed as expected: {e!r}; remote traceback attached: {e.__cause__ is not None}")
    print(f"done in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
