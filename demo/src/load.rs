//! The load generator: realistic shoppers over real HTTP.
//!
//! A snapshot only hits when code runs, so a demo needs traffic. [`generate_load`] runs
//! a fixed number of concurrent workers; each plays one shopper journey after another
//! (browse, sign up and buy, place a bulk order, check an account, look up an order,
//! or make one of the mistakes real clients make), choosing with a seeded generator so
//! runs reproduce. Every HTTP request first takes a tick from one shared pacer, which
//! holds the whole generator to `requests_per_second` however many workers there are.
//!
//! Failures are part of the traffic: declined and slow payments, sold-out products,
//! expired discount codes, wrong passwords, someone else's order. They are counted by
//! status class in [`LoadStats`], never raised; a transport error (connection refused,
//! timeout) is counted too and the journey moves on.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};

use crate::fake::{self, Country, DECLINED_CARDS, Faker, Person};
use crate::model::{Card, Cart, CartItem, Order, PaymentMethod, Product};
use crate::wire::{
    BulkOrderRequest, CatalogPage, CheckoutRequest, LoginRequest, PayRequest, SessionResponse, SignupRequest,
};

/// How hard and how long to drive the shop.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// HTTP requests per second across all workers. Values that are not positive and
    /// finite fall back to [`LoadConfig::DEFAULT_REQUESTS_PER_SECOND`].
    pub requests_per_second: f64,
    /// Seeds every choice the shoppers make.
    pub seed: u64,
    /// Shopper journeys in flight at once (at least 1).
    pub concurrency: usize,
    /// Longest wait for one response before it counts as a transport error. Keep it
    /// above the shop's payment timeout, or slow payments turn into transport errors.
    pub request_timeout: Duration,
    /// Stop after this many requests; `None` runs until shutdown.
    pub max_requests: Option<u64>,
}

impl LoadConfig {
    /// Default rate: enough to hit every instrumented line within seconds.
    pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 20.0;
    /// Default concurrency.
    pub const DEFAULT_CONCURRENCY: usize = 4;
    /// Default per-request timeout.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// A configuration for `requests_per_second` with every other knob at its default.
    pub fn new(requests_per_second: f64, seed: u64) -> Self {
        LoadConfig {
            requests_per_second,
            seed,
            concurrency: Self::DEFAULT_CONCURRENCY,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_requests: None,
        }
    }
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig::new(Self::DEFAULT_REQUESTS_PER_SECOND, 1)
    }
}

