"""A small WSGI application for the forking-server test (``gunicorn wsgishop:app``):
each response names the worker process that served it and a total computed from the
query string, so the test can tell the workers apart and check that answers under a
probe are the ones without."""

import os
import time


def price(n):
    items = [n, n * 2, n * 3]
    subtotal = sum(items)
    total = subtotal - n // 2  # L:price
    return total


def app(environ, start_response):
    try:
        n = int(environ.get("QUERY_STRING", "").partition("n=")[2] or 0)
    except ValueError:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"n must be an integer\n"]
    # Concurrent requests spread over the workers while one is busy.
    time.sleep(0.02)
    body = ("pid=%d n=%d total=%d\n" % (os.getpid(), n, price(n))).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
