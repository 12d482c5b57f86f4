//! The shop's business logic, and the instrumentation Periscope attaches to.
//!
//! Every operation is a `#[tracing::instrument]` span with the ids a developer would
//! filter on (`user_id`, `cart_id`, `order_id`, `amount_cents`), and the interesting
//! moments are events with structured fields. The call tree of a purchase is
//! `checkout` → `price_cart` → `apply_discount` → `compute_tax`, then
//! `pay` → `charge_card` → `authorize` (or `pay` → `debit_sepa`). What the events
//! carry is deliberately what makes capture limits and redaction visible:
//!
//! - `debug!(order = ?order, "priced")`: an [`Order`] whose `GeoPoint` sits at level 4,
//!   below the default depth limit;
//! - bulk orders: line lists and audit trails longer than 100 items;
//! - gift messages and user agents longer than 255 characters;
//! - `password_hash`, `api_token`, `card_number`, `cvv` and `iban` as field names, and
//!   e-mail addresses and phone numbers inside message text.
//!
//! Each event and span starts on its own source line, so a snapshot placed by
//! `file:line` hits exactly one of them.

use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::Empty;
use tracing::{Span, debug, error, info, instrument, warn};

use crate::fake::{self, DECLINED_CARDS, Faker, Rng};
use crate::model::{
    AuditEntry, AuditEvent, Card, Cart, CartItem, Customer, Discount, Order, OrderLine, OrderStatus, Payment,
    PaymentMethod, Product, User,
};
use crate::store::{Capacity, Store, StoreError};
use crate::wire::{
    BulkOrderRequest, CatalogPage, CatalogQuery, CheckoutRequest, LoginRequest, PayRequest, PaymentReceipt,
    SessionResponse, SignupRequest, UserView,
};

/// How one shop instance behaves; see the knobs' docs for what each makes visible.
#[derive(Debug, Clone)]
pub struct ShopConfig {
    /// Instance name (`shop-eu-1`), recorded on every request span and order.
    pub instance: String,
    /// Region (`eu-west`), recorded on every request span.
    pub region: String,
    /// Seeds the catalog and every random decision, so runs reproduce.
    pub seed: u64,
    /// Products in the catalog.
    pub catalog_size: usize,
    /// Share of card payments the simulated processor declines at random, on top of
    /// the processors' always-declined test cards and expired cards.
    pub decline_rate: f64,
    /// Share of payments for which the processor hangs until `payment_timeout`.
    pub slow_payment_rate: f64,
    /// How long `authorize` waits for the processor before giving up (HTTP 504).
    pub payment_timeout: Duration,
    /// Typical processor latency; actual latency varies up to twice this.
    pub processor_latency: Duration,
    /// ISO 4217 currency of prices.
    pub currency: String,
    /// Bounds on users, carts and orders held in memory.
    pub capacity: Capacity,
    /// After shutdown is requested, how long [`serve`](crate::serve) lets requests in
    /// flight finish before it returns anyway.
    pub shutdown_grace: Duration,
}

impl ShopConfig {
    /// Default catalog size: enough for pagination to matter.
    pub const DEFAULT_CATALOG_SIZE: usize = 120;
    /// Default random decline rate.
    pub const DEFAULT_DECLINE_RATE: f64 = 0.08;
    /// Default share of payments that time out.
    pub const DEFAULT_SLOW_PAYMENT_RATE: f64 = 0.03;
    /// Default processor timeout.
    pub const DEFAULT_PAYMENT_TIMEOUT: Duration = Duration::from_millis(1_500);
    /// Default processor latency.
    pub const DEFAULT_PROCESSOR_LATENCY: Duration = Duration::from_millis(20);
    /// Default shutdown grace: a little more than the default payment timeout.
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

