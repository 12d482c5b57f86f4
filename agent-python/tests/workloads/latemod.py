"""Imported by the shop only when a test asks, after an action was placed on it."""


def late_function(x):
    doubled = x * 2  # L:late
    return doubled


def run_forever():
    import threading
    import time

    def loop():
        i = 0
        while True:
            i += 1
            late_function(i)
            time.sleep(0.01)

    threading.Thread(target=loop, daemon=True, name="late").start()


run_forever()
