"""A delaying HTTP proxy on 127.0.0.1 in front of a real ``mlflow server``: a slow
tracking server, for the tests and the benchmarks."""

import http.client
import http.server
import socket
import threading
import time


class SlowProxy:
    """Forwards HTTP requests to ``upstream_port`` after ``delay`` seconds (an
    attribute: change it at any time); records them. Listens on ``port``
    (default: a free one) at :attr:`url`."""

    def __init__(self, upstream_port, delay, port=0):
        self.requests = []  # (wall time, method, path)
        self.delay = delay
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append((time.time(), self.command, self.path.split("?")[0]))
                time.sleep(proxy.delay)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "transfer-encoding")}
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        connections = self._connections = []

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                connection, address = super().get_request()
                connections.append(connection)
                return connection, address

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        """Stop listening and cut every open connection, as a server that went
        down: a client's kept-alive connection fails too."""
        self.server.shutdown()
        self.server.server_close()
        for connection in self._connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by its client
                pass
