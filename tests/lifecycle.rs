//! The mesh sees the frontend: presence across two instances of one BFF,
//! and the lifecycle events a real nuropb 0.1.8 Python service receives
//! with an ordinary event binding. (An instance killed, not drained, is
//! proven on a generated BFF's processes: tests/template.rs.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{MeshSetup, hs256, token, unique};
use nuropb_bff::DefaultHandler;
use serde_json::{Value, json};

const KEY: &str = "a-cluster-key-of-thirty-two-bytes-or-more";

async fn instance(name: &str, id: &'static str) -> common::Running {
    let name = name.to_owned();
    common::start(
        "[[event]]\ntopic = \"news.#\"\n",
        hs256(),
        Arc::new(DefaultHandler),
        move |s| {
            s.mesh_service_name = name;
            s.instance_id = Some(id.into());
            s.cluster_key = Some(KEY.into());
            s.lifecycle_events = true;
            s.mesh_api.heartbeat = Duration::from_millis(300);
            s.mesh_api.gather = Duration::from_millis(1500);
        },
        MeshSetup::Broker,
    )
    .await
}

fn of_kind<'a>(seen: &'a [Value], name: &str, kind: &str) -> Vec<&'a Value> {
    let topic = format!("bff.{name}.{kind}");
    seen.iter()
        .filter(|e| e["topic"] == topic.as_str())
        .map(|e| &e["event"])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_see_who_is_online_and_every_coming_and_going() {
    let name = unique("lc-bff");
    let mut listener = tokio::task::block_in_place(|| {
        common::start_python_listener(&unique("lc-listener"), &["bff.#"])
    });
    let a = instance(&name, "ia").await;
    let b = instance(&name, "ib").await;
    // Two sockets of alice on A, one on B; bob nowhere.
    let (mut a1, _) = common::connect(&a.url(), &token("alice", &[], 300)).await;
    let (a2, _) = common::connect(&a.url(), &token("alice", &[], 300)).await;
    let (b1, _) = common::connect(&b.url(), &token("alice", &[], 300)).await;
    a1.send(json!({"type":"subscribe","payload":{"topics":["news.#"]}}))
        .await
        .unwrap();
    assert_eq!(a1.recv().await.unwrap()["type"], "subscribed");
    // Both instances hear each other before the question.
    tokio::time::sleep(Duration::from_millis(900)).await;

    let presence_token = token("svc-crm", &["bff:presence"], 300);
    let params = json!({"user_ids": ["alice", "bob"]});
    let asked = tokio::task::block_in_place(|| {
        common::python_client_as(
            &name,
            "presence",
            params.clone(),
            &json!({"Authorization": presence_token}),
        )
    });
    assert_eq!(
        asked["result"],
        json!({"alice": {"sessions": 3, "instances": 2}, "bob": {"sessions": 0, "instances": 0}}),
        "{asked}"
    );
    let anonymous =
        tokio::task::block_in_place(|| common::python_client(&name, "presence", params.clone()));
    assert_eq!(
        anonymous["error"], "NuropbAuthorizationError",
        "{anonymous}"
    );
    let too_many = json!({"user_ids": (0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>()});
    let refused = tokio::task::block_in_place(|| {
        common::python_client_as(
            &name,
            "presence",
            too_many,
            &json!({"Authorization": token("svc-crm", &["bff:presence"], 300)}),
        )
    });
    assert!(refused["error"].is_string(), "{refused}");

    // A client close; a token that expires; a disconnect_users.
    drop(a2);
    let (_short, _) = common::connect(&b.url(), &token("carol", &[], 2)).await;
    let kicked = tokio::task::block_in_place(|| {
        common::python_client_as(
            &name,
            "disconnect_users",
            json!({"user_ids": ["alice"]}),
            &json!({"Authorization": token("svc-orders", &["bff:push"], 300)}),
        )
    });
    assert_eq!(kicked["result"]["disconnected"], 2, "{kicked}");
    drop((a1, b1));
    let seen = tokio::task::block_in_place(|| {
        listener.until(Duration::from_secs(20), |seen| {
            of_kind(seen, &name, "disconnected").len() >= 4
        })
    });
    let connected = of_kind(seen, &name, "connected");
    assert_eq!(connected.len(), 4, "{connected:?}");
    assert_eq!(
        connected.iter().filter(|e| e["user_id"] == "alice").count(),
        3
    );
    let instances: std::collections::HashSet<&str> = connected
        .iter()
        .filter_map(|e| e["instance"].as_str())
        .collect();
    assert_eq!(instances, ["ia", "ib"].into_iter().collect());
    let subscribed = of_kind(seen, &name, "subscribed");
    assert_eq!(subscribed.len(), 1);
    assert_eq!(subscribed[0]["topics"], json!(["news.#"]));
    let why: Vec<(&str, &str)> = of_kind(seen, &name, "disconnected")
        .iter()
        .map(|e| (e["user_id"].as_str().unwrap(), e["why"].as_str().unwrap()))
        .collect();
    assert!(why.contains(&("alice", "client")), "{why:?}");
    assert!(why.contains(&("carol", "token_expired")), "{why:?}");
    assert_eq!(
        why.iter().filter(|w| **w == ("alice", "kicked")).count(),
        2,
        "{why:?}"
    );
    // No token, no claim, no address in any of them.
    for e in seen {
        let text = e.to_string();
        assert!(
            !text.contains("eyJ") && !text.contains("127.0.0.1"),
            "{text}"
        );
        let event = &e["event"];
        assert!(
            event["session_id"].is_string() && event["at"].is_u64(),
            "{e}"
        );
    }
    a.stop().await;
    b.stop().await;
}
