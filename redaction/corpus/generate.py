#!/usr/bin/env python3
"""Generate the labelled redaction corpus (JSON lines) used by the accuracy test and
by benches/presidio_compare.py.

    python redaction/corpus/generate.py --seed 1234 --out /tmp/corpus.jsonl

Generated at test time and never committed: realistic-looking tokens trip secret
scanners. Every record is one sample:

    {"label": "positive", "kind": "email", "shape": "text", "input": "...",
     "secret": "jane@example.com", "rules": ["email"]}
    {"label": "negative", "kind": "uuid", "shape": "text", "input": "..."}

`shape` is "text" (run through Redactor::redact_text) or "json" (a JSON document, run
through Redactor::redact_json). A positive is redacted when no 6-character window of
`secret` survives; `rules` are the rule ids that may take credit. A negative is touched
when the output differs from the input.

Values come from Faker (several locales) and from generators of the documented token
formats; hard negatives are hand-written shapes that look like secrets but are not.
Phone numbers: Faker's unformatted national numbers (a bare run of digits, or two
groups split by a dot or a space, like `6853.8387`) only appear next to a phone-ish word
or under a phone-named field, because such a number is not a phone number by itself
(see the crate docs); every formatted number appears in every template.
"""

import argparse
import base64
import ipaddress
import json
import random
import string
import zlib

from faker import Faker

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "_-"

PHONE_LOCALES = ["en_US", "en_GB", "en_CA", "fr_FR", "de_DE", "pt_BR", "ja_JP", "es_ES", "nl_NL", "en_AU", "pl_PL", "sv_SE"]
IBAN_LOCALES = ["en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pl_PL", "pt_PT", "fi_FI", "no_NO", "en_IE"]
CARD_TYPES = ["amex", "diners", "discover", "jcb15", "jcb16", "mastercard", "visa13", "visa16", "visa19"]

MODULES = ["orders::service", "payments::gateway", "http::server", "users::repo", "checkout", "com.shop.api.UserController"]
LEVELS = ["INFO", "WARN", "DEBUG", "ERROR"]


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)
        self.fakers = {}
        self.seed = seed
        self.fk = self.faker("en_US")

    def faker(self, locale):
        if locale not in self.fakers:
            f = Faker(locale)
            f.seed_instance(self.seed + len(self.fakers) * 7919)
            self.fakers[locale] = f
        return self.fakers[locale]

    def rand(self, alphabet, n):
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def ts(self):
        return self.fk.date_time_between("-2y", "now").strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def log(self, body):
        return f"{self.ts()} {self.r.choice(LEVELS)} {self.r.choice(MODULES)}: {body}"


# ---------------------------------------------------------------- positives


def group(digits, sizes, sep):
    out, i = [], 0
    for s in sizes:
        out.append(digits[i : i + s])
        i += s
    if i < len(digits):
        out.append(digits[i:])
    return sep.join(p for p in out if p)


def card(g):
    number = g.fk.credit_card_number(card_type=g.r.choice(CARD_TYPES))
    sep = g.r.choice(["", "", " ", "-"])
    if not sep:
        return number
    sizes = {15: [4, 6, 5], 14: [4, 6, 4]}.get(len(number), [4, 4, 4, 4])
    return group(number, sizes, sep)


def iban(g):
    value = g.faker(g.r.choice(IBAN_LOCALES)).iban()
    if g.r.random() < 0.4:
        value = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
    return value


def ssn(g):
    value = g.fk.ssn()
    return value if g.r.random() < 0.85 else value.replace("-", " ")


def phone(g):
    return g.faker(g.r.choice(PHONE_LOCALES)).phone_number()


def ipv6(g):
    addr = g.fk.ipv6()
    if g.r.random() < 0.5:
        parts = addr.split(":")
        i = g.r.randrange(1, 6)
        parts[i] = parts[i + 1] = "0"
        addr = str(ipaddress.IPv6Address(":".join(parts)))
    return addr


