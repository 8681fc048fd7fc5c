//! Tests of {{project-name}}. They run on the in-process mesh (echo stubs
//! for every routed service): no broker needed, so they run in any CI.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nuropb_bff::Settings;
use nuropb_bff::testing::{TestBff, TestClient};
use serde_json::json;

use {{crate_name}}::{auth, handler};

mod support;
use support::token;

fn crate_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn settings() -> Settings {
    let routes = crate_path("routes.toml").display().to_string();
    let mut env = vec![("BFF_ROUTES".to_owned(), routes)];
    env.extend(support::auth_env());
    let (settings, warnings) =
        Settings::load(&crate_path("config/default.toml"), env).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    settings
}

async fn start() -> TestBff {
    let settings = settings();
    let auth = auth::hook(&settings).expect("auth hook");
    TestBff::start(settings, auth, Arc::new(handler::Handler))
        .await
        .expect("gateway starts")
}

async fn connect(bff: &TestBff, sub: &str) -> (TestClient, serde_json::Value) {
    let mut client = bff.connect(token(sub).as_deref()).await.expect("handshake");
    let hello = client.recv().await.expect("hello");
    assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
    (client, hello)
}

/// The routing file and the settings, checked by the runtime as at
/// start-up: a failure here is the message the BFF would stop with.
#[test]
fn the_routing_table_is_valid() {
    let routes = nuropb_bff::load_routes(&settings()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!routes.routes().is_empty());
}

#[test]
fn the_settings_load() {
    let s = settings();
    assert_eq!(s.mesh_service_name, "{{mesh_service_name}}");
    assert_eq!(s.ws_path, "{{ws_path}}");
}

#[tokio::test]
async fn auth_accepts_a_valid_token_and_refuses_others() {
    let bff = start().await;
    let (_client, hello) = connect(&bff, "alice").await;
{%- if auth == "none" %}
    assert!(
        hello["payload"]["event"]["user_id"]
            .as_str()
            .is_some_and(|u| u.starts_with("anonymous-")),
        "{hello}"
    );
{%- else %}
    assert_eq!(hello["payload"]["event"]["user_id"], "alice", "{hello}");
    let refused = bff
        .connect(support::forged_token("mallory").as_deref())
        .await;
    let err = refused.expect_err("a forged token must be refused");
    assert!(err.contains("401"), "{err}");
{%- endif %}
}

#[tokio::test]
async fn a_request_round_trip() {
    let bff = start().await;
    let (mut client, hello) = connect(&bff, "alice").await;
    let response = client
        .request("{{sample_service}}", "{{sample_method}}", json!({"x": 1}))
        .await
        .expect("response");
    assert_eq!(response["error"], serde_json::Value::Null, "{response}");
    assert_eq!(response["result"]["service"], "{{sample_service}}");
    assert_eq!(response["result"]["params"], json!({"x": 1}));
    assert_eq!(
        response["result"]["user_id"],
        hello["payload"]["event"]["user_id"]
    );
}

#[tokio::test]
async fn a_call_outside_the_routing_table_is_refused() {
    let bff = start().await;
    let (mut client, _) = connect(&bff, "alice").await;
    let response = client
        .request("not_routed_service", "anything", json!({}))
        .await
        .expect("response");
    assert_eq!(response["error"]["error"], "RouteNotFound", "{response}");
}

#[tokio::test]
async fn the_local_route_answers_whoami() {
    let bff = start().await;
    let (mut client, hello) = connect(&bff, "alice").await;
    let response = client
        .request("bff", "whoami", json!({}))
        .await
        .expect("response");
    assert_eq!(
        response["result"]["user_id"],
        hello["payload"]["event"]["user_id"]
    );
}
{%- if compose != "" %}

#[tokio::test]
async fn the_composed_route_gathers_its_parts() {
    let bff = start().await;
    let (mut client, _) = connect(&bff, "alice").await;
    let (service, method) = ("{{sample_compose_service}}", "{{sample_compose_method}}");
    let response = client
        .request(service, method, json!({}))
        .await
        .expect("response");
    assert_eq!(response["error"], serde_json::Value::Null, "{response}");
    assert!(response.get("failed").is_none(), "{response}");
    let parts = response["result"]
        .as_object()
        .expect("an object of results");
    assert_eq!(parts.len(), {{sample_compose_parts}}, "{response}");
}
{%- endif %}
