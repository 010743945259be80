"""Raise after using the cluster: the launcher must exit non-zero and show the traceback."""

from cluster import Client


def inc(x):
    return x + 1


def main():
    with Client() as client:
        assert client.submit(inc, 1).result() == 2
    raise ValueError("deliberate failure in the user script")


if __name__ == "__main__":
    main()
