"""The demo's Python shop: a plain-stdlib HTTP service with its own load generator,
run by `periscope demo` beside the Rust shops (pool `pyshop`) with Periscope's Python
agent attached through `periscope-agent run`, so nothing here knows about Periscope.

Its locals are full of personal data (names, e-mail addresses, phone numbers, dates of
birth, card numbers, IBANs, passwords), nested past the depth limit, in long lists and
long strings, so that snapshots show redaction and truncation at work. Lines worth a
snapshot:

- `register_customer`: the new customer with password, card and IBAN;
- `price_order`: cart lines, coupon, subtotal, discount, tax, total;
- `charge_card`: the order and the card being charged (declines 1 in 8);
- `ship_order`: the address, a long gift message; `get_product`: what a product read returns.

Stops when its standard input closes; `main` says how to run it.
"""

import json
import random
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Linus"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton", "Torvalds"]
STREETS = ["Analytical Way", "Compiler Road", "Enigma Street", "Semaphore Lane", "Lambda Avenue"]
CITIES = [("London", "GB"), ("Arlington", "US"), ("Eindhoven", "NL"), ("Boston", "US"), ("Helsinki", "FI")]
CARDS = ["4111 1111 1111 1111", "5500 0000 0000 0004", "3400 0000 0000 009", "4012 8888 8888 1881"]
IBANS = ["GB82 WEST 1234 5698 7654 32", "DE89 3704 0044 0532 0130 00", "NL91 ABNA 0417 1643 00"]
PRODUCTS = [(f"SKU-{i:04d}", f"Product {i}", 199 + 37 * i) for i in range(1, 60)]
COUPONS = {"WELCOME10": 10, "SPRING25": 25}


class Address:
    def __init__(self, street, city, country, postcode):
        self.street = street
        self.city = city
        self.country = country
        self.postcode = postcode


class Customer:
    def __init__(self, customer_id, name, email, phone, birth_date, address, password, card_number, iban):
        self.customer_id = customer_id
        self.name = name
        self.email = email
        self.phone = phone
        self.birth_date = birth_date
        self.address = address
        self.password = password
        self.card_number = card_number
        self.iban = iban


class Order:
    __slots__ = ("order_id", "customer", "lines", "total_cents", "status", "gift_message")

    def __init__(self, order_id, customer, lines, total_cents):
        self.order_id = order_id
        self.customer = customer
        self.lines = lines
        self.total_cents = total_cents
        self.status = "new"
        self.gift_message = ""


CUSTOMERS = {}
ORDERS = {}
LOCK = threading.Lock()


def register_customer(payload):
    with LOCK:
        customer_id = len(CUSTOMERS) + 1
    street, (city, country) = payload["street"], CITIES[payload["city"] % len(CITIES)]
    address = Address(street, city, country, payload["postcode"])
    customer = Customer(
        customer_id, payload["name"], payload["email"], payload["phone"], payload["birth_date"], address,
        payload["password"], payload["card_number"], payload["iban"],
    )
    with LOCK:
        CUSTOMERS[customer_id] = customer
    return customer


def price_order(customer, cart, coupon):
    lines = [{"sku": sku, "name": name, "unit_cents": price, "qty": qty} for (sku, name, price), qty in cart]
    subtotal = sum(line["unit_cents"] * line["qty"] for line in lines)
    discount = subtotal * COUPONS.get(coupon, 0) // 100
    tax = (subtotal - discount) * 20 // 100
    total_cents = subtotal - discount + tax
    return lines, total_cents


def charge_card(order, card_number):
    declined = order.order_id % 8 == 0
    reason = "insufficient funds" if declined else None
    order.status = "declined" if declined else "paid"
    return not declined, reason


def ship_order(order, gift_message):
    address = order.customer.address
    order.gift_message = gift_message
    label = f"{order.customer.name}, {address.street}, {address.postcode} {address.city}, {address.country}"
    order.status = "shipped"
    return label


