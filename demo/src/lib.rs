//! A small online shop that exists to be debugged.
//!
//! `periscope demo` runs several instances of this shop, each with a Periscope agent
//! attached, and drives them with the built-in load generator, so that a person or an
//! assistant can place snapshots, logs and metrics on real code paths and see hits
//! within seconds. The shop is realistic where it matters to Periscope: its requests run
//! through nested instrumented functions, its values are nested structs, long lists and
//! long strings, and they are full of personal data and secrets, so that depth limits,
//! item limits, string limits and redaction all have something to do.
//!
//! The crate installs no tracing subscriber: it only emits `tracing` spans and events.
//! Whoever runs it (the `periscope demo` child process, a test) installs the subscriber,
//! typically an `fmt` layer plus the Periscope agent layer, then calls [`serve`] and
//! [`generate_load`].
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use periscope_demo::{LoadConfig, ShopConfig, generate_load, serve};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("http://{}", listener.local_addr()?);
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let shop = tokio::spawn(serve(listener, ShopConfig::new("shop-eu-1", "eu-west", 1), async {
//!     let _ = stopped.await;
//! }));
//! let stats = generate_load(url, LoadConfig { max_requests: Some(200), ..LoadConfig::default() }, std::future::pending()).await;
//! println!("{stats:?}");
//! let _ = stop.send(());
//! shop.await.ok();
//! # Ok(()) }
//! ```
//!
//! # Endpoints
//!
//! All bodies are JSON ([`wire`]). Endpoints marked 🔒 need `Authorization: Bearer
//! <api_token>` from a sign-up or login. The client IP is taken from `X-Forwarded-For`
//! when present, else from the socket.
//!
//! | method and path | what it does | notable answers |
//! |---|---|---|
//! | `GET /health` | instance, region and record counts | |
//! | `GET /products?offset&limit&category` | a catalog page | |
//! | `GET /products/{id}` | one product | 404 |
//! | `POST /users` | sign up: name, email, phone, date of birth, address, password, SSN | 201, 409 e-mail taken, 422 |
//! | `POST /sessions` | log in with e-mail and password | 401 |
//! | `GET /users/{id}` 🔒 | your account and order ids | 403 |
//! | `POST /carts` 🔒 | open a cart | 201 |
//! | `GET /carts/{id}` 🔒 | a cart | 403, 404 |
//! | `POST /carts/{id}/items` 🔒 | add a product | 409 sold out |
//! | `DELETE /carts/{id}/items/{product_id}` 🔒 | remove a product | 404 |
//! | `POST /carts/{id}/checkout` 🔒 | price, discount, tax, shipping: an order | 201, 422 bad code |
//! | `POST /orders/bulk` 🔒 | a business order of up to 500 lines | 201 |
//! | `GET /orders/{id}` 🔒 | an order | 403, 404 |
//! | `POST /orders/{id}/pay` 🔒 | pay by card or SEPA debit | 402 declined, 504 processor timeout |
//!
//! # Instrumentation points
//!
//! Every request runs in a `request` span (`route`, `instance`, `region`, `status`);
//! every handler and [`Shop`] operation is an `#[instrument]` span with `user_id`,
//! `cart_id`, `order_id`, `amount_cents` as they apply. The events worth a snapshot:
//!
//! | where | event | what it shows |
//! |---|---|---|
//! | `Shop::signup` | `user signed up`, `credentials issued`, `user record stored` (`user = ?user`), a welcome message with e-mail and phone in its text | PII in fields and in free text; `password_hash`, `api_token`, `ssn` |
//! | `Shop::add_item` | `cart updated` (`cart = ?cart`) | a small nested value |
//! | `Shop::place_order` (under `checkout` or `bulk_order`) | `priced` (`order = ?order`) | Order → Customer → Address → GeoPoint: four levels, one past the depth limit |
//! | | `order placed` (`order_id`, `total_cents`, `items`) | plain fields for conditions and metrics |
//! | | `gift message attached` | strings past 255 characters (gift message, user agent) |
//! | `Shop::bulk_order` | `bulk lines priced`, `audit trail` | lists past 100 items |
//! | `Shop::apply_discount`, `Shop::compute_tax` | `discount applied`, `unknown discount code`, `tax computed` | a nested call chain under `checkout` |
//! | `Shop::charge_card` | `authorizing card` (`card_number`, `cvv`), `payment declined` (`?payment`, `reason`), `payment captured` | secrets by field name, nested inside a Debug value too |
//! | `Shop::authorize` | `payment processor timed out` | the slow path (HTTP 504) |
//! | `Shop::debit_sepa` | `SEPA mandate created` (`iban`) | IBANs |
//!
//! Each event and span starts on its own line, so `file:line` names exactly one of them.
//!
//! # Layout
//!
//! - [`shop`]: configuration, business logic and its instrumentation.
//! - [`http`]: routes, extractors, error responses, the request span.
//! - [`store`]: bounded in-memory state.
//! - [`model`]: domain types (their `Debug` is what snapshots parse).
//! - [`wire`]: JSON bodies shared by server and load generator.
//! - [`fake`]: deterministic fake personal data with valid checksums.
//! - [`load`]: the load generator.

use std::net::SocketAddr;
use std::sync::Arc;

pub mod fake;
pub mod http;
pub mod load;
pub mod model;
pub mod shop;
pub mod store;
pub mod wire;

pub use load::{LoadConfig, LoadStats, generate_load};
pub use shop::{Shop, ShopConfig, ShopError};

/// Serves the shop's HTTP API on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish for at most `config.shutdown_grace` and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ShopConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let grace = config.shutdown_grace;
    let (instance, region) = (&config.instance, &config.region);
    tracing::info!(%instance, %region, %addr, catalog = config.catalog_size, "shop listening");
    let app = http::router(Arc::new(Shop::new(config)));
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let server =
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(signal);
    let deadline = async move {
        // An error means the server already dropped the sender, i.e. it has returned.
        if stopping.wait_for(|stopping| *stopping).await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(%addr, grace_ms = grace.as_millis() as u64, "shutdown grace expired with requests in flight");
            Ok(())
        }
    }
}