    /// A configuration with every knob at its default.
    pub fn new(instance: impl Into<String>, region: impl Into<String>, seed: u64) -> Self {
        ShopConfig {
            instance: instance.into(),
            region: region.into(),
            seed,
            catalog_size: Self::DEFAULT_CATALOG_SIZE,
            decline_rate: Self::DEFAULT_DECLINE_RATE,
            slow_payment_rate: Self::DEFAULT_SLOW_PAYMENT_RATE,
            payment_timeout: Self::DEFAULT_PAYMENT_TIMEOUT,
            processor_latency: Self::DEFAULT_PROCESSOR_LATENCY,
            currency: "USD".to_owned(),
            capacity: Capacity::default(),
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl Default for ShopConfig {
    fn default() -> Self {
        ShopConfig::new("shop-1", "local", 1)
    }
}

/// Why an operation was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShopError {
    /// The request is malformed or breaks a rule (HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// No or unknown bearer token (HTTP 401).
    #[error("missing or unknown API token")]
    Unauthorized,
    /// The token's user may not touch this record (HTTP 403).
    #[error("this {0} belongs to another user")]
    Forbidden(&'static str),
    /// No such record (HTTP 404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request conflicts with the state: e-mail taken, sold out, already paid (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The processor declined the payment (HTTP 402).
    #[error("payment declined: {reason}")]
    PaymentDeclined {
        /// Processor reason code.
        reason: String,
    },
    /// The processor did not answer in time (HTTP 504).
    #[error("the payment processor did not answer within {timeout_ms} ms")]
    PaymentTimeout {
        /// The timeout that expired.
        timeout_ms: u64,
    },
}

impl From<StoreError> for ShopError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ShopError::NotFound(what),
            other => ShopError::Conflict(other.to_string()),
        }
    }
}

/// Who is calling, from the request: recorded on orders and payments.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// Client IP (from `X-Forwarded-For`, else the peer).
    pub ip: String,
    /// `User-Agent` header.
    pub user_agent: String,
}

/// One shop instance: configuration, state and the random source for its decisions.
#[derive(Debug)]
pub struct Shop {
    config: ShopConfig,
    store: Store,
    rng: Mutex<Rng>,
}

/// Most lines in one bulk order.
const MAX_BULK_LINES: usize = 500;
/// Shipping charged below the free-shipping threshold.
const SHIPPING_CENTS: i64 = 499;
/// Subtotal from which shipping is free.
const FREE_SHIPPING_FROM_CENTS: i64 = 5_000;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn audit(event: AuditEvent) -> AuditEntry {
    AuditEntry { at_ms: now_ms(), event }
}

/// A salted hash that looks like a password hash in a record. Demo only: not a KDF.
fn hash_password(password: &str, salt: &str) -> String {
    let mut h = std::hash::DefaultHasher::new();
    (salt, password).hash(&mut h);
    let a = h.finish();
    password.len().hash(&mut h);
    format!("$demo-sip$v=1${salt}${a:016x}{:016x}", h.finish())
}

fn is_plausible_email(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') && !domain.contains('@'),
        None => false,
    }
}

impl Shop {
    /// A shop with a catalog generated from the config's seed.
    pub fn new(config: ShopConfig) -> Self {
        let mut faker = Faker::new(config.seed);
        let products = (0..config.catalog_size as u64)
            .map(|i| {
                let rng = faker.rng();
                // Every 25th product is sold out, every 10th is nearly so.
                let stock = if i % 25 == 7 {
                    0
                } else if i % 10 == 3 {
                    rng.range(1, 3) as u32
                } else {
                    rng.range(500, 5_000) as u32
                };
                let price_cents = (rng.range(3, 250) * 100 - 1) as i64;
                let category = faker.category().to_owned();
                Product {
                    id: i + 1,
                    sku: format!("{}-{:05}", category.get(..3).unwrap_or(&category).to_uppercase(), i + 1),
                    name: faker.product_name(),
                    category,
                    price_cents,
                    stock,
                }
            })
            .collect();
        let store = Store::new(products, config.capacity);
        let rng = Mutex::new(Rng::new(config.seed.rotate_left(17) ^ 0xA11CE));
        Shop { config, store, rng }
    }

    /// The configuration this shop runs with.
    pub fn config(&self) -> &ShopConfig {
        &self.config
    }