def checkout(customer_id, cart, coupon, gift_message):
    customer = CUSTOMERS[customer_id]
    lines, total_cents = price_order(customer, cart, coupon)
    with LOCK:
        order_id = len(ORDERS) + 1
        order = Order(order_id, customer, lines, total_cents)
        ORDERS[order_id] = order
    paid, reason = charge_card(order, customer.card_number)
    if paid:
        ship_order(order, gift_message)
    return order, reason


def get_product(product_id):
    # `GET /products/<id>`: what `periscope host-bench --language python` probes on every request.
    sku, name, price_cents = PRODUCTS[product_id % len(PRODUCTS)]
    product = {"id": product_id, "sku": sku, "name": name, "price_cents": price_cents, "in_stock": product_id % 7 != 0}
    return product


class Handler(BaseHTTPRequestHandler):
    def _json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "products" and parts[1].isdecimal() and len(parts[1]) <= 18:
            self._json(200, get_product(int(parts[1])))
        else:
            self._json(404, {"error": "no such route"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/customers":
            customer = register_customer(payload)
            self._json(201, {"customer_id": customer.customer_id})
        elif self.path == "/checkout":
            cart = [(PRODUCTS[i % len(PRODUCTS)], q) for i, q in payload["cart"]]
            order, reason = checkout(payload["customer_id"], cart, payload.get("coupon"), payload.get("gift", ""))
            self._json(201 if reason is None else 402, {"order_id": order.order_id, "status": order.status})
        else:
            self._json(404, {"error": "no such route"})

    def log_message(self, *args):
        pass


def load(base, rps, seed, stop):
    rnd = random.Random(seed)

    def post(path, body):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}")

    known = []
    while not stop.is_set():
        if not known or rnd.random() < 0.2:
            first, last = rnd.choice(FIRST), rnd.choice(LAST)
            payload = {
                "name": f"{first} {last}",
                "email": f"{first.lower()}.{last.lower()}{rnd.randint(1, 99)}@example.com",
                "phone": f"+44 20 7946 {rnd.randint(0, 9999):04d}",
                "birth_date": f"19{rnd.randint(50, 99)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}",
                "street": f"{rnd.randint(1, 200)} {rnd.choice(STREETS)}",
                "city": rnd.randint(0, 100),
                "postcode": f"{rnd.choice('ABCDEFGHJK')}{rnd.randint(1, 99)} {rnd.randint(1, 9)}XY",
                "password": f"hunter{rnd.randint(1, 999)}!",
                "card_number": rnd.choice(CARDS),
                "iban": rnd.choice(IBANS),
            }
            known.append(post("/customers", payload)["customer_id"])
        cart = [(rnd.randint(0, 200), rnd.randint(1, 4)) for _ in range(rnd.randint(1, 130 if rnd.random() < 0.1 else 5))]
        gift = "Happy birthday! " * rnd.randint(1, 30)
        post("/checkout", {"customer_id": rnd.choice(known), "cart": cart, "coupon": rnd.choice([None, "WELCOME10", "SPRING25"]), "gift": gift})
        time.sleep(1.0 / rps)


class KeepAliveHandler(Handler):
    # What a benchmark's client expects of a service: one connection, many requests, and
    # no 40 ms stall between the headers and the body (Nagle's algorithm meeting the
    # client's delayed ACK).
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True


def main():
    """`pyshop.py RPS [SEED]` runs the shop with its own load generator (the demo);
    `pyshop.py bench` runs the shop alone on HTTP/1.1 keep-alive connections and prints one
    JSON line (`url`) once it listens (`periscope host-bench --language python`)."""
    bench = len(sys.argv) > 1 and sys.argv[1] == "bench"
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler if bench else Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    stop = threading.Event()
    base = "http://127.0.0.1:%d" % server.server_address[1]
    if bench:
        print(json.dumps({"url": base}), flush=True)
    else:
        rps = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
        seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
        threading.Thread(target=load, args=(base, rps, seed, stop), name="load", daemon=True).start()
        print("pyshop listening on %s" % base, flush=True)
    for _ in sys.stdin:
        pass
    stop.set()
    server.shutdown()


if __name__ == "__main__":
    main()
