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
        info = client.scheduler_info()
        names = sorted(str(w["name"]) for w in info["workers"].values())
        # tls or tcp: what every connection of the cluster speaks
        schemes = sorted({a.split("://")[0] for a in [info["address"], *info["workers"]]})
        print(json.dumps({"total": total, "workers": names, "argv": sys.argv[1:],
                          "schemes": schemes}), flush=True)
