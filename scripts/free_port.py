#!/usr/bin/env python3
"""Print N distinct free loopback TCP ports, one per line (default N=1).

All sockets stay bound until every port has been chosen, so the ports are distinct.
The kernel may hand a port out again after we release it; the caller starts its
servers right away, which makes that window small (and `stack.sh up` fails loudly,
with the server's log, if a port was taken in between).
"""
import socket
import sys


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        for s in sockets:
            print(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()


if __name__ == "__main__":
    main()
