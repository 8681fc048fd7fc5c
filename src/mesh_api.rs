//! The BFF on the mesh: the methods other services call on it
//! (`send_to_users`, `broadcast`, `disconnect_users`, `stats`,
//! `nuropb_describe`), and the fan-out of mesh events to sessions by the
//! routing file's event rules.

use axum::extract::ws::Utf8Bytes;
use serde_json::{Map, Value, json};

use crate::hub::Hub;
use crate::mesh::{BoxFuture, IncomingEvent, IncomingRequest, MeshHandler, unknown_method};
use crate::protocol::{ErrorBody, ServerFrame, close};
use crate::routing::Delivery;

/// The handler the mesh calls for requests and events addressed to the BFF.
#[derive(Debug)]
pub(crate) struct BffService {
    hub: Hub,
}

impl BffService {
    pub(crate) fn new(hub: Hub) -> Self {
        Self { hub }
    }
}

/// One of the BFF's methods, as `nuropb_describe` tells it.
struct MethodDoc {
    name: &'static str,
    description: &'static str,
    /// Parameter name, nuropb type name, default (`None`: required).
    params: &'static [(&'static str, &'static str, Option<&'static str>)],
}

const METHODS: &[MethodDoc] = &[
    MethodDoc {
        name: "send_to_users",
        description: "Push a message to every connection of these users",
        params: &[
            ("user_ids", "list", None),
            ("message", "", None),
            ("topic", "str", Some("message")),
        ],
    },
    MethodDoc {
        name: "broadcast",
        description: "Push a message to every connection",
        params: &[("message", "", None), ("topic", "str", Some("message"))],
    },
    MethodDoc {
        name: "disconnect_users",
        description: "Close every connection of these users",
        params: &[("user_ids", "list", None)],
    },
    MethodDoc {
        name: "stats",
        description: "Connection counts of this instance",
        params: &[],
    },
];

fn event_frame(topic: &str, event: Value) -> Utf8Bytes {
    ServerFrame::Event {
        topic: topic.to_owned(),
        event,
    }
    .to_json()
    .into()
}

fn invalid(message: String) -> ErrorBody {
    ErrorBody::new("NuropbValidationError", message)
}

fn string_list(params: &Map<String, Value>, key: &str) -> Result<Vec<String>, ErrorBody> {
    let bad = || invalid(format!("`{key}` must be a list of strings"));
    match params.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

fn push_parts(params: &Map<String, Value>) -> Result<(String, Value), ErrorBody> {
    let message = params
        .get("message")
        .cloned()
        .ok_or_else(|| invalid("`message` is required".into()))?;
    let topic = match params.get("topic") {
        None | Some(Value::Null) => "message".to_owned(),
        Some(Value::String(t)) => t.clone(),
        Some(_) => return Err(invalid("`topic` must be a string".into())),
    };
    Ok((topic, message))
}

impl BffService {
    fn describe(&self) -> Value {
        let methods: Map<String, Value> = METHODS
            .iter()
            .map(|m| {
                let properties: Map<String, Value> = m
                    .params
                    .iter()
                    .map(|(name, kind, default)| {
                        let p = json!({"type": kind, "description": "", "default": default.unwrap_or("")});
                        ((*name).to_owned(), p)
                    })
                    .collect();
                let required: Vec<&str> = m
                    .params
                    .iter()
                    .filter(|(_, _, default)| default.is_none())
                    .map(|(name, _, _)| *name)
                    .collect();
                let doc = json!({
                    "description": m.description,
                    "requires_encryption": false,
                    "parameters": {"type": "object", "properties": properties, "required": required},
                });
                (m.name.to_owned(), doc)
            })
            .collect();
        json!({
            "service_name": self.hub.service_name(),
            "service_version": env!("CARGO_PKG_VERSION"),
            "description": "WebSocket Backend-For-Frontend gateway (nuropb-bff)",
            "encrypted_methods": false,
            "warnings": [],
            "methods": methods,
        })
    }

    fn call(&self, request: &IncomingRequest) -> Result<Value, ErrorBody> {
        let p = &request.params;
        let sessions = self.hub.sessions();
        let metrics = self.hub.metrics();
        match request.method.as_str() {
            "nuropb_describe" => Ok(self.describe()),
            "send_to_users" => {
                let users = string_list(p, "user_ids")?;
                let (topic, message) = push_parts(p)?;
                let n = sessions.send_to_users(&users, event_frame(&topic, message));
                metrics.pushed("send_to_users", n);
                Ok(json!({"delivered": n}))
            }
            "broadcast" => {
                let (topic, message) = push_parts(p)?;
                let n = sessions.broadcast(event_frame(&topic, message));
                metrics.pushed("broadcast", n);
                Ok(json!({"delivered": n}))
            }
            "disconnect_users" => {
                let users = string_list(p, "user_ids")?;
                let n =
                    sessions.close_users(&users, close::DISCONNECTED, "disconnected by the server");
                Ok(json!({"disconnected": n}))
            }
            "stats" => {
                let c = sessions.counts();
                Ok(json!({"sessions": c.sessions, "users": c.users}))
            }
            other => Err(unknown_method(self.hub.service_name(), other)),
        }
    }

    /// Push a mesh event to the sessions its rule names.
    fn fan_out(&self, event: IncomingEvent) {
        let hub = &self.hub;
        let Some(rule) = hub.routes().event_rule(&event.topic) else {
            tracing::debug!(topic = %event.topic, "mesh event matches no event rule, dropped");
            return;
        };
        let Some(payload) = hub.handler().on_event(&event.topic, event.event) else {
            return;
        };
        let frame = event_frame(&event.topic, payload);
        let sessions = hub.sessions();
        // An event that names its audience reaches only that audience,
        // whatever the rule's mode: rules narrow, never widen.
        let target = event.target.as_deref().filter(|t| !t.is_empty());
        let topic = event.topic.as_str();
        let n = match rule.delivery {
            Delivery::All => sessions.deliver_event(topic, target, false, &rule.roles, frame),
            Delivery::Target => match target {
                Some(_) => sessions.deliver_event(topic, target, false, &rule.roles, frame),
                None => 0,
            },
            Delivery::Subscribers => {
                sessions.deliver_event(topic, target, true, &rule.roles, frame)
            }
        };
        hub.metrics().pushed("event", n);
        tracing::debug!(topic = %event.topic, delivery = %rule.delivery, sessions = n, "mesh event pushed");
    }
}

impl MeshHandler for BffService {
    fn handle_request(&self, request: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        let result = self.call(&request);
        Box::pin(async move { result })
    }

    fn handle_event(&self, event: IncomingEvent) -> BoxFuture<'_, ()> {
        self.fan_out(event);
        Box::pin(async {})
    }
}
