//! Composed routes and the enriched `hello` (the heart of a BFF), against
//! RabbitMQ and the real nuropb Python service.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::DefaultHandler;
use serde_json::json;

fn routes(py: &str, absent: &str) -> String {
    format!(
        r#"
[[route]]
call = "{py}.*"
timeout_ms = 5000

[[route]]
call = "{py}.nap"
expose_as = "sleepy.nap"
timeout_ms = 300

[[route]]
call = "{py}.whoami"
roles = ["admin"]

[[route]]
call = "{absent}.x"

[[compose]]
name = "screen.all"
[[compose.part]]
key = "greeting"
call = "{py}.hello"
params = {{ name = "$session.user_id" }}
[[compose.part]]
key = "sum"
call = "{py}.add"
params = {{ a = "$client.a", b = 2 }}
[[compose.part]]
key = "nap"
call = "{py}.nap"
params = {{ ms = 10 }}

[[compose]]
name = "screen.partial"
[[compose.part]]
key = "ok"
call = "{py}.add"
params = {{ a = 1, b = 1 }}
[[compose.part]]
key = "broken"
call = "{py}.boom"
params = {{}}
[[compose.part]]
key = "slow"
call = "sleepy.nap"
params = {{ ms = 2000 }}
[[compose.part]]
key = "nowhere"
call = "{absent}.x"
[[compose.part]]
key = "secret"
call = "{py}.whoami"
params = {{}}

[[compose]]
name = "screen.strict"
[[compose.part]]
key = "ok"
call = "{py}.add"
params = {{ a = 1, b = 1 }}
[[compose.part]]
key = "broken"
call = "{py}.boom"
params = {{}}
required = true

[[compose]]
name = "screen.concurrent"
roles = ["user"]
[[compose.part]]
key = "a"
call = "{py}.nap"
params = {{ ms = 200 }}
[[compose.part]]
key = "b"
call = "{py}.nap"
params = {{ ms = 200 }}
[[compose.part]]
key = "c"
call = "{py}.nap"
params = {{ ms = 200 }}
"#
    )
}

async fn gateway(py: &str, hello_call: Option<String>) -> Running {
    let absent = unique("absent");
    start(
        &routes(py, &absent),
        hs256(),
        Arc::new(DefaultHandler),
        |s| s.hello_call = hello_call,
        MeshSetup::Broker,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_routes_gather_parts_concurrently_and_name_what_failed() {
    let py = unique("compose-svc");
    let gw = gateway(&py, None).await;
    let _service = start_python_service(&py);
    let (mut c, _) = connect(&gw.url(), &token("ann", &["user"], 300)).await;

    let r = c
        .request_traced("screen", "all", json!({"a": 40}), "all")
        .await
        .unwrap();
    assert_eq!(
        r["result"],
        json!({"greeting": "hello ann", "sum": 42, "nap": 10}),
        "{r}"
    );
    assert!(r["error"].is_null() && r.get("failed").is_none(), "{r}");

    let r = c
        .request_traced("screen", "partial", json!({}), "partial")
        .await
        .unwrap();
    assert_eq!(r["result"], json!({"ok": 2}), "{r}");
    let failed = &r["failed"];
    assert_eq!(failed["broken"]["error"], "NuropbException", "{r}");
    assert_eq!(failed["slow"]["error"], "Timeout", "{r}");
    assert_eq!(failed["nowhere"]["error"], "NuropbNotDeliveredError", "{r}");
    assert_eq!(failed["secret"]["error"], "Forbidden", "{r}");

    let r = c
        .request_traced("screen", "strict", json!({}), "strict")
        .await
        .unwrap();
    assert!(r["result"].is_null(), "{r}");
    assert_eq!(r["error"]["error"], "NuropbException", "{r}");
    assert!(
        r["error"]["description"]
            .as_str()
            .unwrap()
            .contains("required part `broken`"),
        "{r}"
    );

    let started = Instant::now();
    let r = c
        .request_traced("screen", "concurrent", json!({}), "conc")
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r["result"], json!({"a": 200, "b": 200, "c": 200}), "{r}");
    assert!(
        took < Duration::from_millis(500),
        "three 200 ms parts took {took:?}"
    );

    // The composed name obeys its own roles.
    let (mut guest, _) = connect(&gw.url(), &token("gus", &[], 300)).await;
    let r = guest
        .request_traced("screen", "concurrent", json!({}), "g")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "Forbidden", "{r}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_carries_the_hello_call_or_says_why_not() {
    let py = unique("hello-svc");
    let _service = start_python_service(&py);
    let cases: [(String, &str); 3] = [
        (format!("{py}.whoami"), "data"),
        (format!("{py}.boom"), "data_error"),
        ("sleepy.nap".to_owned(), "data_error"),
    ];
    for (call, key) in cases {
        let gw = gateway(&py, Some(call.clone())).await;
        let started = Instant::now();
        let mut c = TestClient::connect(&gw.url(), Some(&token("hal", &["admin"], 300)))
            .await
            .unwrap();
        let hello = c.recv().await.unwrap();
        let took = started.elapsed();
        let event = &hello["payload"]["event"];
        assert_eq!(event["user_id"], "hal", "{hello}");
        assert!(event.get(key).is_some(), "{call}: no {key} in {hello}");
        match key {
            "data" => assert_eq!(
                event["data"],
                json!({"sub": "hal", "user_id": "hal"}),
                "{hello}"
            ),
            _ => assert!(event.get("data").is_none(), "{hello}"),
        }
        if call == "sleepy.nap" {
            assert_eq!(event["data_error"]["error"], "Timeout", "{hello}");
            assert!(took < Duration::from_millis(1500), "hello took {took:?}");
        }
        // The socket stays open and serves.
        let r = c
            .request_traced(&py, "add", json!({"a": 1, "b": 2}), "x")
            .await
            .unwrap();
        assert_eq!(r["result"], 3, "{r}");
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_routes_do_not_cover_stop_the_start_naming_them() {
    let py = unique("unrouted");
    let absent = unique("absent");
    let file = std::env::temp_dir().join(format!("{py}.toml"));
    std::fs::write(&file, routes(&py, &absent)).unwrap();
    let mut settings = nuropb_bff::Settings::new("bff");
    settings.routes = file.clone();
    settings.hello_call = Some(format!("{py}.9x"));
    let err = nuropb_bff::load_routes(&settings).unwrap_err().to_string();
    assert!(err.contains("hello_call (BFF_HELLO_CALL)"), "{err}");
    assert!(err.contains(&format!("`{py}.9x` is not routed")), "{err}");
    let started = nuropb_bff::Gateway::builder(settings.clone()).start().await;
    let err = started
        .expect_err("a gateway with an unrouted hello_call does not start")
        .to_string();
    assert!(err.contains("hello_call"), "{err}");

    // A composed part outside the routes: the routing file's own error,
    // with its line.
    let text = routes(&py, &absent).replace(
        &format!("key = \"nowhere\"\ncall = \"{absent}.x\""),
        "key = \"nowhere\"\ncall = \"other.x\"",
    );
    std::fs::write(&file, text).unwrap();
    settings.hello_call = None;
    let err = nuropb_bff::load_routes(&settings).unwrap_err().to_string();
    assert!(err.contains("`other.x` is not routed"), "{err}");
    let _ = std::fs::remove_file(&file);
}
