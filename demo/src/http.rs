//! The HTTP face of the shop: routes, extractors and error responses.
//!
//! Handlers are thin: they extract the caller (bearer token), the request context
//! (client IP, user agent) and the JSON body, call into [`Shop`], and turn a
//! [`ShopError`] into a status and an [`ErrorBody`]. A middleware wraps every request in
//! a `request` span carrying the route, the instance and the region, so that any
//! snapshot taken deeper down says which instance served it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::field::Empty;
use tracing::{Instrument, error, info, info_span, instrument};

use crate::model::{Cart, CartItem, Order, Product, User};
use crate::shop::{RequestContext, Shop, ShopError};
use crate::wire::{
    BulkOrderRequest, CatalogPage, CatalogQuery, CheckoutRequest, ErrorBody, LoginRequest, PayRequest, PaymentReceipt,
    SessionResponse, SignupRequest, UserView,
};

type AppState = Arc<Shop>;

/// The shop's routes over `shop`; see the crate docs for the endpoint list.
pub fn router(shop: Arc<Shop>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/products", get(get_products))
        .route("/products/{id}", get(get_product))
        .route("/users", post(post_users))
        .route("/users/{id}", get(get_user))
        .route("/sessions", post(post_sessions))
        .route("/carts", post(post_carts))
        .route("/carts/{id}", get(get_cart))
        .route("/carts/{id}/items", post(post_cart_items))
        .route("/carts/{id}/items/{product_id}", delete(delete_cart_item))
        .route("/carts/{id}/checkout", post(post_checkout))
        .route("/orders/bulk", post(post_bulk_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/pay", post(post_pay))
        .layer(middleware::from_fn_with_state(shop.clone(), request_span))
        .with_state(shop)
}

/// A [`ShopError`] on its way to becoming a response.
#[derive(Debug)]
pub struct ApiError(pub ShopError);

impl From<ShopError> for ApiError {
    fn from(e: ShopError) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    /// The status and stable code for this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match &self.0 {
            ShopError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            ShopError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ShopError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ShopError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ShopError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ShopError::PaymentDeclined { .. } => (StatusCode::PAYMENT_REQUIRED, "payment_declined"),
            ShopError::PaymentTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "payment_timeout"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut response =
            (status, Json(ErrorBody { error: code.to_owned(), message: self.0.to_string() })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The caller, from `Authorization: Bearer <api_token>`.
struct Caller(User);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shop: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        Ok(Caller(shop.authenticate(token)?))
    }
}

/// Client IP and user agent, from the proxy header or the socket.
struct Ctx(RequestContext);

impl FromRequestParts<AppState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let forwarded = header("x-forwarded-for").and_then(|v| v.split(',').next()).map(|v| v.trim().to_owned());
        let peer = || parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
        Ok(Ctx(RequestContext {
            ip: forwarded.or_else(peer).unwrap_or_else(|| "unknown".into()),
            user_agent: header(header::USER_AGENT.as_str()).unwrap_or_default().to_owned(),
        }))
    }
}

/// Wraps each request in a span naming the route, instance and region, and logs
/// failures once, at the edge.
async fn request_span(State(shop): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let config = shop.config();
    let (instance, region) = (&config.instance, &config.region);
    let span = info_span!("request", method = %request.method(), %route, %instance, %region, status = Empty);
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    span.record("status", status);
    if response.status().is_server_error() {
        error!(parent: &span, status, elapsed_ms, "request failed");
    } else if response.status().is_client_error() {
        info!(parent: &span, status, elapsed_ms, "request refused");
    }
    response
}

async fn health(State(shop): State<AppState>) -> Json<serde_json::Value> {
    let stats = shop.store().stats();
    let config = shop.config();
    Json(json!({
        "status": "ok",
        "instance": config.instance,
        "region": config.region,
        "users": stats.users,
        "carts": stats.carts,
        "orders": stats.orders,
    }))
}

