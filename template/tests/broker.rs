//! {{project-name}} against a real RabbitMQ: the BFF joins the broker, a
//! stand-in for `{{sample_service}}` answers there, and a WebSocket client
//! calls it through the BFF. Needs a broker, so it is ignored by a plain
//! `cargo test`; CI runs it beside a RabbitMQ service:
//!
//!     BFF_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo test --test broker -- --ignored

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nuropb_bff::testing::TestClient;
use nuropb_bff::{AmqpConfig, AmqpMesh, EchoService, Gateway, Settings};
use serde_json::json;

use {{crate_name}}::{auth, handler};

mod support;

fn amqp_url() -> String {
    std::env::var("BFF_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: BFF_TEST_AMQP_URL=... cargo test --test broker -- --ignored"]
async fn a_request_through_the_broker() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let routes = dir.join("routes.toml").display().to_string();
    let suffix = format!("{:x}", std::process::id());
    let mut env = vec![
        ("BFF_ROUTES".to_owned(), routes),
        ("BFF_AMQP_URL".to_owned(), amqp_url()),
        ("BFF_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        (
            "BFF_MESH_SERVICE_NAME".to_owned(),
            format!("{{mesh_service_name}}-test-{suffix}"),
        ),
    ];
    env.extend(support::auth_env());
    let token = support::token("alice");
    let config = dir.join("config/default.toml");
    let (settings, _) = Settings::load(&config, env).expect("config/default.toml loads");

    // A stand-in for the first routed service, answering on the broker.
    let service = AmqpMesh::connect(
        AmqpConfig::new(amqp_url(), "{{sample_service}}"),
        Arc::new(EchoService::new("{{sample_service}}")),
    )
    .await
    .expect("RabbitMQ is reachable at BFF_TEST_AMQP_URL");

    let auth = auth::hook(&settings).expect("auth hook");
    let gateway = Gateway::builder(settings)
        .auth(auth)
        .handler(Arc::new(handler::Handler))
        .start()
        .await
        .expect("the BFF joins the broker");
    // Ready: the broker link is up and the auth hook can verify.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gateway.is_ready() {
        assert!(std::time::Instant::now() < deadline, "not ready in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let serving = gateway.spawn().await.expect("the BFF serves");

    let mut client = TestClient::connect(&serving.ws_url(), token.as_deref())
        .await
        .expect("handshake");
    let hello = client.recv().await.expect("hello");
    assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
    let response = client
        .request("{{sample_service}}", "{{sample_method}}", json!({"x": 1}))
        .await
        .expect("response");
    assert_eq!(response["error"], serde_json::Value::Null, "{response}");
    assert_eq!(response["result"]["params"], json!({"x": 1}), "{response}");

    serving.stop().await.expect("a clean stop");
    service.close(Duration::from_secs(2)).await;
}
