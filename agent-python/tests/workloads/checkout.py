"""The functions `probed.py` runs, in a module of their own (`checkout`), as a
service's code would be."""

import asyncio
import time


class Cart:
    def __init__(self, owner, items):
        self.owner = owner
        self.items = items


class CardDeclined(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Checkout:
    def checkout(self, cart, delay_ms, fail=False):
        time.sleep(delay_ms / 1000.0)
        if fail:
            raise CardDeclined("card declined for %s" % cart.owner, 402)
        return len(cart.items) * 1000

    async def checkout_async(self, cart, delay_ms):
        await asyncio.sleep(delay_ms / 1000.0)
        return len(cart.items) * 10
