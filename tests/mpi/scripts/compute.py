"""Submit tasks through Client() (the launcher's cluster) and print the result and worker names."""

import json
import sys

from cluster import Client


def square(x):
    return x * x


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with Client() as client:
        total = client.submit(sum, client.map(square, range(n))).result()
        names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
        print(json.dumps({"total": total, "workers": names, "argv": sys.argv[1:]}), flush=True)