#[instrument(skip_all)]
async fn get_products(State(shop): State<AppState>, Query(query): Query<CatalogQuery>) -> Json<CatalogPage> {
    Json(shop.catalog(&query))
}

#[instrument(skip(shop))]
async fn get_product(State(shop): State<AppState>, Path(id): Path<u64>) -> ApiResult<Product> {
    Ok(Json(shop.product(id)?))
}

#[instrument(skip_all, fields(ip = %ctx.ip, user_agent = %ctx.user_agent))]
async fn post_users(
    State(shop): State<AppState>,
    Ctx(ctx): Ctx,
    Json(req): Json<SignupRequest>,
) -> Result<(StatusCode, Json<SessionResponse>), ApiError> {
    Ok((StatusCode::CREATED, Json(shop.signup(req, &ctx)?)))
}

#[instrument(skip_all)]
async fn post_sessions(State(shop): State<AppState>, Json(req): Json<LoginRequest>) -> ApiResult<SessionResponse> {
    Ok(Json(shop.login(req)?))
}

#[instrument(skip_all, fields(user_id = caller.id))]
async fn get_user(State(shop): State<AppState>, Caller(caller): Caller, Path(id): Path<u64>) -> ApiResult<UserView> {
    Ok(Json(shop.user_view(&caller, id)?))
}

#[instrument(skip_all, fields(user_id = caller.id))]
async fn post_carts(State(shop): State<AppState>, Caller(caller): Caller) -> (StatusCode, Json<Cart>) {
    (StatusCode::CREATED, Json(shop.create_cart(&caller)))
}

#[instrument(skip_all, fields(user_id = caller.id, cart_id = cart_id))]
async fn get_cart(State(shop): State<AppState>, Caller(caller): Caller, Path(cart_id): Path<u64>) -> ApiResult<Cart> {
    Ok(Json(shop.cart(&caller, cart_id)?))
}

#[instrument(skip_all, fields(user_id = caller.id, cart_id = cart_id))]
async fn post_cart_items(
    State(shop): State<AppState>,
    Caller(caller): Caller,
    Path(cart_id): Path<u64>,
    Json(item): Json<CartItem>,
) -> ApiResult<Cart> {
    Ok(Json(shop.add_item(&caller, cart_id, item)?))
}

#[instrument(skip_all, fields(user_id = caller.id, cart_id = cart_id, product_id = product_id))]
async fn delete_cart_item(
    State(shop): State<AppState>,
    Caller(caller): Caller,
    Path((cart_id, product_id)): Path<(u64, u64)>,
) -> ApiResult<Cart> {
    Ok(Json(shop.remove_item(&caller, cart_id, product_id)?))
}

#[instrument(skip_all, fields(user_id = caller.id, cart_id = cart_id, discount_code = req.discount_code.as_deref()))]
async fn post_checkout(
    State(shop): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    Path(cart_id): Path<u64>,
    Json(req): Json<CheckoutRequest>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    Ok((StatusCode::CREATED, Json(shop.checkout(&caller, cart_id, req, &ctx)?)))
}

#[instrument(skip_all, fields(user_id = caller.id, lines = req.lines.len()))]
async fn post_bulk_order(
    State(shop): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    Json(req): Json<BulkOrderRequest>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    Ok((StatusCode::CREATED, Json(shop.bulk_order(&caller, req, &ctx)?)))
}

#[instrument(skip_all, fields(user_id = caller.id, order_id = order_id))]
async fn get_order(
    State(shop): State<AppState>,
    Caller(caller): Caller,
    Path(order_id): Path<u64>,
) -> ApiResult<Order> {
    Ok(Json(shop.order(&caller, order_id)?))
}

#[instrument(skip_all, fields(user_id = caller.id, order_id = order_id))]
async fn post_pay(
    State(shop): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    Path(order_id): Path<u64>,
    Json(req): Json<PayRequest>,
) -> ApiResult<PaymentReceipt> {
    Ok(Json(shop.pay(&caller, order_id, req, &ctx).await?))
}
