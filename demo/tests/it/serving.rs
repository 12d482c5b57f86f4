//! The shop answers its API over a real socket and stops when told to.

use std::time::Duration;

use periscope_demo::model::{Order, OrderStatus, PaymentMethod};
use periscope_demo::wire::{CheckoutRequest, ErrorBody, PayRequest};
use periscope_demo::{LoadConfig, ShopConfig, generate_load};
use reqwest::StatusCode;

use crate::support::{Shopper, TestShop, quiet_config};

#[tokio::test]
async fn health_names_the_instance_and_region() {
    let shop = TestShop::start(quiet_config("shop-eu-1")).await;
    let health: serde_json::Value = reqwest::get(format!("{}/health", shop.url)).await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["instance"], "shop-eu-1");
    assert_eq!(health["region"], "test-region");
    shop.stop().await.unwrap();
}

#[tokio::test]
async fn a_purchase_goes_from_sign_up_to_a_paid_order() {
    let shop = TestShop::start(quiet_config("shop-1")).await;
    let shopper = Shopper::sign_up(&shop.url, 11).await;
    let order =
        shopper.checkout(CheckoutRequest { discount_code: Some("WELCOME10".into()), ..Default::default() }).await;
    assert_eq!(order.customer.user_id, shopper.user_id);
    assert_eq!(order.discount.as_ref().map(|d| d.code.as_str()), Some("WELCOME10"));
    assert_eq!(
        order.total_cents,
        order.subtotal_cents - order.discount.as_ref().unwrap().amount_cents + order.tax_cents + order.shipping_cents
    );
    assert_eq!(order.status, OrderStatus::PendingPayment);

    assert_eq!(shopper.pay_by_card(order.id, "4111 1111 1111 1111").await, StatusCode::OK);
    let paid: Order = shopper.get(&format!("/orders/{}", order.id)).send().await.unwrap().json().await.unwrap();
    assert!(matches!(paid.status, OrderStatus::Paid { .. }), "{:?}", paid.status);
    assert_eq!(shopper.pay_by_card(order.id, "4111111111111111").await, StatusCode::CONFLICT, "no double charge");
    shop.stop().await.unwrap();
}

#[tokio::test]
async fn sepa_debits_need_a_valid_iban() {
    let shop = TestShop::start(quiet_config("shop-1")).await;
    let shopper = Shopper::sign_up(&shop.url, 12).await;
    let order = shopper.checkout(CheckoutRequest::default()).await;
    let pay = |iban: &str| PayRequest {
        method: PaymentMethod::Sepa { account_holder: shopper.person.name.clone(), iban: iban.into() },
        billing_address: shopper.person.address.clone(),
    };
    let bad = shopper
        .post(&format!("/orders/{}/pay", order.id))
        .json(&pay("DE89 3704 0044 0532 0130 01"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let good = shopper
        .post(&format!("/orders/{}/pay", order.id))
        .json(&pay("DE89 3704 0044 0532 0130 00"))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), StatusCode::OK);
    shop.stop().await.unwrap();
}

#[tokio::test]
async fn failures_come_back_as_a_status_and_a_stable_code() {
    let shop = TestShop::start(quiet_config("shop-1")).await;
    let http = reqwest::Client::new();

    let unauthorized = http.post(format!("{}/carts", shop.url)).send().await.unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(unauthorized.headers()["www-authenticate"], "Bearer");
    assert_eq!(unauthorized.json::<ErrorBody>().await.unwrap().error, "unauthorized");

    let missing = http.get(format!("{}/products/999999", shop.url)).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let shopper = Shopper::sign_up(&shop.url, 13).await;
    let other = Shopper::sign_up(&shop.url, 14).await;
    let order = shopper.checkout(CheckoutRequest::default()).await;
    let forbidden = other.get(&format!("/orders/{}", order.id)).send().await.unwrap();
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);

    assert_eq!(shopper.pay_by_card(order.id, "4000 0000 0000 0002").await, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(shopper.pay_by_card(order.id, "4111 1111 1111 1112").await, StatusCode::UNPROCESSABLE_ENTITY);

    // An expired discount code refuses the checkout.
    let cart: periscope_demo::model::Cart = shopper.post("/carts").send().await.unwrap().json().await.unwrap();
    let product = shopper.stocked_products().await.remove(0);
    shopper
        .post(&format!("/carts/{}/items", cart.id))
        .json(&periscope_demo::model::CartItem { product_id: product.id, qty: 1 })
        .send()
        .await
        .unwrap();
    let refused = shopper
        .post(&format!("/carts/{}/checkout", cart.id))
        .json(&CheckoutRequest { discount_code: Some("SUMMER2019".into()), ..Default::default() })
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.json::<ErrorBody>().await.unwrap().message.contains("expired"));
    shop.stop().await.unwrap();
}

#[tokio::test]
async fn a_payment_stuck_at_the_processor_times_out_with_504() {
    let config =
        ShopConfig { slow_payment_rate: 1.0, payment_timeout: Duration::from_millis(50), ..quiet_config("shop-1") };
    let shop = TestShop::start(config).await;
    let shopper = Shopper::sign_up(&shop.url, 15).await;
    let order = shopper.checkout(CheckoutRequest::default()).await;
    assert_eq!(shopper.pay_by_card(order.id, "5555 5555 5555 4444").await, StatusCode::GATEWAY_TIMEOUT);
    let failed: Order = shopper.get(&format!("/orders/{}", order.id)).send().await.unwrap().json().await.unwrap();
    assert_eq!(failed.status, OrderStatus::PaymentFailed { reason: "processor_timeout".into() });
    shop.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_payment_stuck_for_an_hour() {
    let config = ShopConfig {
        slow_payment_rate: 1.0,
        payment_timeout: Duration::from_secs(3_600),
        shutdown_grace: Duration::from_millis(100),
        ..quiet_config("shop-1")
    };
    let shop = TestShop::start(config).await;
    let shopper = Shopper::sign_up(&shop.url, 16).await;
    let order = shopper.checkout(CheckoutRequest::default()).await;
    let stuck = tokio::spawn(async move { shopper.pay_by_card(order.id, "4111111111111111").await });
    // Give the payment a moment to reach the processor; the test holds either way.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // `stop` fails the test if serve has not returned long before the hour is up.
    shop.stop().await.unwrap();
    stuck.abort();
}

#[tokio::test]
async fn the_load_generator_stops_at_shutdown_even_between_slow_ticks() {
    let shop = TestShop::start(quiet_config("shop-1")).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // One request every 100 seconds: without a prompt shutdown this would hang.
    let config = LoadConfig { requests_per_second: 0.01, ..LoadConfig::new(0.01, 3) };
    let load = tokio::spawn(generate_load(shop.url.clone(), config, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(60), load).await.expect("load stops promptly").unwrap();
    assert!(stats.requests <= 1, "{stats:?}");
    shop.stop().await.unwrap();
}
