"""Exit with status 3 after using the cluster."""

import sys

from cluster import Client

if __name__ == "__main__":
    with Client() as client:
        assert client.submit(abs, -5).result() == 5
    sys.exit(3)