def jwt(g):
    header = {"alg": g.r.choice(["HS256", "RS256", "ES256", "EdDSA"]), "typ": "JWT"}
    payload = {"sub": str(g.r.randrange(10**9)), "name": g.fk.name(), "iat": g.fk.unix_time() // 1}
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    sig = base64.urlsafe_b64encode(g.r.randbytes(32)).rstrip(b"=").decode()
    return f"{enc(header)}.{enc(payload)}.{sig}"


def pem(g):
    kind = g.r.choice(["RSA ", "EC ", "OPENSSH ", "ENCRYPTED ", ""])
    body = "\n".join(base64.b64encode(g.r.randbytes(48)).decode() for _ in range(g.r.randrange(3, 9)))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----", body[:64]


def github(g):
    random_part = g.rand(ALNUM, 30)
    crc = zlib.crc32(random_part.encode())
    check = ""
    for _ in range(6):
        check = BASE62[crc % 62] + check
        crc //= 62
    return f"{g.r.choice(['ghp', 'gho', 'ghu', 'ghs', 'ghr'])}_{random_part}{check}"


TOKENS = {
    "aws_access_key": lambda g: g.r.choice(["AKIA", "ASIA"]) + g.rand(string.ascii_uppercase + "234567", 16),
    "github_token": github,
    "gitlab_token": lambda g: "glpat-" + g.rand(URLSAFE, 20),
    "slack_token": lambda g: f"xoxb-{g.rand(string.digits, 12)}-{g.rand(string.digits, 13)}-{g.rand(ALNUM, 24)}",
    "stripe_key": lambda g: g.r.choice(["sk_live_", "sk_test_", "rk_live_"]) + g.rand(ALNUM, g.r.randrange(24, 99)),
    "google_api_key": lambda g: "AIza" + g.rand(URLSAFE, 35),
    "openai_api_key": lambda g: g.r.choice(
        [
            "sk-" + g.rand(ALNUM, 20) + "T3BlbkFJ" + g.rand(ALNUM, 20),
            "sk-proj-" + g.rand(URLSAFE, 74) + "T3BlbkFJ" + g.rand(URLSAFE, 74),
        ]
    ),
    "anthropic_api_key": lambda g: "sk-ant-api03-" + g.rand(URLSAFE, 93) + "AA",
    "sendgrid_key": lambda g: f"SG.{g.rand(URLSAFE, 22)}.{g.rand(URLSAFE, 43)}",
    "huggingface_token": lambda g: "hf_" + g.rand(string.ascii_letters, 34),
}

SECRET_NAMES = [
    "password", "db_password", "dbPassword", "PASSWORD", "passwd", "pwd", "user_password", "passwordHash",
    "secret", "client_secret", "clientSecret", "api_key", "apiKey", "X-Api-Key", "APIKEY", "access_token",
    "accessToken", "refresh_token", "auth_token", "authToken", "session_id", "sessionId", "csrf_token",
    "private_key", "privateKey", "secret_key", "aws_secret_access_key", "credentials", "cookie", "ssn", "cvv",
    "card_number", "pin", "otp", "jwt", "connection_string", "passphrase", "signing_key", "encryption_key",
]
WEAK_NAMES = ["signature", "webhook_signature", "hmac", "salt", "cache_key", "request_key", "sig"]
NEUTRAL_KEYS = ["value", "data", "note", "details", "payload", "info", "raw"]
PHONE_KEYS = ["phone", "mobile", "phone_number", "contactPhone", "tel", "cell"]


def kv_value(g):
    if g.r.random() < 0.5:
        return g.fk.password(length=g.r.randrange(10, 20))
    # Harmless-looking values are still secrets under a secret name.
    return g.r.choice([g.fk.word() + "-" + g.fk.word() + str(g.r.randrange(10, 99)), g.rand(ALNUM, 24)])


def kv_text(g, name, value):
    """A value under a name, in the text shapes logs and object dumps use."""
    forms = [
        f"{name}={value}",
        f'"{name}": "{value}"',
        f"{name}: {value}",
        f'{name}: "{value}"',
        f"Config {{ host: \"db.internal\", {name}: Some(\"{value}\"), port: 5432 }}",
        f"'{name}' => '{value}'",
        # Quoted assignments, JSON inside a log line and inside a JSON string.
        f"{name} = '{value}'",
        f"{name}='{value}'",
        f'payload {{"id": 7, "{name}": "{value}", "ok": true}}',
        f'{{"message": "update {{\\"{name}\\":\\"{value}\\"}}"}}',
        # Rust, Python, Java and Go object dumps, Ruby/PHP arrows, XML.
        f'User {{ id: 7, {name}: "{value}", active: true }}',
        f"User(id=7, {name}='{value}', active=True)",
        f"User(id=7, {name}=b'{value}')",
        f"User{{id=7, {name}='{value}', active=true}}",
        f"{{Id:7 {name}:{value} Active:true}}",
        f"{name} => '{value}'",
        f"<user><{name}>{value}</{name}></user>",
    ]
    return g.r.choice(forms)


def positive(g, kind):
    """Returns (shape, input, secret, rules)."""
    r = g.r
    ctx = lambda value, words: r.choice(words).format(v=value)
    if kind == "credit_card":
        v = card(g)
        return text_or_json(g, v, ["card {v} charged", "payment method {v} declined", "{v}", "pan={v}"], ["credit_card", "key:card_number"])
    if kind == "iban":
        v = iban(g)
        return text_or_json(g, v, ["refund to {v}", "{v}", "iban={v} amount=12.50"], ["iban"])
    if kind == "us_ssn":
        v = ssn(g)
        if r.random() < 0.15:
            digits = v.replace("-", "").replace(" ", "")
            return "text", g.log(f"SSN {digits} verified"), digits, ["us_ssn"]
        return text_or_json(g, v, ["applicant ssn {v}", "{v}", "tax id {v} on file"], ["us_ssn", "key:ssn"])
    if kind == "email":
        v = r.choice([g.fk.email(), g.fk.free_email(), g.fk.company_email(), g.faker("de_DE").email()])
        return text_or_json(g, v, ["user {v} logged in", "sent receipt to <{v}>", "{v}", "mailto:{v}"], ["email"])
    if kind == "phone":
        v = phone(g)
        # Unformatted: a bare run of digits, or two groups split by a dot or a space
        # (a decimal, a pair of numbers): no reader can tell these from other numbers.
        groups = v.replace("+", "").replace(".", " ").split()
        bare = all(p.isdigit() for p in groups) and len(groups) <= 2 and "-" not in v
        context = ["phone: {v}", "sending SMS to {v}", "call back on {v}", "mobile={v}", "Tel. {v}"]
        if bare:
            if r.random() < 0.4:
                return "json", json.dumps({r.choice(PHONE_KEYS): v}), v, ["phone"]
            if r.random() < 0.5:
                # Under a phone field's name in any text shape (issue 9).
                return "text", g.log(kv_text(g, r.choice(PHONE_KEYS), v)), v, ["phone"]
            return "text", g.log(ctx(v, context)), v, ["phone"]
        if r.random() < 0.2:
            return "text", g.log(kv_text(g, r.choice(PHONE_KEYS), v)), v, ["phone"]
        return text_or_json(g, v, context + ["reach me at {v} after 5pm", "{v}", "customer {v} (home)"], ["phone"], PHONE_KEYS + NEUTRAL_KEYS)
    if kind == "ipv4":
        v = g.fk.ipv4_public()
        return text_or_json(g, v, ["request from {v}", "client_ip={v}", "{v}", "X-Forwarded-For: {v}, 10.0.0.1"], ["ip_address"])
    if kind == "ipv6":
        v = ipv6(g)
        return text_or_json(g, v, ["request from {v}", "peer=[{v}]:443", "{v}"], ["ip_address"])
    if kind == "mac_address":
        v = g.fk.mac_address()
        if r.random() < 0.3:
            v = v.upper().replace(":", "-")
        return text_or_json(g, v, ["device {v} joined", "mac={v}", "{v}"], ["mac_address"])
    if kind == "jwt":
        v = jwt(g)
        return text_or_json(g, v, ["token {v}", "id_token={v}", "{v}", "Authorization: Bearer {v}"], ["jwt", "key:token", "key:authorization", "bearer_token"])
    if kind == "pem_private_key":
        v, body = pem(g)
        if r.random() < 0.3:
            v = v[:255]  # cut by the capture limits: no END line
        if r.random() < 0.6:
            return "text", ctx(v, ["{v}", "loaded key:\n{v}"]), body[:64], ["pem_private_key"]
        return "json", json.dumps({r.choice(NEUTRAL_KEYS): v}), body[:64], ["pem_private_key"]
    if kind == "bearer_token":
        v = g.rand(ALNUM + "._-", r.randrange(24, 64))
        form = r.choice(["Authorization: Bearer {v}", "curl -H 'Authorization: Bearer {v}' https://api.internal", "auth header Bearer {v}", "bearer {v}"])
        return "text", g.log(form.format(v=v)), v, ["bearer_token", "key:authorization"]
    if kind == "basic_auth":
        creds = f"{g.fk.user_name()}:{g.fk.password(length=12)}"
        v = base64.b64encode(creds.encode()).decode()
        form = r.choice(["Authorization: Basic {v}", "sending Basic {v}", "proxy auth Basic {v}"])
        return "text", g.log(form.format(v=v)), v, ["basic_auth", "key:authorization"]
    if kind == "url_credentials":
        pw = g.fk.password(length=r.randrange(10, 18), special_chars=False)
        url = f"{r.choice(['postgres', 'mysql', 'redis', 'amqp', 'https', 'mongodb+srv'])}://{g.fk.user_name()}:{pw}@{g.fk.domain_name()}:{r.randrange(1000, 9999)}/{g.fk.word()}"
        return text_or_json(g, url, ["connecting to {v}", "{v}", "DATABASE_URL={v}"], ["url_credentials", "key:connection_string"], NEUTRAL_KEYS, secret=pw)
    if kind in TOKENS:
        v = TOKENS[kind](g)
        rules = [kind, "key:token", "key:api_key", "key:secret", "key:private_key", "generic_secret", "bearer_token"]
        return text_or_json(g, v, ["using key {v}", "{v}", "export TOKEN_VALUE={v}", "config loaded: {{'k': '{v}'}}"], rules)
    if kind == "key_name":
        name = r.choice(SECRET_NAMES)
        v = kv_value(g)
        if r.random() < 0.5:
            # A user id, not a name: a name could share six letters with the value by chance.
            return "json", json.dumps({"user_id": g.r.randrange(1, 10**6), name: v, "retries": 3}), v, None
        return "text", g.log(kv_text(g, name, v)), v, None
    if kind == "generic_secret":
        name = r.choice(WEAK_NAMES)
        v = r.choice([g.rand("0123456789abcdef", 40), g.rand(URLSAFE, 32), base64.b64encode(g.r.randbytes(24)).decode()])
        if not any(c.isdigit() for c in v):
            v = v[:-1] + "7"
        return "text", g.log(kv_text(g, name, v)), v, ["generic_secret"]
    raise ValueError(kind)


def text_or_json(g, value, templates, rules, keys=NEUTRAL_KEYS, secret=None):
    secret = value if secret is None else secret
    if g.r.random() < 0.3:
        doc = {"id": g.r.randrange(1, 10**6), g.r.choice(keys): value, "status": "ok"}
        return "json", json.dumps(doc), secret, rules
    body = g.r.choice(templates).format(v=value)
    return "text", (body if g.r.random() < 0.25 else g.log(body)), secret, rules


POSITIVE_KINDS = [
    "credit_card", "iban", "us_ssn", "email", "phone", "ipv4", "ipv6", "mac_address", "jwt", "pem_private_key",
    "bearer_token", "basic_auth", "url_credentials", *TOKENS.keys(), "key_name", "generic_secret",
]

# ---------------------------------------------------------------- hard negatives


def non_luhn_16(g):
    while True:
        digits = [g.r.randrange(10) for _ in range(16)]
        digits[0] = g.r.randrange(1, 10)
        total = 0
        for i, d in enumerate(reversed(digits)):
            if i % 2 == 1:
                d = d * 2 - 9 if d * 2 > 9 else d * 2
            total += d
        if total % 10:
            return "".join(map(str, digits))


NEGATIVES = {
    "uuid": lambda g: g.r.choice(["request_id={v}", "{v}", "trace {v} finished"]).format(v=g.fk.uuid4()),
    "timestamp": lambda g: g.r.choice(
        [
            g.fk.iso8601(),
            g.ts(),
            g.fk.date_time().strftime("%Y-%m-%d %H:%M:%S"),
            g.fk.date_time().strftime("%d/%m/%Y %H:%M"),
            g.fk.date_time().strftime("%Y.%m.%d"),
            f"epoch={g.fk.unix_time() // 1}",
            f"ts_ms={int(g.fk.unix_time() * 1000)}",
            f"took {g.r.randrange(1, 99999)}.{g.r.randrange(1000, 9999)} ms",
        ]
    ),
    "version": lambda g: g.r.choice(
        [
            f"{g.r.randrange(0, 20)}.{g.r.randrange(0, 40)}.{g.r.randrange(0, 200)}",
            f"v{g.r.randrange(0, 5)}.{g.r.randrange(0, 30)}.{g.r.randrange(0, 10)}-rc.{g.r.randrange(1, 9)}",
            f"version {g.r.randrange(1, 9)}.{g.r.randrange(0, 9)}.{g.r.randrange(0, 9)}.{g.r.randrange(0, 999)}",
            f"Python/3.{g.r.randrange(6, 14)}.{g.r.randrange(0, 12)} rustc 1.{g.r.randrange(60, 95)}.0",
            f"build 10.0.{g.r.randrange(10000, 30000)}.{g.r.randrange(1, 999)}",
            f"HTTP/1.1 {g.r.choice([200, 404, 503])}",
        ]
    ),
    "hash": lambda g: g.r.choice(
        [
            f"commit {g.fk.sha1()}",
            f"sha256:{g.fk.sha256()}",
            f"etag \"{g.fk.md5()}\"",
            f"rev {g.fk.sha1()[:g.r.randrange(7, 13)]}",
            g.fk.sha256(),
        ]
    ),
    "order_id": lambda g: g.r.choice(
        [
            f"order ORD-{g.r.randrange(2019, 2026)}-{g.r.randrange(0, 999999):06d}",
            f"invoice #{g.r.randrange(10000, 999999)}",
            f"order_id={non_luhn_16(g)}",
            f"{non_luhn_16(g)}",
            f"tracking 1Z{g.rand(string.ascii_uppercase + string.digits, 16)}",
            f"customer_id={g.r.randrange(10**5, 10**9)}",
        ]
    ),
    "port": lambda g: g.r.choice(
        [
            f"listening on 0.0.0.0:{g.r.randrange(1024, 65535)}",
            f"connect localhost:{g.r.choice([5432, 6379, 8080, 9092, 27017])}",
            f"redis at 127.0.0.1:{g.r.randrange(1024, 65535)}",
            f"port={g.r.randrange(1, 65535)}",
            f"bind [::]:{g.r.randrange(1024, 65535)}",
            f"netmask 255.255.{g.r.choice([0, 240, 255])}.0",
        ]
    ),
    "class_name": lambda g: g.r.choice(
        [
            "com.example.auth.PasswordEncoder",
            "org.springframework.security.oauth2.provider.token.TokenStore",
            "TokenService: started in 120ms",
            "std::collections::HashMap<String, Vec<u8>>",
            "periscope_protocol::hit::Hit",
            "PasswordPolicyValidator.validate(PasswordPolicyValidator.java:42)",
            "auth::session_cache: warmed",
            "SecretsManagerClient",
            "at com.shop.api.UserController.login(UserController.java:88)",
            "crate::keys::KeyRules::classify",
        ]
    ),
    "aws_example_key": lambda g: g.r.choice(
        ["AKIAIOSFODNN7EXAMPLE", "AKIA" + g.rand(string.ascii_uppercase + "234567", 9) + "EXAMPLE"]
    ),
    "sensitive_word_no_value": lambda g: g.r.choice(
        [
            "password reset email sent",
            "tokenizer=bert-base-uncased",
            "author=Jane Austen",
            "passwordPolicy=strict",
            "max_tokens=512",
            "session_timeout=30m",
            "secretName=db-creds",
            "token_count=1234",
            "token_type=Bearer",
            "auth_method=oauth2",
            "password: null",
            "api_key: ********",
            "password_min_length=12",
            "private_key_path=/etc/ssl/private/server.key",
            # Names that only contain a phone word, types and markup around secret words.
            "telemetry_interval=30000000",
            "hotel_id: 48741009",
            "mobile_app_version=4.12.0",
            "phone_verified=true cell_count=12",
            "<token_type>Bearer</token_type>",
            "parsed Option<Token> from header",
            "if password > 5 { retry }",
        ]
    ),
    "numbers": lambda g: g.r.choice(
        [
            f"total ${g.r.randrange(1, 99999):,}.{g.r.randrange(0, 99):02d}",
            f"pi={g.r.random() * 10:.8f}",
            f"size {g.r.randrange(1, 999)}.{g.r.randrange(0, 9)} GB",
            f"lat={g.fk.latitude()} lon={g.fk.longitude()}",
            f"status={g.r.choice([200, 201, 404, 500])} bytes={g.r.randrange(0, 10**7)}",
            f"{g.r.randrange(1, 99)} items in {g.r.randrange(1, 999)} ms",
        ]
    ),
    "path": lambda g: g.r.choice(
        [
            f"/api/v2/orders/{g.r.randrange(10**5, 10**7)}/items",
            f"GET /static/icon@2x.png",
            f"https://docs.example.com/guide/{g.fk.slug()}",
            f"npm install lodash@4.17.{g.r.randrange(0, 22)}",
            f"/var/log/app/{g.fk.file_name(extension='log')}",
        ]
    ),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--per-kind", type=int, default=300)
    ap.add_argument("--negatives-per-kind", type=int, default=300)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    g = Gen(args.seed)
    with open(args.out, "w", encoding="utf-8") as out:
        for kind in POSITIVE_KINDS:
            for _ in range(args.per_kind):
                shape, text, secret, rules = positive(g, kind)
                rec = {"label": "positive", "kind": kind, "shape": shape, "input": text, "secret": secret}
                if rules:
                    rec["rules"] = rules
                out.write(json.dumps(rec) + "\n")
        for kind, make in NEGATIVES.items():
            for _ in range(args.negatives_per_kind):
                body = make(g)
                if g.r.random() < 0.5:
                    rec = {"label": "negative", "kind": kind, "shape": "text", "input": g.log(body)}
                elif g.r.random() < 0.5:
                    rec = {"label": "negative", "kind": kind, "shape": "json", "input": json.dumps({"message": body, "n": 1})}
                else:
                    rec = {"label": "negative", "kind": kind, "shape": "text", "input": body}
                out.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