    /// The shop's state, for health checks and tests.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn with_rng<R>(&self, f: impl FnOnce(&mut Rng) -> R) -> R {
        f(&mut self.rng.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The user a bearer token belongs to.
    pub fn authenticate(&self, token: Option<&str>) -> Result<User, ShopError> {
        let token = token.ok_or(ShopError::Unauthorized)?;
        self.store.user_by_token(token).ok_or(ShopError::Unauthorized)
    }

    // -- accounts -----------------------------------------------------------------

    /// Registers a shopper and issues their API token.
    #[instrument(skip_all, fields(email = %req.email, user_id = Empty))]
    pub fn signup(&self, req: SignupRequest, ctx: &RequestContext) -> Result<SessionResponse, ShopError> {
        if !is_plausible_email(&req.email) {
            warn!(email = %req.email, "rejected sign-up with malformed e-mail {}", req.email);
            return Err(ShopError::Invalid(format!("`{}` is not an e-mail address", req.email)));
        }
        if req.password.chars().count() < 8 {
            return Err(ShopError::Invalid("passwords need at least 8 characters".into()));
        }
        if req.name.trim().is_empty() || req.date_of_birth.len() != 10 {
            return Err(ShopError::Invalid("name and date_of_birth (YYYY-MM-DD) are required".into()));
        }
        let id = self.store.next_id();
        let (salt, token) = self.with_rng(|r| {
            (format!("{:08x}", r.next_u64() as u32), format!("shp_live_{:016x}{:016x}", r.next_u64(), r.next_u64()))
        });
        let user = User {
            id,
            password_hash: hash_password(&req.password, &salt),
            api_token: token,
            name: req.name,
            email: req.email,
            phone: req.phone,
            date_of_birth: req.date_of_birth,
            address: req.address,
            ssn: req.ssn,
            signup_ip: ctx.ip.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
            user_agent: ctx.user_agent.clone(),
            created_at_ms: now_ms(),
        };
        Span::current().record("user_id", id);
        self.store.add_user(user.clone())?;
        info!(user_id = id, email = %user.email, phone = %user.phone, ip = %user.signup_ip, "user signed up");
        debug!(user_id = id, password_hash = %user.password_hash, api_token = %user.api_token, "credentials issued");
        debug!(user = ?user, "user record stored");
        info!("welcome e-mail queued for {} <{}>, SMS confirmation to {}", user.name, user.email, user.phone);
        Ok(SessionResponse { user_id: id, api_token: user.api_token })
    }

    /// Exchanges an e-mail and password for the account's token.
    #[instrument(skip_all, fields(email = %req.email))]
    pub fn login(&self, req: LoginRequest) -> Result<SessionResponse, ShopError> {
        let user = self.store.user_by_email(&req.email).ok_or(ShopError::Unauthorized)?;
        let salt = user.password_hash.split('$').nth(3).unwrap_or_default();
        if hash_password(&req.password, salt) != user.password_hash {
            warn!(user_id = user.id, "failed login for {} from a known account", req.email);
            return Err(ShopError::Unauthorized);
        }
        info!(user_id = user.id, api_token = %user.api_token, "login succeeded");
        Ok(SessionResponse { user_id: user.id, api_token: user.api_token })
    }

    /// The caller's own account.
    #[instrument(skip_all, fields(user_id = caller.id, requested = id))]
    pub fn user_view(&self, caller: &User, id: u64) -> Result<UserView, ShopError> {
        if caller.id != id {
            warn!(caller = caller.id, requested = id, "user tried to read another account");
            return Err(ShopError::Forbidden("account"));
        }
        Ok(UserView {
            user_id: caller.id,
            name: caller.name.clone(),
            email: caller.email.clone(),
            address: caller.address.clone(),
            order_ids: self.store.orders_of(caller.id),
        })
    }

    // -- catalog ------------------------------------------------------------------

    /// A page of the catalog.
    #[instrument(skip_all, fields(offset = query.offset, limit = query.limit, category = query.category.as_deref()))]
    pub fn catalog(&self, query: &CatalogQuery) -> CatalogPage {
        let limit = query.limit.unwrap_or(20).min(100);
        let (products, total) = self.store.products(query.category.as_deref(), query.offset.unwrap_or(0), limit);
        debug!(returned = products.len(), total, "catalog page served");
        CatalogPage { products, total }
    }

    /// One product.
    #[instrument(skip(self))]
    pub fn product(&self, product_id: u64) -> Result<Product, ShopError> {
        self.store.product(product_id).ok_or(ShopError::NotFound("product"))
    }

    // -- carts --------------------------------------------------------------------

    /// Opens an empty cart for the caller.
    #[instrument(skip_all, fields(user_id = user.id, cart_id = Empty))]
    pub fn create_cart(&self, user: &User) -> Cart {
        let cart = Cart { id: self.store.next_id(), user_id: user.id, items: Vec::new() };
        Span::current().record("cart_id", cart.id);
        self.store.add_cart(cart.clone());
        info!(cart_id = cart.id, user_id = user.id, "cart created");
        cart
    }

    fn own_cart(&self, user: &User, cart_id: u64) -> Result<Cart, ShopError> {
        let cart = self.store.cart(cart_id).ok_or(ShopError::NotFound("cart"))?;
        if cart.user_id != user.id {
            return Err(ShopError::Forbidden("cart"));
        }
        Ok(cart)
    }

    /// The caller's cart.
    #[instrument(skip_all, fields(user_id = user.id, cart_id = cart_id))]
    pub fn cart(&self, user: &User, cart_id: u64) -> Result<Cart, ShopError> {
        self.own_cart(user, cart_id)
    }

    /// Adds units of a product to the caller's cart.
    #[instrument(skip_all, fields(user_id = user.id, cart_id = cart_id, product_id = item.product_id, qty = item.qty))]
    pub fn add_item(&self, user: &User, cart_id: u64, item: CartItem) -> Result<Cart, ShopError> {
        self.own_cart(user, cart_id)?;
        if item.qty == 0 || item.qty > 99 {
            return Err(ShopError::Invalid("qty must be between 1 and 99".into()));
        }
        let product = self.store.product(item.product_id).ok_or(ShopError::NotFound("product"))?;
        if product.stock < item.qty {
            warn!(product_id = product.id, stock = product.stock, wanted = item.qty, "not enough stock");
            return Err(ShopError::Conflict(format!("only {} of {} left", product.stock, product.sku)));
        }
        let cart = self.store.update_cart(cart_id, |cart| {
            match cart.items.iter_mut().find(|i| i.product_id == item.product_id) {
                Some(line) => line.qty = (line.qty + item.qty).min(99),
                None => cart.items.push(item),
            }
            cart.clone()
        })?;
        debug!(cart = ?cart, "cart updated");
        Ok(cart)
    }

    /// Removes a product from the caller's cart.
    #[instrument(skip_all, fields(user_id = user.id, cart_id = cart_id, product_id = product_id))]
    pub fn remove_item(&self, user: &User, cart_id: u64, product_id: u64) -> Result<Cart, ShopError> {
        self.own_cart(user, cart_id)?;
        let (cart, removed) = self.store.update_cart(cart_id, |cart| {
            let before = cart.items.len();
            cart.items.retain(|i| i.product_id != product_id);
            (cart.clone(), before != cart.items.len())
        })?;
        if !removed {
            return Err(ShopError::NotFound("cart item"));
        }
        info!(cart_id, product_id, remaining = cart.items.len(), "item removed from cart");
        Ok(cart)
    }

    // -- orders -------------------------------------------------------------------

    /// Turns the caller's cart into an order awaiting payment.
    #[instrument(skip_all, fields(user_id = user.id, cart_id = cart_id, order_id = Empty, amount_cents = Empty))]
    pub fn checkout(
        &self,
        user: &User,
        cart_id: u64,
        req: CheckoutRequest,
        ctx: &RequestContext,
    ) -> Result<Order, ShopError> {
        let cart = self.own_cart(user, cart_id)?;
        if cart.items.is_empty() {
            return Err(ShopError::Invalid("the cart is empty".into()));
        }
        let order = self.place_order(user, &cart.items, req, ctx)?;
        self.store.remove_cart(cart_id);
        Ok(order)
    }

    /// Places a business customer's order straight from a purchase list.
    #[instrument(
        skip_all,
        fields(user_id = user.id, lines = req.lines.len(), po_reference = req.po_reference.as_deref(), order_id = Empty, amount_cents = Empty)
    )]
    pub fn bulk_order(&self, user: &User, req: BulkOrderRequest, ctx: &RequestContext) -> Result<Order, ShopError> {
        if req.lines.is_empty() || req.lines.len() > MAX_BULK_LINES {
            return Err(ShopError::Invalid(format!("a bulk order has 1 to {MAX_BULK_LINES} lines")));
        }
        if req.lines.iter().any(|l| l.qty == 0 || l.qty > 99) {
            return Err(ShopError::Invalid("qty must be between 1 and 99 on every line".into()));
        }
        let note =
            req.po_reference.map(|po| format!("purchase order {po}, invoice to {} ({})", user.email, user.phone));
        let checkout = CheckoutRequest { discount_code: None, gift_message: None, shipping_address: None };
        let order = self.place_order(user, &req.lines, checkout, ctx)?;
        let order = match note {
            Some(text) => self.store.update_order(order.id, |o| {
                o.audit.push(audit(AuditEvent::Note { text }));
                o.clone()
            })?,
            None => order,
        };
        debug!(order_id = order.id, lines = ?order.lines, "bulk lines priced");
        debug!(order_id = order.id, audit = ?order.audit, "audit trail");
        Ok(order)
    }

    fn place_order(
        &self,
        user: &User,
        items: &[CartItem],
        req: CheckoutRequest,
        ctx: &RequestContext,
    ) -> Result<Order, ShopError> {
        let lines = self.price_cart(items)?;
        let subtotal_cents: i64 = lines.iter().map(|l| l.line_total_cents).sum();
        let discount = match req.discount_code.as_deref() {
            Some(code) => Some(self.apply_discount(code, subtotal_cents)?),
            None => None,
        };
        let discounted = subtotal_cents - discount.as_ref().map_or(0, |d| d.amount_cents);
        let shipping_address = req.shipping_address.unwrap_or_else(|| user.address.clone());
        let tax_cents = self.compute_tax(&shipping_address.country, discounted);
        let shipping_cents = if discounted >= FREE_SHIPPING_FROM_CENTS { 0 } else { SHIPPING_CENTS };
        let mut trail = vec![audit(AuditEvent::Created { lines: lines.len() })];
        trail.extend(
            lines.iter().map(|l| audit(AuditEvent::LinePriced { product_id: l.product_id, cents: l.line_total_cents })),
        );
        if let Some(d) = &discount {
            trail.push(audit(AuditEvent::DiscountApplied { code: d.code.clone() }));
        }
        let order = Order {
            id: self.store.next_id(),
            customer: Customer {
                user_id: user.id,
                name: user.name.clone(),
                email: user.email.clone(),
                phone: user.phone.clone(),
                shipping_address,
            },
            subtotal_cents,
            discount,
            tax_cents,
            shipping_cents,
            total_cents: discounted + tax_cents + shipping_cents,
            currency: self.config.currency.clone(),
            gift_message: req.gift_message,
            status: OrderStatus::PendingPayment,
            audit: trail,
            user_agent: ctx.user_agent.clone(),
            client_ip: ctx.ip.clone(),
            instance: self.config.instance.clone(),
            placed_at_ms: now_ms(),
            lines,
        };
        Span::current().record("order_id", order.id).record("amount_cents", order.total_cents);
        debug!(order = ?order, "priced");
        let reserved: Vec<(u64, u32)> = order.lines.iter().map(|l| (l.product_id, l.qty)).collect();
        if let Err(e) = self.store.take_stock(&reserved) {
            warn!(order_id = order.id, error = %e, "checkout failed: stock changed since the cart was filled");
            return Err(e.into());
        }
        self.store.add_order(order.clone());
        info!(order_id = order.id, total_cents = order.total_cents, items = order.lines.len(), "order placed");
        if let Some(message) = &order.gift_message {
            let user_agent = &order.user_agent;
            info!(order_id = order.id, gift_message = %message, %user_agent, "gift message attached");
        }
        Ok(order)
    }

    /// Prices each line at the catalog's current price.
    #[instrument(skip_all, fields(lines = items.len()))]
    pub fn price_cart(&self, items: &[CartItem]) -> Result<Vec<OrderLine>, ShopError> {
        items
            .iter()
            .map(|item| {
                let product = self.store.product(item.product_id).ok_or(ShopError::NotFound("product"))?;
                let line_total_cents = product.price_cents * i64::from(item.qty);
                Ok(OrderLine {
                    product_id: product.id,
                    sku: product.sku,
                    name: product.name,
                    qty: item.qty,
                    unit_price_cents: product.price_cents,
                    line_total_cents,
                })
            })
            .collect()
    }

    /// Checks a discount code against the subtotal and says how much it takes off.
    #[instrument(skip(self))]
    pub fn apply_discount(&self, code: &str, subtotal_cents: i64) -> Result<Discount, ShopError> {
        let amount_cents = match code.to_ascii_uppercase().as_str() {
            "WELCOME10" => subtotal_cents / 10,
            "SPRING25" if subtotal_cents >= 10_000 => subtotal_cents / 4,
            "SPRING25" => {
                info!(code, subtotal_cents, "discount needs a subtotal of at least 100.00");
                return Err(ShopError::Invalid("SPRING25 needs a subtotal of at least 100.00".into()));
            }
            "FREESHIP" => SHIPPING_CENTS.min(subtotal_cents),
            "SUMMER2019" => {
                warn!(code, "expired discount code used");
                return Err(ShopError::Invalid(format!("discount code {code} has expired")));
            }
            _ => {
                warn!(code, "unknown discount code");
                return Err(ShopError::Invalid(format!("unknown discount code {code}")));
            }
        };
        debug!(code, amount_cents, "discount applied");
        Ok(Discount { code: code.to_owned(), amount_cents })
    }

    /// Sales tax or VAT for the destination country.
    #[instrument(skip(self))]
    pub fn compute_tax(&self, country: &str, amount_cents: i64) -> i64 {
        let bps = fake::Country::from_code(country).map_or(0, |c| c.tax_bps());
        let tax = (amount_cents * i64::from(bps) + 5_000) / 10_000;
        debug!(country, bps, tax_cents = tax, "tax computed");
        tax
    }

    /// One of the caller's orders.
    #[instrument(skip_all, fields(user_id = user.id, order_id = order_id))]
    pub fn order(&self, user: &User, order_id: u64) -> Result<Order, ShopError> {
        let order = self.store.order(order_id).ok_or(ShopError::NotFound("order"))?;
        if order.customer.user_id != user.id {
            warn!(user_id = user.id, order_id, owner = order.customer.user_id, "order lookup by another user");
            return Err(ShopError::Forbidden("order"));
        }
        Ok(order)
    }

    // -- payments -----------------------------------------------------------------

    /// Pays for one of the caller's orders by card or SEPA debit.
    #[instrument(skip_all, fields(user_id = user.id, order_id = order_id, amount_cents = Empty, method = Empty))]
    pub async fn pay(
        &self,
        user: &User,
        order_id: u64,
        req: PayRequest,
        ctx: &RequestContext,
    ) -> Result<PaymentReceipt, ShopError> {
        let order = self.order(user, order_id)?;
        if matches!(order.status, OrderStatus::Paid { .. }) {
            return Err(ShopError::Conflict(format!("order {order_id} is already paid")));
        }
        let payment = Payment {
            id: self.store.next_id(),
            order_id,
            amount_cents: order.total_cents,
            currency: order.currency.clone(),
            method: req.method,
            billing_address: req.billing_address,
            client_ip: ctx.ip.clone(),
        };
        let method = match &payment.method {
            PaymentMethod::Card(card) => card.brand(),
            PaymentMethod::Sepa { .. } => "sepa",
        };
        Span::current().record("amount_cents", payment.amount_cents).record("method", method);
        let outcome = match &payment.method {
            PaymentMethod::Card(card) => self.charge_card(&payment, card).await,
            PaymentMethod::Sepa { iban, account_holder } => self.debit_sepa(&payment, iban, account_holder),
        };
        let (status, audit_outcome) = match &outcome {
            Ok(_) => (OrderStatus::Paid { payment_id: payment.id }, "captured".to_owned()),
            Err(ShopError::PaymentDeclined { reason }) => {
                (OrderStatus::PaymentFailed { reason: reason.clone() }, format!("declined: {reason}"))
            }
            Err(ShopError::PaymentTimeout { .. }) => {
                (OrderStatus::PaymentFailed { reason: "processor_timeout".into() }, "timeout".to_owned())
            }
            Err(e) => (order.status.clone(), format!("rejected: {e}")),
        };
        self.store.update_order(order_id, |o| {
            o.status = status;
            o.audit.push(audit(AuditEvent::PaymentAttempt { outcome: audit_outcome }));
        })?;
        outcome
    }

    /// Authorizes and captures a card payment with the (simulated) processor.
    #[instrument(
        skip_all,
        fields(order_id = payment.order_id, amount_cents = payment.amount_cents, card_brand = card.brand(), last4 = %card.last4())
    )]
    pub async fn charge_card(&self, payment: &Payment, card: &Card) -> Result<PaymentReceipt, ShopError> {
        let digits = card.digits();
        if !fake::luhn_valid(&digits) {
            info!(order_id = payment.order_id, card_number = %card.card_number, "card number fails the Luhn check");
            return Err(ShopError::Invalid("the card number is not valid".into()));
        }
        let expiry = format!("{:02}/{}", card.expiry_month, card.expiry_year);
        debug!(card_number = %card.card_number, cvv = %card.cvv, %expiry, holder = %card.holder, "authorizing card");
        let year = fake::current_year();
        let declined_by_rule = if card.expiry_year < year {
            Some("expired_card".to_owned())
        } else if card.cvv.len() != if card.brand() == "amex" { 4 } else { 3 } {
            Some("incorrect_cvc".to_owned())
        } else {
            DECLINED_CARDS.iter().find(|(n, _)| *n == digits).map(|(_, reason)| (*reason).to_owned())
        };
        let reason = match declined_by_rule {
            Some(reason) => Some(reason),
            None => self.authorize(payment).await?,
        };
        if let Some(reason) = reason {
            warn!(?payment, reason = %reason, "payment declined");
            return Err(ShopError::PaymentDeclined { reason });
        }
        info!(
            order_id = payment.order_id,
            payment_id = payment.id,
            amount_cents = payment.amount_cents,
            "payment captured"
        );
        Ok(PaymentReceipt {
            payment_id: payment.id,
            order_id: payment.order_id,
            amount_cents: payment.amount_cents,
            method: card.brand().to_owned(),
            last4: card.last4(),
        })
    }

    /// Asks the processor; `Ok(Some(reason))` is a decline.
    #[instrument(skip_all, fields(payment_id = payment.id, timeout_ms = self.config.payment_timeout.as_millis() as u64))]
    async fn authorize(&self, payment: &Payment) -> Result<Option<String>, ShopError> {
        let config = &self.config;
        let (slow, declined, latency, reason) = self.with_rng(|r| {
            let slow = r.chance(config.slow_payment_rate);
            let declined = r.chance(config.decline_rate);
            let latency = config.processor_latency.mul_f64(0.5 + 1.5 * r.unit());
            let reasons = ["insufficient_funds", "do_not_honor", "card_velocity_exceeded", "suspected_fraud"];
            (slow, declined, latency, r.pick(&reasons).copied().unwrap_or("do_not_honor"))
        });
        let wait = if slow { config.payment_timeout * 3 } else { latency };
        if slow {
            debug!(payment_id = payment.id, "processor is slow to answer");
        }
        // The simulated answer takes `wait`; whether it beats the timeout is decided from
        // the two durations. Racing two timers (`timeout(t, sleep(wait))`) would let a
        // runtime stalled past both deadlines see the answer first and miss the timeout.
        if wait < config.payment_timeout {
            tokio::time::sleep(wait).await;
            return Ok(declined.then(|| reason.to_owned()));
        }
        tokio::time::sleep(config.payment_timeout).await;
        let timeout_ms = config.payment_timeout.as_millis() as u64;
        error!(
            order_id = payment.order_id,
            amount_cents = payment.amount_cents,
            timeout_ms,
            "payment processor timed out"
        );
        Err(ShopError::PaymentTimeout { timeout_ms })
    }

    /// Sets up a SEPA direct debit.
    #[instrument(skip_all, fields(order_id = payment.order_id, amount_cents = payment.amount_cents))]
    pub fn debit_sepa(&self, payment: &Payment, iban: &str, account_holder: &str) -> Result<PaymentReceipt, ShopError> {
        if !fake::iban_valid(iban) {
            warn!(order_id = payment.order_id, iban = %iban, "IBAN fails the mod-97 check");
            return Err(ShopError::Invalid("the IBAN is not valid".into()));
        }
        info!(iban = %iban, account_holder = %account_holder, payment_id = payment.id, "SEPA mandate created");
        let compact: String = iban.chars().filter(|c| !c.is_whitespace()).collect();
        let skip = compact.chars().count().saturating_sub(4);
        Ok(PaymentReceipt {
            payment_id: payment.id,
            order_id: payment.order_id,
            amount_cents: payment.amount_cents,
            method: "sepa".into(),
            last4: compact.chars().skip(skip).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Country;

    fn shop() -> Shop {
        Shop::new(ShopConfig { decline_rate: 0.0, slow_payment_rate: 0.0, ..ShopConfig::default() })
    }

    fn signup(shop: &Shop, faker: &mut Faker) -> User {
        let p = faker.person_in(Country::Fr);
        let req = SignupRequest {
            name: p.name,
            email: p.email,
            phone: p.phone,
            date_of_birth: p.date_of_birth,
            address: p.address,
            password: p.password,
            ssn: p.ssn,
        };
        let session = shop.signup(req, &RequestContext::default()).unwrap();
        shop.authenticate(Some(&session.api_token)).unwrap()
    }

    #[test]
    fn checkout_totals_apply_discount_then_tax_then_shipping() {
        let shop = shop();
        let user = signup(&shop, &mut Faker::new(1));
        let product = shop.store.products(None, 0, 100).0.into_iter().find(|p| p.stock > 10).unwrap();
        let cart = shop.create_cart(&user);
        shop.add_item(&user, cart.id, CartItem { product_id: product.id, qty: 2 }).unwrap();
        let req = CheckoutRequest { discount_code: Some("WELCOME10".into()), ..CheckoutRequest::default() };
        let order = shop.checkout(&user, cart.id, req, &RequestContext::default()).unwrap();
        let subtotal = product.price_cents * 2;
        let discounted = subtotal - subtotal / 10;
        let tax = (discounted * 2_000 + 5_000) / 10_000;
        let shipping = if discounted >= FREE_SHIPPING_FROM_CENTS { 0 } else { SHIPPING_CENTS };
        assert_eq!(order.subtotal_cents, subtotal);
        assert_eq!(order.tax_cents, tax);
        assert_eq!(order.total_cents, discounted + tax + shipping);
        assert!(shop.store.cart(cart.id).is_none(), "the cart is consumed");
    }

    #[test]
    fn unknown_and_expired_codes_are_refused() {
        let shop = shop();
        assert!(matches!(shop.apply_discount("NOPE", 1_000), Err(ShopError::Invalid(_))));
        assert!(matches!(shop.apply_discount("SUMMER2019", 1_000), Err(ShopError::Invalid(_))));
        assert!(matches!(shop.apply_discount("SPRING25", 1_000), Err(ShopError::Invalid(_))));
        assert_eq!(shop.apply_discount("spring25", 20_000).unwrap().amount_cents, 5_000);
    }

    #[test]
    fn another_users_cart_and_orders_are_forbidden() {
        let shop = shop();
        let mut faker = Faker::new(2);
        let (a, b) = (signup(&shop, &mut faker), signup(&shop, &mut faker));
        let cart = shop.create_cart(&a);
        assert_eq!(shop.cart(&b, cart.id), Err(ShopError::Forbidden("cart")));
        assert_eq!(shop.user_view(&b, a.id).unwrap_err(), ShopError::Forbidden("account"));
    }

    #[test]
    fn a_password_logs_in_and_a_wrong_one_does_not() {
        let shop = shop();
        let p = Faker::new(3).person();
        let req = SignupRequest {
            name: p.name,
            email: p.email.clone(),
            phone: p.phone,
            date_of_birth: p.date_of_birth,
            address: p.address,
            password: p.password.clone(),
            ssn: None,
        };
        let session = shop.signup(req, &RequestContext::default()).unwrap();
        let ok = shop.login(LoginRequest { email: p.email.clone(), password: p.password }).unwrap();
        assert_eq!(ok.api_token, session.api_token);
        let bad = shop.login(LoginRequest { email: p.email, password: "wrong password".into() });
        assert_eq!(bad.unwrap_err(), ShopError::Unauthorized);
    }

    #[tokio::test]
    async fn declined_test_cards_are_declined_and_the_order_records_it() {
        let shop = shop();
        let user = signup(&shop, &mut Faker::new(4));
        let product = shop.store.products(None, 0, 100).0.into_iter().find(|p| p.stock > 10).unwrap();
        let order = shop
            .bulk_order(
                &user,
                BulkOrderRequest { lines: vec![CartItem { product_id: product.id, qty: 1 }], po_reference: None },
                &RequestContext::default(),
            )
            .unwrap();
        let card = Card {
            holder: user.name.clone(),
            card_number: "4000 0000 0000 0002".into(),
            expiry_month: 12,
            expiry_year: fake::current_year() + 2,
            cvv: "123".into(),
        };
        let req = PayRequest { method: PaymentMethod::Card(card), billing_address: user.address.clone() };
        let err = shop.pay(&user, order.id, req, &RequestContext::default()).await.unwrap_err();
        assert_eq!(err, ShopError::PaymentDeclined { reason: "generic_decline".into() });
        let stored = shop.store.order(order.id).unwrap();
        assert_eq!(stored.status, OrderStatus::PaymentFailed { reason: "generic_decline".into() });
    }
}
