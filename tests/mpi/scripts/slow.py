"""Slow tasks, so that a test can kill a worker process meanwhile; prints the result.

Usage: slow.py MARKER_FILE [NTASKS] [SECONDS]: MARKER_FILE is created once the
first results are in (the cluster is busy), for the test to kill a worker then.
"""

import json
import sys
import time

from cluster import Client, as_completed


def slow_square(x, seconds):
    time.sleep(seconds)
    return x * x


if __name__ == "__main__":
    marker = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2
    with Client() as client:
        futures = client.map(slow_square, range(n), seconds=seconds, pure=False)
        results = []
        for i, future in enumerate(as_completed(futures)):
            results.append(future.result())
            if i == 2:
                with open(marker, "w") as f:
                    f.write("busy\n")
        print(json.dumps({"total": sum(results), "expected": sum(x * x for x in range(n))}), flush=True)
