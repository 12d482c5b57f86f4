//! A shop on a loopback port, and a client that walks it through a purchase.

use std::time::Duration;

use periscope_demo::fake::{self, Faker};
use periscope_demo::model::{Card, Cart, CartItem, Order, PaymentMethod, Product};
use periscope_demo::wire::{
    BulkOrderRequest, CatalogPage, CheckoutRequest, PayRequest, SessionResponse, SignupRequest,
};
use periscope_demo::{ShopConfig, serve};
use reqwest::StatusCode;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A shop whose random failures are off, so tests decide which failures happen.
pub fn quiet_config(instance: &str) -> ShopConfig {
    ShopConfig {
        decline_rate: 0.0,
        slow_payment_rate: 0.0,
        processor_latency: Duration::from_millis(1),
        ..ShopConfig::new(instance, "test-region", 7)
    }
}

/// A running shop; stop it with [`TestShop::stop`].
pub struct TestShop {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::io::Result<()>>,
}

impl TestShop {
    pub async fn start(config: ShopConfig) -> TestShop {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, config, async {
            let _ = stopped.await;
        }));
        TestShop { url, stop: Some(stop), handle }
    }

    /// Asks the shop to stop and waits for `serve` to return (a hang fails the test).
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("serve returns after shutdown")
            .expect("the serve task does not panic")
    }
}

/// A signed-up shopper with a client.
pub struct Shopper {
    pub http: reqwest::Client,
    pub url: String,
    pub user_id: u64,
    pub token: String,
    pub person: fake::Person,
}

impl Shopper {
    pub async fn sign_up(url: &str, seed: u64) -> Shopper {
        let http = reqwest::Client::new();
        let person = Faker::new(seed).person();
        let req = SignupRequest {
            name: person.name.clone(),
            email: person.email.clone(),
            phone: person.phone.clone(),
            date_of_birth: person.date_of_birth.clone(),
            address: person.address.clone(),
            password: person.password.clone(),
            ssn: person.ssn.clone(),
        };
        let response = http
            .post(format!("{url}/users"))
            .header("user-agent", "it-test/1.0")
            .header("x-forwarded-for", "203.0.113.9")
            .json(&req)
            .send()
            .await
            .expect("sign-up answers");
        assert_eq!(response.status(), StatusCode::CREATED);
        let session: SessionResponse = response.json().await.expect("a session");
        Shopper { http, url: url.to_owned(), user_id: session.user_id, token: session.api_token, person }
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url)).bearer_auth(&self.token)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.url)).bearer_auth(&self.token)
    }

    /// Products that are in stock.
    pub async fn stocked_products(&self) -> Vec<Product> {
        let page: CatalogPage = self
            .http
            .get(format!("{}/products?limit=100", self.url))
            .send()
            .await
            .expect("catalog answers")
            .json()
            .await
            .expect("a catalog page");
        page.products.into_iter().filter(|p| p.stock >= 100).collect()
    }

    /// Fills a cart with two products and checks out.
    pub async fn checkout(&self, req: CheckoutRequest) -> Order {
        let products = self.stocked_products().await;
        let cart: Cart = self.post("/carts").send().await.unwrap().json().await.unwrap();
        for product in products.iter().take(2) {
            let item = CartItem { product_id: product.id, qty: 2 };
            let response = self.post(&format!("/carts/{}/items", cart.id)).json(&item).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        let response = self.post(&format!("/carts/{}/checkout", cart.id)).json(&req).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.expect("an order")
    }

    /// Places a bulk order of `lines` lines.
    pub async fn bulk_order(&self, lines: usize) -> Order {
        let products = self.stocked_products().await;
        let lines = (0..lines).map(|i| CartItem { product_id: products[i % products.len()].id, qty: 1 }).collect();
        let req = BulkOrderRequest { lines, po_reference: Some("PO-TEST-1".into()) };
        let response = self.post("/orders/bulk").json(&req).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.expect("an order")
    }

    /// Pays for an order with a card number; returns the status.
    pub async fn pay_by_card(&self, order_id: u64, card_number: &str) -> StatusCode {
        let card = Card {
            holder: self.person.name.clone(),
            card_number: card_number.to_owned(),
            expiry_month: 11,
            expiry_year: fake::current_year() + 3,
            cvv: "123".into(),
        };
        let req = PayRequest { method: PaymentMethod::Card(card), billing_address: self.person.address.clone() };
        self.post(&format!("/orders/{order_id}/pay")).json(&req).send().await.unwrap().status()
    }
}
