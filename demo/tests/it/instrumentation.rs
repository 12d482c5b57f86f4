//! The shop emits the spans and events Periscope is demonstrated on.
//!
//! A tiny recording `Layer` stands in for the agent: it keeps every span's name and
//! fields and every event's fields with the names of the spans around it. The tests
//! run on a current-thread runtime so that the thread-local default subscriber sees
//! the server's tasks too; [`keep_callsites_open`] keeps sibling tests, which run the
//! shop on other threads without a subscriber, from switching those callsites off.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use periscope_agent::debug_parse::parse_debug;
use periscope_demo::wire::CheckoutRequest;
use periscope_protocol::{CaptureLimits, Value};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::{DefaultGuard, Interest};
use tracing::{Dispatch, Event, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::support::{Shopper, TestShop, quiet_config};

#[derive(Debug, Clone, Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

#[derive(Debug, Clone)]
struct SpanRecord {
    name: String,
    fields: Fields,
}

#[derive(Debug, Clone)]
struct EventRecord {
    file: Option<String>,
    line: Option<u32>,
    fields: Fields,
    /// Enclosing span names, innermost first.
    scope: Vec<String>,
}

impl EventRecord {
    fn message(&self) -> &str {
        self.fields.0.get("message").map_or("", String::as_str)
    }
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.0.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct Recorded {
    spans: BTreeMap<u64, SpanRecord>,
    events: Vec<EventRecord>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Recorded>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let record = SpanRecord { name: attrs.metadata().name().to_owned(), fields };
        self.0.lock().unwrap().spans.insert(id.into_u64(), record);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().spans.get_mut(&id.into_u64()) {
            values.record(&mut span.fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let scope = ctx.event_scope(event).map(|s| s.map(|span| span.name().to_owned()).collect()).unwrap_or_default();
        let meta = event.metadata();
        let record = EventRecord { file: meta.file().map(str::to_owned), line: meta.line(), fields, scope };
        self.0.lock().unwrap().events.push(record);
    }
}

impl Recorder {
    fn spans_named(&self, name: &str) -> Vec<SpanRecord> {
        self.0.lock().unwrap().spans.values().filter(|s| s.name == name).cloned().collect()
    }
    fn events_saying(&self, message: &str) -> Vec<EventRecord> {
        self.0.lock().unwrap().events.iter().filter(|e| e.message() == message).cloned().collect()
    }
}

/// The recorded code's spans and events, with the recorder as this thread's default
/// until the guard drops.
fn record_this_thread() -> (Recorder, DefaultGuard) {
    keep_callsites_open();
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let guard = tracing::subscriber::set_default(subscriber);
    (recorder, guard)
}

/// Keeps tracing from caching "never" for callsites another thread reaches first.
///
/// tracing caches each callsite's interest for the whole process when the callsite is
/// first reached. While exactly one dispatcher is registered in the process, which is
/// the case whenever one recorder is alive, tracing-core 0.1 computes that interest
/// from the default dispatcher of *the thread that reaches the callsite first*
/// (tokio-rs/tracing#3611). When that is a sibling test's thread (the `serving` and
/// `load` tests run the shop with no subscriber), `Interest::never` is cached and the
/// recorder never sees those spans or events: `pay` went missing from an event's
/// scope, or a `payment declined` event was never recorded.
///
/// A second dispatcher that lives as long as the process rules that out: with two,
/// tracing always combines every live dispatcher's answer, and this one answers
/// "sometimes" for every callsite, so the combination is never "never" and each span
/// or event asks the dispatcher current on its own thread. It is created before the
/// first recorder, while tracing's maximum level is still `OFF`, and its own level hint
/// is `OFF`: no callsite registers until a recorder raises the level, and by then two
/// dispatchers exist. It records nothing and enables nothing.
fn keep_callsites_open() {
    static OPEN: OnceLock<Dispatch> = OnceLock::new();
    OPEN.get_or_init(|| Dispatch::new(AskEachTime));
}

/// A subscriber that wants nothing but never lets a callsite be cached as "never".
struct AskEachTime;

impl Subscriber for AskEachTime {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::OFF)
    }
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Never called: `enabled` is false for everything.
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn roomy() -> CaptureLimits {
    CaptureLimits { max_depth: 8, max_items: 1_000, max_string_len: 8_192, max_fields: 200, ..CaptureLimits::default() }
}

/// Runs `scenario` against a fresh shop with a recorder installed for this thread.
async fn recorded<F, Fut>(scenario: F) -> Recorder
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let (recorder, _guard) = record_this_thread();
    let shop = TestShop::start(quiet_config("shop-eu-1")).await;
    scenario(shop.url.clone()).await;
    shop.stop().await.unwrap();
    recorder
}

#[tokio::test]
async fn checkout_runs_in_a_span_with_the_user_cart_and_order_ids() {
    let recorder = recorded(|url| async move {
        let shopper = Shopper::sign_up(&url, 21).await;
        shopper.checkout(CheckoutRequest::default()).await;
    })
    .await;
    let checkout = recorder.spans_named("checkout");
    let shop_span = checkout.iter().find(|s| s.fields.0.contains_key("amount_cents")).expect("Shop::checkout span");
    let user_id: u64 = shop_span.fields.0["user_id"].parse().unwrap();
    assert!(user_id > 0);
    assert!(shop_span.fields.0.contains_key("cart_id"));
    let order_id = &shop_span.fields.0["order_id"];

    let placed = recorder.events_saying("order placed");
    let placed = placed.iter().find(|e| e.field("order_id") == Some(order_id)).expect("an `order placed` event");
    assert!(placed.field("total_cents").is_some() && placed.field("items") == Some("2"));
    for enclosing in ["checkout", "request"] {
        assert!(placed.scope.iter().any(|s| s == enclosing), "{:?}", placed.scope);
    }
    let request = recorder.spans_named("request");
    assert!(request.iter().all(|s| s.fields.0.get("instance").map(String::as_str) == Some("shop-eu-1")));
    assert!(request.iter().any(|s| s.fields.0.get("route").map(String::as_str) == Some("/carts/{id}/checkout")));
}

#[tokio::test]
async fn the_priced_order_is_a_debug_value_nested_deeper_than_three_levels() {
    let recorder = recorded(|url| async move {
        let shopper = Shopper::sign_up(&url, 22).await;
        shopper.checkout(CheckoutRequest { discount_code: Some("WELCOME10".into()), ..Default::default() }).await;
    })
    .await;
    let priced = recorder.events_saying("priced");
    let event = priced.first().expect("a `priced` event");
    assert!(event.file.as_deref().is_some_and(|f| f.ends_with("shop.rs")) && event.line.is_some());
    assert!(event.scope.iter().any(|s| s == "checkout"), "{:?}", event.scope);
    let order = parse_debug(event.field("order").expect("an `order` field"), &roomy());
    let geo = order
        .field("customer")
        .and_then(|c| c.field("shipping_address"))
        .and_then(|a| a.field("geo"))
        .expect("Order -> Customer -> Address -> GeoPoint");
    assert_eq!(geo.type_name(), Some("GeoPoint"));
    assert!(matches!(geo.field("lat"), Some(Value::Float(_))));
    // Under the default limits, the fourth level is a depth cut.
    let cut = parse_debug(event.field("order").unwrap(), &CaptureLimits::default());
    let geo = cut.field("customer").and_then(|c| c.field("shipping_address")).and_then(|a| a.field("geo"));
    assert!(matches!(geo, Some(Value::Cut(_))), "{geo:?}");
}

#[tokio::test]
async fn bulk_orders_log_collections_longer_than_one_hundred_items() {
    let recorder = recorded(|url| async move {
        let shopper = Shopper::sign_up(&url, 23).await;
        shopper.bulk_order(130).await;
    })
    .await;
    let trail = recorder.events_saying("audit trail");
    let text = trail.first().and_then(|e| e.field("audit")).expect("an `audit` field");
    match parse_debug(text, &roomy()) {
        Value::List(list) => assert!(list.items.len() > 100, "{} entries", list.items.len()),
        other => panic!("expected a list, got {}", other.kind()),
    }
    let lines = recorder.events_saying("bulk lines priced");
    match parse_debug(lines.first().and_then(|e| e.field("lines")).unwrap(), &CaptureLimits::default()) {
        Value::List(list) => assert_eq!((list.items.len(), list.omitted), (100, 30)),
        other => panic!("expected a list, got {}", other.kind()),
    }
}

#[tokio::test]
async fn secrets_and_personal_data_appear_under_sensitive_names_and_in_free_text() {
    let recorder = recorded(|url| async move {
        let shopper = Shopper::sign_up(&url, 24).await;
        let gift = "x".repeat(300);
        let order = shopper.checkout(CheckoutRequest { gift_message: Some(gift), ..Default::default() }).await;
        shopper.pay_by_card(order.id, "4000 0000 0000 0002").await;
    })
    .await;
    let issued = recorder.events_saying("credentials issued");
    let issued = issued.first().expect("a `credentials issued` event");
    assert!(issued.field("password_hash").is_some_and(|h| h.starts_with("$demo-sip$")));
    assert!(issued.field("api_token").is_some_and(|t| t.starts_with("shp_live_")));

    let welcome = recorder.0.lock().unwrap().events.iter().find(|e| e.message().starts_with("welcome e-mail")).cloned();
    let welcome = welcome.expect("a welcome message");
    assert!(welcome.message().contains('@'), "{}", welcome.message());

    let declined = recorder.events_saying("payment declined");
    assert_eq!(declined.len(), 1, "one card payment, declined once: {declined:?}");
    let declined = &declined[0];
    assert_eq!(declined.field("reason"), Some("generic_decline"));
    let payment = parse_debug(declined.field("payment").unwrap(), &roomy());
    let card = payment.field("method").and_then(|m| m.field("0")).expect("Card(..) inside the payment");
    assert_eq!(card.field("card_number"), Some(&Value::str("4000 0000 0000 0002")));
    assert_eq!(card.field("cvv"), Some(&Value::str("123")));
    for enclosing in ["charge_card", "pay", "request"] {
        assert!(declined.scope.iter().any(|s| s == enclosing), "{enclosing} in {:?}", declined.scope);
    }

    let authorizing = recorder.events_saying("authorizing card");
    assert!(authorizing.first().and_then(|e| e.field("cvv")).is_some());

    let gift = recorder.events_saying("gift message attached");
    assert!(gift.first().and_then(|e| e.field("gift_message")).is_some_and(|m| m.chars().count() > 255));
}

/// tokio-rs/tracing#3611: a callsite that a thread without a subscriber reaches first,
/// while this test's recorder may be the only dispatcher in the process, still reaches
/// the recorder on this thread.
#[test]
fn a_callsite_another_thread_reaches_first_still_reaches_the_recorder() {
    fn probe() {
        let _span = tracing::info_span!("probe_span").entered();
        tracing::info!("probe event");
    }
    let (recorder, _guard) = record_this_thread();
    std::thread::spawn(probe).join().unwrap();
    probe();
    let events = recorder.events_saying("probe event");
    assert_eq!(events.len(), 1, "only this thread records");
    assert_eq!(events[0].scope, ["probe_span"]);
}
