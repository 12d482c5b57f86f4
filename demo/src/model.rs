//! The shop's domain types.
//!
//! These are what the instrumentation records with `?value`, so their shape is chosen
//! for what it shows in a snapshot: an [`Order`] nests a [`Customer`], an [`Address`]
//! and a [`GeoPoint`] four levels deep (one more than the default depth limit), carries a
//! line list and an audit trail that can exceed 100 items, a gift message and user agent
//! that can exceed 255 characters, and a [`Payment`] carries the card number, CVV and
//! IBAN that redaction must catch by field name. They derive `Debug` in the standard
//! shape so the agent can parse them back into structure.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A point on the map, from geocoding an address.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeoPoint {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
}

/// A postal address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Address {
    /// Street and number.
    pub line1: String,
    /// Flat, floor, building.
    #[serde(default)]
    pub line2: Option<String>,
    /// City or town.
    pub city: String,
    /// State, county or prefecture.
    #[serde(default)]
    pub region: String,
    /// Postal code in the country's format.
    pub postcode: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
    /// Where the address is, for delivery routing.
    pub geo: GeoPoint,
}

/// A registered shopper, as the shop stores them.
#[derive(Debug, Clone)]
pub struct User {
    /// Shop-assigned id.
    pub id: u64,
    /// Full name.
    pub name: String,
    /// Login and contact address; unique.
    pub email: String,
    /// Contact phone.
    pub phone: String,
    /// `YYYY-MM-DD`, for age checks.
    pub date_of_birth: String,
    /// Default shipping address.
    pub address: Address,
    /// US social security number, collected for tax-exempt accounts.
    pub ssn: Option<String>,
    /// Where the account was created from.
    pub signup_ip: IpAddr,
    /// The browser used to sign up.
    pub user_agent: String,
    /// Salted password hash (a demo hash, not a real KDF).
    pub password_hash: String,
    /// Bearer token for the API.
    pub api_token: String,
    /// Sign-up time, Unix milliseconds.
    pub created_at_ms: u64,
}

/// An item in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// Catalog id.
    pub id: u64,
    /// Stock keeping unit.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Catalog section.
    pub category: String,
    /// Price in cents of the shop's currency.
    pub price_cents: i64,
    /// Units that can still be sold; 0 means sold out.
    pub stock: u32,
}

/// One line in a cart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartItem {
    /// What.
    pub product_id: u64,
    /// How many.
    pub qty: u32,
}

/// A shopper's cart before checkout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cart {
    /// Shop-assigned id.
    pub id: u64,
    /// Whose cart.
    pub user_id: u64,
    /// Lines in the order they were added.
    pub items: Vec<CartItem>,
}

/// Who an order ships to: a copy of the user's details at checkout time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// The account.
    pub user_id: u64,
    /// Name on the parcel.
    pub name: String,
    /// For the receipt.
    pub email: String,
    /// For the courier.
    pub phone: String,
    /// Where it goes.
    pub shipping_address: Address,
}

/// One priced line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    /// What.
    pub product_id: u64,
    /// Its SKU at order time.
    pub sku: String,
    /// Its name at order time.
    pub name: String,
    /// How many.
    pub qty: u32,
    /// Price per unit at order time.
    pub unit_price_cents: i64,
    /// `qty * unit_price_cents`.
    pub line_total_cents: i64,
}

/// A discount applied at checkout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discount {
    /// The code the shopper typed.
    pub code: String,
    /// Amount taken off the subtotal.
    pub amount_cents: i64,
}

/// Where an order is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed, not yet paid.
    PendingPayment,
    /// Paid.
    Paid {
        /// The payment that settled it.
        payment_id: u64,
    },
    /// The last payment attempt failed; the shopper may try again.
    PaymentFailed {
        /// Processor's reason code.
        reason: String,
    },
}

/// Something that happened to an order, kept for support staff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// The order was created from a cart or a bulk request.
    Created {
        /// Lines at creation.
        lines: usize,
    },
    /// A line was priced.
    LinePriced {
        /// Which product.
        product_id: u64,
        /// Line total.
        cents: i64,
    },
    /// A discount code was applied.
    DiscountApplied {
        /// The code.
        code: String,
    },
    /// A payment was attempted.
    PaymentAttempt {
        /// Result code.
        outcome: String,
    },
    /// Free text from a support agent or the shopper.
    Note {
        /// The note.
        text: String,
    },
}

/// An audit entry with its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// What happened.
    pub event: AuditEvent,
}

/// A placed order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Shop-assigned id.
    pub id: u64,
    /// Who ordered and where it ships.
    pub customer: Customer,
    /// Priced lines.
    pub lines: Vec<OrderLine>,
    /// Sum of line totals.
    pub subtotal_cents: i64,
    /// Discount applied, if any.
    pub discount: Option<Discount>,
    /// Tax on the discounted subtotal.
    pub tax_cents: i64,
    /// Shipping charge.
    pub shipping_cents: i64,
    /// What the shopper pays.
    pub total_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Printed on the packing slip.
    pub gift_message: Option<String>,
    /// Where the order is.
    pub status: OrderStatus,
    /// Everything that happened to it.
    pub audit: Vec<AuditEntry>,
    /// The browser that placed it.
    pub user_agent: String,
    /// Where it was placed from.
    pub client_ip: String,
    /// Which shop instance took it.
    pub instance: String,
    /// Placement time, Unix milliseconds.
    pub placed_at_ms: u64,
}

/// Card details as the checkout form submits them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Card {
    /// Name on the card.
    pub holder: String,
    /// Primary account number, digits (spaces allowed).
    pub card_number: String,
    /// 1-12.
    pub expiry_month: u8,
    /// Four digits.
    pub expiry_year: u16,
    /// Security code.
    pub cvv: String,
}

impl Card {
    /// The card number without spaces or dashes.
    pub fn digits(&self) -> String {
        self.card_number.chars().filter(char::is_ascii_digit).collect()
    }

    /// The network, from the number's prefix.
    pub fn brand(&self) -> &'static str {
        let digits = self.digits();
        match digits.as_bytes() {
            [b'4', ..] => "visa",
            [b'3', b'4' | b'7', ..] => "amex",
            [b'5', b'1'..=b'5', ..] | [b'2', ..] => "mastercard",
            _ => "unknown",
        }
    }

    /// The last four digits, safe to show.
    pub fn last4(&self) -> String {
        let digits = self.digits();
        let skip = digits.chars().count().saturating_sub(4);
        digits.chars().skip(skip).collect()
    }
}

/// How a shopper pays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PaymentMethod {
    /// A card charge.
    Card(Card),
    /// A SEPA direct debit.
    Sepa {
        /// Account holder.
        account_holder: String,
        /// The account, as an IBAN.
        iban: String,
    },
}

/// A payment attempt, with everything the processor needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Payment {
    /// Shop-assigned id.
    pub id: u64,
    /// The order it pays for.
    pub order_id: u64,
    /// Amount charged.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// How.
    pub method: PaymentMethod,
    /// Billing address for AVS checks.
    pub billing_address: Address,
    /// Where the request came from, for fraud scoring.
    pub client_ip: String,
}