/// What a load run did, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Requests sent (whatever came back).
    pub requests: u64,
    /// 2xx answers.
    pub successes: u64,
    /// 4xx answers: the expected failures (declines, sold out, bad input, wrong owner).
    pub client_errors: u64,
    /// 5xx answers (payment timeouts are 504).
    pub server_errors: u64,
    /// No answer: connection refused or reset, or the request timed out.
    pub transport_errors: u64,
    /// Orders created by checkouts and bulk orders.
    pub orders_placed: u64,
    /// Payments captured.
    pub payments_captured: u64,
    /// Payments the processor declined (HTTP 402).
    pub payments_declined: u64,
    /// Payments that timed out at the processor (HTTP 504).
    pub payments_timed_out: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    successes: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    orders_placed: AtomicU64,
    payments_captured: AtomicU64,
    payments_declined: AtomicU64,
    payments_timed_out: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> LoadStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LoadStats {
            requests: get(&self.requests),
            successes: get(&self.successes),
            client_errors: get(&self.client_errors),
            server_errors: get(&self.server_errors),
            transport_errors: get(&self.transport_errors),
            orders_placed: get(&self.orders_placed),
            payments_captured: get(&self.payments_captured),
            payments_declined: get(&self.payments_declined),
            payments_timed_out: get(&self.payments_timed_out),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The request budget is spent: the worker stops.
#[derive(Debug)]
struct Exhausted;

type Journey = Result<(), Exhausted>;

/// A shopper the generator has signed up and can come back as.
#[derive(Debug, Clone)]
struct Account {
    user_id: u64,
    token: String,
    person: Person,
    user_agent: String,
    ip: IpAddr,
}

/// An answer: its status and body.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

impl Reply {
    fn json<T: DeserializeOwned>(&self) -> Option<T> {
        if self.status.is_success() { serde_json::from_slice(&self.body).ok() } else { None }
    }
}

/// Most accounts and orders remembered for returning shoppers.
const MEMORY: usize = 256;

/// Discount codes shoppers type, valid or not.
const CODES: &[&str] = &["WELCOME10", "SPRING25", "FREESHIP", "SUMMER2019", "BLACKFRIDAY"];

struct Driver {
    client: reqwest::Client,
    base: String,
    pacer: tokio::sync::Mutex<Interval>,
    budget: Option<AtomicU64>,
    counters: Counters,
    accounts: Mutex<VecDeque<Account>>,
    orders: Mutex<VecDeque<(Account, u64)>>,
    products: Mutex<Vec<Product>>,
}

/// Drives realistic traffic against the shop at `base_url` (e.g. `http://127.0.0.1:8080`)
/// until `shutdown` resolves or `config.max_requests` have been sent, and says what
/// happened. Never panics on HTTP errors: it counts them.
pub async fn generate_load(
    base_url: String,
    config: LoadConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> LoadStats {
    let client = match reqwest::Client::builder()
        .timeout(config.request_timeout)
        .pool_max_idle_per_host(config.concurrency.max(1))
        .build()
    {
        Ok(client) => client,
        // Only a broken TLS or resolver setup makes this fail; report it as one
        // request that could not be sent rather than panicking the host.
        Err(_) => return LoadStats { requests: 1, transport_errors: 1, ..LoadStats::default() },
    };
    let rps = config.requests_per_second;
    let rps = if rps.is_finite() && rps > 0.0 { rps } else { LoadConfig::DEFAULT_REQUESTS_PER_SECOND };
    let period = Duration::try_from_secs_f64((1.0 / rps).clamp(1e-6, 3_600.0)).unwrap_or(Duration::from_millis(50));
    let mut pacer = tokio::time::interval(period);
    // After a stall, resume the rate rather than bursting to catch up.
    pacer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let driver = Arc::new(Driver {
        client,
        base: base_url.trim_end_matches('/').to_owned(),
        pacer: tokio::sync::Mutex::new(pacer),
        budget: config.max_requests.map(AtomicU64::new),
        counters: Counters::default(),
        accounts: Mutex::new(VecDeque::new()),
        orders: Mutex::new(VecDeque::new()),
        products: Mutex::new(Vec::new()),
    });
    let mut workers = JoinSet::new();
    for i in 0..config.concurrency.max(1) as u64 {
        let seed = config.seed.wrapping_mul(0x9E37_79B9).wrapping_add(i);
        workers.spawn(Arc::clone(&driver).shop_until_exhausted(seed));
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            joined = workers.join_next() => if joined.is_none() { break },
        }
    }
    // Aborts journeys mid-request: dropping a request future cancels it.
    workers.shutdown().await;
    driver.counters.snapshot()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Driver {
    async fn shop_until_exhausted(self: Arc<Self>, seed: u64) {
        let mut faker = Faker::new(seed);
        loop {
            let journey = match faker.rng().below(100) {
                0..30 => self.browse(&mut faker).await,
                30..72 => self.purchase(&mut faker).await,
                72..76 => self.bulk_purchase(&mut faker).await,
                76..86 => self.account_visit(&mut faker).await,
                86..94 => self.order_lookup(&mut faker).await,
                _ => self.mistake(&mut faker).await,
            };
            if journey.is_err() {
                return;
            }
            // A journey can end without sending anything (nothing in stock, no known
            // orders); never let a worker spin without giving the runtime a turn.
            tokio::task::yield_now().await;
        }
    }

    /// Waits for the pacer and takes one request from the budget.
    async fn admit(&self) -> Result<(), Exhausted> {
        if let Some(budget) = &self.budget {
            budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).map_err(|_| Exhausted)?;
        }
        self.pacer.lock().await.tick().await;
        Ok(())
    }

    fn request(&self, method: Method, path: &str, who: Option<&Account>) -> RequestBuilder {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(account) = who {
            rb = rb
                .bearer_auth(&account.token)
                .header(reqwest::header::USER_AGENT, &account.user_agent)
                .header("x-forwarded-for", account.ip.to_string());
        }
        rb
    }

    /// Sends a request and counts its outcome; `None` when no answer came.
    async fn send(&self, rb: RequestBuilder) -> Result<Option<Reply>, Exhausted> {
        self.admit().await?;
        bump(&self.counters.requests);
        let c = &self.counters;
        let response = match rb.send().await {
            Ok(r) => r,
            Err(_) => {
                bump(&c.transport_errors);
                return Ok(None);
            }
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b.to_vec(),
            Err(_) => {
                bump(&c.transport_errors);
                return Ok(None);
            }
        };
        if status.is_success() {
            bump(&c.successes);
        } else if status.is_client_error() {
            bump(&c.client_errors);
        } else if status.is_server_error() {
            bump(&c.server_errors);
        }
        Ok(Some(Reply { status, body }))
    }

    async fn send_json(&self, rb: RequestBuilder, body: &impl Serialize) -> Result<Option<Reply>, Exhausted> {
        self.send(rb.json(body)).await
    }

    fn remember_account(&self, account: Account) {
        let mut accounts = lock(&self.accounts);
        accounts.push_back(account);
        if accounts.len() > MEMORY {
            accounts.pop_front();
        }
    }

    fn remember_order(&self, account: &Account, order_id: u64) {
        let mut orders = lock(&self.orders);
        orders.push_back((account.clone(), order_id));
        if orders.len() > MEMORY {
            orders.pop_front();
        }
    }

    fn known_account(&self, faker: &mut Faker) -> Option<Account> {
        let accounts = lock(&self.accounts);
        let i = faker.rng().below(accounts.len() as u64) as usize;
        accounts.get(i).cloned()
    }

    /// A new shopper signs up; `None` when the shop refused or did not answer.
    async fn sign_up(&self, faker: &mut Faker) -> Result<Option<Account>, Exhausted> {
        let person = faker.person();
        let user_agent = faker.user_agent();
        let ip = faker.ip();
        let req = SignupRequest {
            name: person.name.clone(),
            email: person.email.clone(),
            phone: person.phone.clone(),
            date_of_birth: person.date_of_birth.clone(),
            address: person.address.clone(),
            password: person.password.clone(),
            ssn: person.ssn.clone(),
        };
        let rb = self
            .request(Method::POST, "/users", None)
            .header(reqwest::header::USER_AGENT, &user_agent)
            .header("x-forwarded-for", ip.to_string());
        let reply = self.send_json(rb, &req).await?;
        let Some(session) = reply.and_then(|r| r.json::<SessionResponse>()) else { return Ok(None) };
        let account = Account { user_id: session.user_id, token: session.api_token, person, user_agent, ip };
        self.remember_account(account.clone());
        Ok(Some(account))
    }

    /// A returning shopper most of the time once there are some, else a new one.
    async fn shopper(&self, faker: &mut Faker) -> Result<Option<Account>, Exhausted> {
        if faker.rng().chance(0.4)
            && let Some(account) = self.known_account(faker)
        {
            return Ok(Some(account));
        }
        self.sign_up(faker).await
    }

    /// The catalog, fetched on first use and now and then again.
    async fn catalog(&self, faker: &mut Faker) -> Result<Vec<Product>, Exhausted> {
        let cached = lock(&self.products).clone();
        if !cached.is_empty() && !faker.rng().chance(0.05) {
            return Ok(cached);
        }
        let mut products = Vec::new();
        for offset in [0, 100] {
            let rb = self.request(Method::GET, &format!("/products?offset={offset}&limit=100"), None);
            if let Some(page) = self.send(rb).await?.and_then(|r| r.json::<CatalogPage>()) {
                products.extend(page.products);
            }
        }
        if !products.is_empty() {
            *lock(&self.products) = products.clone();
        }
        Ok(products)
    }

    async fn browse(&self, faker: &mut Faker) -> Journey {
        let offset = faker.rng().below(6) * 20;
        let category = faker.category();
        let path = if faker.rng().chance(0.3) {
            format!("/products?category={category}&limit=20")
        } else {
            format!("/products?offset={offset}&limit=20")
        };
        let page = self.send(self.request(Method::GET, &path, None)).await?.and_then(|r| r.json::<CatalogPage>());
        let ids: Vec<u64> = page.map(|p| p.products.iter().map(|p| p.id).collect()).unwrap_or_default();
        for _ in 0..faker.rng().range(1, 3) {
            // Now and then a stale link to a product that no longer exists.
            let id = if faker.rng().chance(0.05) {
                900_000 + faker.rng().below(1_000)
            } else {
                match faker.rng().pick(&ids) {
                    Some(id) => *id,
                    None => break,
                }
            };
            self.send(self.request(Method::GET, &format!("/products/{id}"), None)).await?;
        }
        Ok(())
    }

    async fn purchase(&self, faker: &mut Faker) -> Journey {
        let Some(account) = self.shopper(faker).await? else { return Ok(()) };
        let products = self.catalog(faker).await?;
        if products.is_empty() {
            return Ok(());
        }
        let me = Some(&account);
        let Some(cart) = self.send(self.request(Method::POST, "/carts", me)).await?.and_then(|r| r.json::<Cart>())
        else {
            return Ok(());
        };
        let mut added = Vec::new();
        for _ in 0..faker.rng().range(1, 5) {
            let Some(product) = faker.rng().pick(&products) else { break };
            let item = CartItem { product_id: product.id, qty: faker.rng().range(1, 3) as u32 };
            let path = format!("/carts/{}/items", cart.id);
            let reply = self.send_json(self.request(Method::POST, &path, me), &item).await?;
            if reply.is_some_and(|r| r.status.is_success()) {
                added.push(product.id);
            }
        }
        if added.len() > 1 && faker.rng().chance(0.15) {
            let path = format!("/carts/{}/items/{}", cart.id, added.remove(0));
            self.send(self.request(Method::DELETE, &path, me)).await?;
        }
        if faker.rng().chance(0.3) {
            self.send(self.request(Method::GET, &format!("/carts/{}", cart.id), me)).await?;
        }
        let recipient = account.person.name.split(' ').next().unwrap_or("friend").to_owned();
        let checkout = CheckoutRequest {
            discount_code: faker
                .rng()
                .chance(0.25)
                .then(|| faker.rng().pick(CODES).copied().unwrap_or_default().into()),
            gift_message: faker.rng().chance(0.2).then(|| {
                let long = faker.rng().chance(0.5);
                faker.gift_message(&recipient, long)
            }),
            shipping_address: faker.rng().chance(0.1).then(|| faker.address(account.person.country)),
        };
        let path = format!("/carts/{}/checkout", cart.id);
        let reply = self.send_json(self.request(Method::POST, &path, me), &checkout).await?;
        let Some(order) = reply.and_then(|r| r.json::<Order>()) else { return Ok(()) };
        bump(&self.counters.orders_placed);
        self.remember_order(&account, order.id);
        let mut captured = self.pay(faker, &account, order.id, false).await?;
        if !captured && faker.rng().chance(0.5) {
            captured = self.pay(faker, &account, order.id, true).await?;
        }
        if captured || faker.rng().chance(0.5) {
            self.send(self.request(Method::GET, &format!("/orders/{}", order.id), me)).await?;
        }
        Ok(())
    }

    /// Pays for an order; `Ok(true)` when captured. A retry always uses a good card.
    async fn pay(&self, faker: &mut Faker, account: &Account, order_id: u64, retry: bool) -> Result<bool, Exhausted> {
        let person = &account.person;
        let method = if !retry && faker.rng().chance(0.2) {
            let mut iban = faker.iban(person.country);
            if faker.rng().chance(0.03) {
                iban.push('0'); // a typo: fails mod-97
            }
            let iban = if faker.rng().chance(0.5) { fake::iban_grouped(&iban) } else { iban };
            PaymentMethod::Sepa { account_holder: person.name.clone(), iban }
        } else {
            let year = fake::current_year();
            let card = faker.card(&person.name, year);
            let mut card = Card {
                holder: card.holder,
                card_number: card.number,
                expiry_month: card.expiry_month,
                expiry_year: card.expiry_year,
                cvv: card.cvv,
            };
            if !retry {
                match faker.rng().below(100) {
                    0..6 => {
                        let declined = faker.rng().pick(DECLINED_CARDS).map_or("4000000000000002", |(n, _)| n);
                        card.card_number = declined.to_owned();
                    }
                    6..9 => card.expiry_year = year - 1,
                    9..11 => card.cvv.push('9'),
                    _ => {}
                }
            }
            if faker.rng().chance(0.4) {
                card.card_number = group_card_number(&card.card_number);
            }
            PaymentMethod::Card(card)
        };
        let billing_address =
            if faker.rng().chance(0.8) { person.address.clone() } else { faker.address(person.country) };
        let req = PayRequest { method, billing_address };
        let path = format!("/orders/{order_id}/pay");
        let reply = self.send_json(self.request(Method::POST, &path, Some(account)), &req).await?;
        let c = &self.counters;
        Ok(match reply.map(|r| r.status) {
            Some(s) if s.is_success() => {
                bump(&c.payments_captured);
                true
            }
            Some(StatusCode::PAYMENT_REQUIRED) => {
                bump(&c.payments_declined);
                false
            }
            Some(StatusCode::GATEWAY_TIMEOUT) => {
                bump(&c.payments_timed_out);
                false
            }
            _ => false,
        })
    }

    async fn bulk_purchase(&self, faker: &mut Faker) -> Journey {
        let Some(account) = self.shopper(faker).await? else { return Ok(()) };
        let stocked: Vec<Product> = self.catalog(faker).await?.into_iter().filter(|p| p.stock >= 100).collect();
        if stocked.is_empty() {
            return Ok(());
        }
        // Past the 100-item collection limit, so truncation shows in snapshots.
        let lines = (0..faker.rng().range(101, 180))
            .filter_map(|_| faker.rng().pick(&stocked).map(|p| CartItem { product_id: p.id, qty: 1 }))
            .collect();
        let req = BulkOrderRequest {
            lines,
            po_reference: Some(format!("PO-{}-{}", fake::current_year(), faker.rng().digits(6))),
        };
        let reply = self.send_json(self.request(Method::POST, "/orders/bulk", Some(&account)), &req).await?;
        let Some(order) = reply.and_then(|r| r.json::<Order>()) else { return Ok(()) };
        bump(&self.counters.orders_placed);
        self.remember_order(&account, order.id);
        let good_card = faker.rng().chance(0.5);
        self.pay(faker, &account, order.id, good_card).await?;
        Ok(())
    }

    async fn account_visit(&self, faker: &mut Faker) -> Journey {
        let Some(account) = self.shopper(faker).await? else { return Ok(()) };
        let password = if faker.rng().chance(0.15) { "letmein123".to_owned() } else { account.person.password.clone() };
        let login = LoginRequest { email: account.person.email.clone(), password };
        self.send_json(self.request(Method::POST, "/sessions", None), &login).await?;
        let path = format!("/users/{}", account.user_id);
        self.send(self.request(Method::GET, &path, Some(&account))).await?;
        Ok(())
    }

    async fn order_lookup(&self, faker: &mut Faker) -> Journey {
        let known = {
            let orders = lock(&self.orders);
            orders.get(faker.rng().below(orders.len() as u64) as usize).cloned()
        };
        let Some((owner, order_id)) = known else { return self.browse(faker).await };
        // Sometimes someone else's account asks: a 403.
        let asker = if faker.rng().chance(0.1) { self.known_account(faker).unwrap_or(owner) } else { owner };
        self.send(self.request(Method::GET, &format!("/orders/{order_id}"), Some(&asker))).await?;
        Ok(())
    }

    async fn mistake(&self, faker: &mut Faker) -> Journey {
        match faker.rng().below(4) {
            0 => {
                let p = faker.person_in(Country::Us);
                let req = SignupRequest {
                    name: p.name,
                    email: p.email.replace('@', " at "),
                    phone: p.phone,
                    date_of_birth: p.date_of_birth,
                    address: p.address,
                    password: p.password,
                    ssn: p.ssn,
                };
                self.send_json(self.request(Method::POST, "/users", None), &req).await?;
            }
            1 => {
                let path = format!("/orders/{}", faker.rng().range(1, 5_000));
                self.send(self.request(Method::GET, &path, None)).await?;
            }
            2 => {
                let rb = self.request(Method::POST, "/carts", None).bearer_auth("shp_live_revoked");
                self.send(rb).await?;
            }
            _ => {
                let path = format!("/products/{}", 900_000 + faker.rng().below(1_000));
                self.send(self.request(Method::GET, &path, None)).await?;
            }
        }
        Ok(())
    }
}

/// `4111111111111111` → `4111 1111 1111 1111`, as people type it.
fn group_card_number(digits: &str) -> String {
    let mut out = String::with_capacity(digits.len() + 4);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}
