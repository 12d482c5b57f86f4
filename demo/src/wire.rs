//! JSON bodies of the shop's HTTP API.
//!
//! One definition shared by the server and the load generator, so the two cannot drift
//! apart. Responses never echo card numbers, CVVs, IBANs, password hashes or SSNs: the
//! sensitive data lives in the service's memory and its instrumentation, which is exactly
//! where Periscope has to find and redact it.

use serde::{Deserialize, Serialize};

use crate::model::{Address, Cart, CartItem, Order, PaymentMethod, Product};

/// `POST /users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignupRequest {
    /// Full name.
    pub name: String,
    /// Must contain one `@` with text on both sides.
    pub email: String,
    /// Any written format.
    pub phone: String,
    /// `YYYY-MM-DD`.
    pub date_of_birth: String,
    /// Default shipping address.
    pub address: Address,
    /// At least 8 characters; only its hash is kept.
    pub password: String,
    /// US social security number, optional.
    #[serde(default)]
    pub ssn: Option<String>,
}

/// Answer to a sign-up or a login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionResponse {
    /// The account.
    pub user_id: u64,
    /// Bearer token for the cart, order and payment endpoints.
    pub api_token: String,
}

/// `POST /sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    /// Account e-mail.
    pub email: String,
    /// Account password.
    pub password: String,
}

/// `GET /users/{id}`: what the account holder may see of their account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserView {
    /// The account.
    pub user_id: u64,
    /// Full name.
    pub name: String,
    /// Contact address.
    pub email: String,
    /// Default shipping address.
    pub address: Address,
    /// Orders placed, newest last (at most the store's bound).
    pub order_ids: Vec<u64>,
}

/// `GET /products` query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CatalogQuery {
    /// First product to return (0-based).
    #[serde(default)]
    pub offset: Option<usize>,
    /// Products to return, at most 100.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only this category.
    #[serde(default)]
    pub category: Option<String>,
}

/// A page of the catalog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogPage {
    /// Products in id order.
    pub products: Vec<Product>,
    /// Products matching the query in all.
    pub total: usize,
}

/// `POST /carts/{id}/items`.
pub type AddItemRequest = CartItem;

/// A cart as the API returns it.
pub type CartView = Cart;

/// `POST /carts/{id}/checkout`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckoutRequest {
    /// Promotional code.
    #[serde(default)]
    pub discount_code: Option<String>,
    /// Printed on the packing slip.
    #[serde(default)]
    pub gift_message: Option<String>,
    /// Ship somewhere other than the account's address.
    #[serde(default)]
    pub shipping_address: Option<Address>,
}

/// `POST /orders/bulk`: a business customer's order, straight from a purchase list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkOrderRequest {
    /// Lines; up to 500.
    pub lines: Vec<CartItem>,
    /// Purchase-order reference.
    #[serde(default)]
    pub po_reference: Option<String>,
}

/// `POST /orders/{id}/pay`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayRequest {
    /// Card or SEPA details.
    pub method: PaymentMethod,
    /// For address verification.
    pub billing_address: Address,
}

/// Answer to a successful payment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentReceipt {
    /// The payment.
    pub payment_id: u64,
    /// The order it settled.
    pub order_id: u64,
    /// Amount charged.
    pub amount_cents: i64,
    /// `visa`, `mastercard`, `amex` or `sepa`.
    pub method: String,
    /// Last four digits of the card or account.
    pub last4: String,
}

/// An order as the API returns it.
pub type OrderView = Order;

/// Every error response: a stable code and a sentence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable code (`not_found`, `payment_declined`, ...).
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
}
