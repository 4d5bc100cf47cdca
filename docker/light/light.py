"""The lightest stand-in for a single-user server: HTTP 200 with a small JSON body to any request.

It imports only socket and signal and runs with ``python3 -S -I``, so starting it costs a few
milliseconds of CPU: in a burst of spawns, what is measured is the spawner and the Docker
engine, not 32 web servers booting. Not for users.
"""

import signal
import socket
import sys

BODY = b'{"started": "now"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)

# PID 1 ignores SIGTERM unless it asks for it: without this, docker stop would wait its 10 s.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8888))
server.listen(64)
while True:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        try:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            conn.sendall(RESPONSE)
        except OSError:
            pass
