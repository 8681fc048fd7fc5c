//! The frontend kit: a typed TypeScript client and a console page, both
//! rendered with askama from the routing table (and, for the client, the
//! routed services' `nuropb_describe` when it could be asked). The client's
//! frame and error types are the `protocol` module's own types, written out
//! by ts-rs, so they cannot drift from what the gateway sends and accepts.

use std::collections::BTreeMap;

use askama::Template;
use serde_json::Value;
use ts_rs::TS;

use crate::protocol::{ClientCall, ClientFrame, ErrorBody, ErrorName, ServerFrame, close};
use crate::routing::{Delivery, RouteTable, is_public_method};

/// What the routed services said of themselves (`nuropb_describe`), by
/// mesh service name: where a method's parameters are known, the client
/// types them.
#[derive(Debug, Clone, Default)]
pub struct ServiceDescriptions {
    services: BTreeMap<String, Value>,
}

impl ServiceDescriptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a service's `nuropb_describe` answer.
    pub fn insert(&mut self, service: impl Into<String>, description: Value) {
        self.services.insert(service.into(), description);
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The public methods a service described, and each one's parameter type.
    fn methods(&self, service: &str) -> Vec<(String, String, bool)> {
        let Some(Value::Object(methods)) =
            self.services.get(service).and_then(|d| d.get("methods"))
        else {
            return Vec::new();
        };
        methods
            .iter()
            .filter(|(name, _)| is_public_method(name))
            .map(|(name, doc)| {
                let (ty, optional) = params_type(doc.get("parameters"));
                (name.clone(), ty, optional)
            })
            .collect()
    }

    /// Routes to a method its service, described, does not have: what
    /// `routes check --live` reports. Wildcard routes and services that
    /// gave no description are not judged.
    pub fn missing_methods(&self, routes: &RouteTable) -> Vec<String> {
        routes
            .routes()
            .iter()
            .filter(|r| self.services.contains_key(&r.service))
            .filter_map(|r| {
                let method = r.method.as_deref()?;
                self.method(&r.service, method).is_none().then(|| {
                    format!(
                        "route `{}.{method}`: the service describes no public method `{method}`",
                        r.service
                    )
                })
            })
            .collect()
    }

    fn method(&self, service: &str, method: &str) -> Option<(String, bool)> {
        self.methods(service)
            .into_iter()
            .find(|(m, _, _)| m == method)
            .map(|(_, ty, optional)| (ty, optional))
    }
}

/// A TypeScript type for a method's `parameters` (a JSON-schema-like
/// object of nuropb type names), and whether every parameter is optional.
fn params_type(parameters: Option<&Value>) -> (String, bool) {
    // nuropb 0.1.8 lists `properties` as [name, schema] pairs; a JSON
    // schema has an object.
    let props: Vec<(&str, &Value)> = match parameters.and_then(|p| p.get("properties")) {
        Some(Value::Object(o)) => o.iter().map(|(k, v)| (k.as_str(), v)).collect(),
        Some(Value::Array(pairs)) => pairs
            .iter()
            .filter_map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([Value::String(name), schema]) => Some((name.as_str(), schema)),
                _ => None,
            })
            .collect(),
        _ => return ("Record<string, unknown>".into(), true),
    };
    let required: Vec<&str> = parameters
        .and_then(|p| p.get("required"))
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut fields = Vec::new();
    for (name, p) in &props {
        let ty = match p.get("type").and_then(Value::as_str).unwrap_or("") {
            "str" | "string" => "string",
            "int" | "float" | "integer" | "number" | "Decimal" => "number",
            "bool" | "boolean" => "boolean",
            "list" | "array" | "tuple" | "set" => "unknown[]",
            "dict" | "object" => "Record<string, unknown>",
            _ => "unknown",
        };
        let optional = if required.contains(name) { "" } else { "?" };
        fields.push(format!("{}{optional}: {ty}", quote(name)));
    }
    let all_optional = props.iter().all(|(k, _)| !required.contains(k));
    (format!("{{ {} }}", fields.join("; ")), all_optional)
}

/// A JSON string literal, which is also a TypeScript one.
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Text safe inside a `/** ... */` comment.
fn comment(s: &str) -> String {
    s.replace("*/", "* /").replace(['\n', '\r'], " ")
}

struct MethodTs {
    key: String,
    doc: String,
    params: String,
    params_optional: bool,
    result: String,
}

struct Namespace {
    name: String,
    key: String,
    methods: Vec<MethodTs>,
    wildcard: bool,
}

struct RuleTs {
    topic: String,
    delivery: String,
    roles: String,
}

#[derive(Template)]
#[template(path = "client.ts", escape = "none")]
struct ClientTs<'a> {
    bff: &'a str,
    version: &'a str,
    ws_path: &'a str,
    described: bool,
    frame_types: Vec<String>,
    close_codes: Vec<(&'static str, u16)>,
    namespaces: Vec<Namespace>,
    rules: Vec<RuleTs>,
    subscribable: Vec<String>,
}

/// The frame and error types, as TypeScript declarations of the protocol
/// module's types.
pub(crate) fn frame_declarations() -> Vec<String> {
    vec![
        ClientFrame::decl(),
        ClientCall::decl(),
        crate::protocol::Topics::decl(),
        crate::protocol::Authenticate::decl(),
        ServerFrame::decl(),
        ErrorBody::decl(),
        ErrorName::decl(),
    ]
}

/// Who may make a call or receive an event, for the client's comments and
/// the console.
fn roles_doc(roles: &[String]) -> String {
    if roles.is_empty() {
        "any user".into()
    } else {
        format!("roles: {}", roles.join(" or "))
    }
}

/// Group the routes by the service name the frontend sees.
fn namespaces(routes: &RouteTable, described: &ServiceDescriptions) -> Vec<Namespace> {
    let mut by_name: BTreeMap<String, Namespace> = BTreeMap::new();
    let mut add = |service: &str, method: Option<MethodTs>, wildcard: bool| {
        let ns = by_name
            .entry(service.to_owned())
            .or_insert_with(|| Namespace {
                name: comment(service),
                key: quote(service),
                methods: Vec::new(),
                wildcard: false,
            });
        ns.wildcard |= wildcard;
        if let Some(m) = method.filter(|m| !ns.methods.iter().any(|x| x.key == m.key)) {
            ns.methods.push(m);
        }
    };
    for r in routes.routes() {
        let timeout = format!("timeout {} ms", r.timeout.as_millis());
        match (&r.method, &r.exposed_method) {
            (Some(method), exposed) => {
                let exposed = exposed.as_deref().unwrap_or(method);
                let (params, params_optional) = described
                    .method(&r.service, method)
                    .unwrap_or_else(|| ("Record<string, unknown>".into(), true));
                let doc = comment(&format!(
                    "{}.{} ({}, {timeout})",
                    r.service,
                    method,
                    roles_doc(&r.roles)
                ));
                let m = MethodTs {
                    key: quote(exposed),
                    doc,
                    params,
                    params_optional,
                    result: "unknown".into(),
                };
                add(&r.exposed_service, Some(m), false);
            }
            (None, _) => {
                // A wildcard: the described methods by name, and `call` for
                // the rest.
                for (method, params, params_optional) in described.methods(&r.service) {
                    let doc = comment(&format!(
                        "{}.{} (via {}.*; {}, {timeout})",
                        r.service,
                        method,
                        r.service,
                        roles_doc(&r.roles)
                    ));
                    let m = MethodTs {
                        key: quote(&method),
                        doc,
                        params,
                        params_optional,
                        result: "unknown".into(),
                    };
                    add(&r.exposed_service, Some(m), true);
                }
                add(&r.exposed_service, None, true);
            }
        }
    }
    for c in routes.composed_routes() {
        let parts: Vec<String> = c
            .parts
            .iter()
            .map(|p| format!("{}: {}.{}", p.key, p.service, p.method))
            .collect();
        let doc = comment(&format!(
            "composed: {} ({})",
            parts.join(", "),
            roles_doc(&c.roles)
        ));
        let m = MethodTs {
            key: quote(&c.method),
            doc,
            params: "Record<string, unknown>".into(),
            params_optional: true,
            result: "Record<string, unknown>".into(),
        };
        add(&c.service, Some(m), false);
    }
    by_name.into_values().collect()
}

/// Ask every routed service on the broker for its `nuropb_describe`
/// (concurrently, 3 s each): the descriptions that came, and a note for
/// each service that did not answer.
pub async fn describe_services(
    settings: &crate::config::Settings,
    routes: &RouteTable,
) -> Result<(ServiceDescriptions, Vec<String>), String> {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::mesh::{AmqpConfig, AmqpMesh, Call, Mesh, StubService};

    let name = format!(
        "{}-client-ts-{}",
        settings.mesh_service_name,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut config = AmqpConfig::new(settings.amqp_url.as_str(), name.clone());
    config.transient = true;
    let mesh = AmqpMesh::connect(config, Arc::new(StubService::new(name)))
        .await
        .map_err(|e| {
            format!(
                "cannot reach the broker at {} to describe the services: {e}",
                crate::mesh::redact_url(&settings.amqp_url)
            )
        })?;
    let mut services: Vec<&str> = routes.routes().iter().map(|r| r.service.as_str()).collect();
    services.sort_unstable();
    services.dedup();
    let asks = services.iter().map(|service| {
        let call = Call {
            service: (*service).to_owned(),
            method: "nuropb_describe".into(),
            params: Default::default(),
            context: Default::default(),
            ttl: Duration::from_secs(3),
            trace_id: None,
        };
        let mesh = &mesh;
        async move {
            let answer = tokio::time::timeout(Duration::from_secs(3), mesh.request(&call)).await;
            (*service, answer)
        }
    });
    let mut described = ServiceDescriptions::new();
    let mut notes = Vec::new();
    for (service, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Ok(Ok(d)) if d.get("methods").is_some_and(Value::is_object) => {
                described.insert(service, d);
            }
            Ok(Ok(_)) => notes.push(format!("{service}: its description names no methods")),
            Ok(Err(e)) => notes.push(format!(
                "{service}: not described ({e}); params stay untyped"
            )),
            Err(_) => notes.push(format!(
                "{service}: no description within 3 s; params stay untyped"
            )),
        }
    }
    mesh.close(Duration::from_secs(2)).await;
    Ok((described, notes))
}

/// The TypeScript client of a BFF named `bff` for its `routes`, typed from
/// `described` where a service described itself.
pub fn client_ts(
    bff: &str,
    ws_path: &str,
    routes: &RouteTable,
    described: &ServiceDescriptions,
) -> String {
    let rules = routes
        .events()
        .iter()
        .map(|r| RuleTs {
            topic: quote(&r.pattern),
            delivery: quote(&r.delivery.to_string()),
            roles: serde_json::to_string(&r.roles).unwrap_or_else(|_| "[]".into()),
        })
        .collect();
    let mut subscribable: Vec<String> = routes
        .events()
        .iter()
        .filter(|r| r.delivery == Delivery::Subscribers)
        .map(|r| quote(&r.pattern))
        .collect();
    subscribable.dedup();
    let page = ClientTs {
        bff: &comment(bff),
        version: env!("CARGO_PKG_VERSION"),
        ws_path: &comment(ws_path),
        described: !described.is_empty(),
        frame_types: frame_declarations(),
        close_codes: close::ALL.to_vec(),
        namespaces: namespaces(routes, described),
        rules,
        subscribable,
    };
    // Rendering writes into a String and the template has no fallible
    // filters: it cannot fail.
    page.render()
        .unwrap_or_else(|e| format!("// rendering failed: {e}\n"))
}

struct RouteRow {
    service: String,
    method: String,
    target: String,
    roles: String,
}

struct RuleRow {
    topic: String,
    delivery: Delivery,
    roles: String,
    subscribable: bool,
}

#[derive(Template)]
#[template(path = "console.html")]
struct ConsolePage<'a> {
    bff: &'a str,
    version: &'a str,
    ws_path: &'a str,
    token: &'a str,
    routes: Vec<RouteRow>,
    rules: Vec<RuleRow>,
}

/// The console page: the routes and event rules, a token field (prefilled
/// with `token`), a request form, subscriptions and a live frame log.
pub(crate) fn console_html(bff: &str, ws_path: &str, routes: &RouteTable, token: &str) -> String {
    let mut rows: Vec<RouteRow> = routes
        .routes()
        .iter()
        .map(|r| RouteRow {
            service: r.exposed_service.clone(),
            method: r
                .exposed_method
                .clone()
                .or_else(|| r.method.clone())
                .unwrap_or_else(|| "*".into()),
            target: r.describe(),
            roles: roles_doc(&r.roles),
        })
        .collect();
    rows.extend(routes.composed_routes().iter().map(|c| RouteRow {
        service: c.service.clone(),
        method: c.method.clone(),
        target: format!(
            "composed: {}",
            c.parts
                .iter()
                .map(|p| format!("{}.{}", p.service, p.method))
                .collect::<Vec<_>>()
                .join(" + ")
        ),
        roles: roles_doc(&c.roles),
    }));
    let rules = routes
        .events()
        .iter()
        .map(|r| RuleRow {
            topic: r.pattern.clone(),
            delivery: r.delivery,
            roles: roles_doc(&r.roles),
            subscribable: r.delivery == Delivery::Subscribers,
        })
        .collect();
    let page = ConsolePage {
        bff,
        version: env!("CARGO_PKG_VERSION"),
        ws_path,
        token,
        routes: rows,
        rules,
    };
    page.render()
        .unwrap_or_else(|e| format!("<p>rendering failed: {e}</p>"))
}

/// One frame of every kind the gateway sends, as it serialises them: what
/// a test type-checks against the generated client's `ServerFrame`.
#[cfg(feature = "testing")]
pub(crate) fn server_frame_samples() -> Vec<String> {
    use serde_json::json;
    let mut failed = serde_json::Map::new();
    failed.insert("profile".into(), json!({"error": "Timeout"}));
    let mut extra = serde_json::Map::new();
    extra.insert("stack".into(), json!(["a", "b"]));
    [
        ServerFrame::Event {
            topic: "orders.created".into(),
            event: json!({"id": 1, "tags": ["x"], "nested": {"ok": true}}).into(),
            position: Some(41),
        },
        ServerFrame::Response {
            trace_id: "t1".into(),
            result: json!({"total": 3.5}).into(),
            error: None,
            failed: None,
        },
        ServerFrame::Response {
            trace_id: "t2".into(),
            result: Value::Null.into(),
            error: Some(ErrorBody {
                error: "NuropbException".into(),
                description: Some("boom".into()),
                extra,
            }),
            failed: Some(failed),
        },
        ServerFrame::Ack {
            trace_id: "t3".into(),
        },
        ServerFrame::Subscribed {
            topics: vec!["orders.#".into()],
            recovered: None,
        },
        ServerFrame::Subscribed {
            topics: vec!["orders.#".into()],
            recovered: Some(true),
        },
        ServerFrame::Unsubscribed {
            topics: vec!["audit.#".into()],
            reason: "the routing table was reloaded".into(),
        },
        ServerFrame::error(ErrorName::RouteNotFound, "no route", Some("t4".into())),
        ServerFrame::error(ErrorName::Forbidden, "not yours", None),
    ]
    .iter()
    .map(ServerFrame::to_json)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ROUTES: &str = r#"
[[route]]
call = "orders.get_order"
expose_as = "shop.order"
roles = ["customer"]

[[route]]
call = "users.*"

[[route]]
call = "billing-v2.charge"

[[event]]
topic = "orders.#"
deliver = "subscribers"

[[event]]
topic = "alerts.*"
deliver = "all"
roles = ["ops"]

[[compose]]
name = "home.load"
[[compose.part]]
key = "order"
call = "shop.order"
"#;

    #[test]
    fn the_client_has_a_function_per_route_under_its_exposed_name() {
        let routes = RouteTable::parse("routes.toml", ROUTES).unwrap();
        let ts = client_ts("web-bff", "/ws", &routes, &ServiceDescriptions::new());
        assert!(ts.contains(r#""shop": {"#), "{ts}");
        assert!(
            ts.contains(r#""order"<R = unknown>(params?: Record<string, unknown>"#),
            "{ts}"
        );
        assert!(ts.contains("orders.get_order (roles: customer"), "{ts}");
        assert!(
            !ts.contains(r#""orders": {"#),
            "the mesh name stays hidden: {ts}"
        );
        assert!(ts.contains(r#""billing-v2": {"#), "{ts}");
        // users.* has no description: a generic call.
        assert!(ts.contains("Any public method of `users`"), "{ts}");
        assert!(
            ts.contains(r#""load"<R = Record<string, unknown>>"#),
            "{ts}"
        );
        assert!(
            ts.contains(r#"export type SubscribableTopic = "orders.#";"#),
            "{ts}"
        );
        assert!(ts.contains(r#"{ topic: "alerts.*", deliver: "all", roles: ["ops"] }"#));
        assert!(ts.contains("AUTH_REQUIRED: 4003,"), "{ts}");
    }

    #[test]
    fn the_frame_types_are_the_protocol_types() {
        let routes = RouteTable::parse("routes.toml", ROUTES).unwrap();
        let ts = client_ts("b", "/ws", &routes, &ServiceDescriptions::new());
        for decl in frame_declarations() {
            assert!(ts.contains(&format!("export {decl}")), "{decl} missing");
        }
        for name in [ErrorName::RouteNotFound, ErrorName::ShuttingDown] {
            assert!(ts.contains(&format!("\"{}\"", name.as_str())), "{name:?}");
        }
        for (name, code) in close::ALL {
            assert!(ts.contains(&format!("{name}: {code},")), "{name}");
        }
    }

    #[test]
    fn routes_to_methods_a_service_does_not_describe_are_named() {
        let routes = RouteTable::parse("routes.toml", ROUTES).unwrap();
        let mut d = ServiceDescriptions::new();
        assert!(
            d.missing_methods(&routes).is_empty(),
            "nothing described, nothing judged"
        );
        d.insert("orders", json!({"methods": {"list": {}, "_get_order": {}}}));
        d.insert("users", json!({"methods": {}}));
        // `orders.get_order` is missing (a private one does not count);
        // `users.*` is a wildcard; billing-v2 gave no description.
        assert_eq!(
            d.missing_methods(&routes),
            ["route `orders.get_order`: the service describes no public method `get_order`"]
        );
        d.insert("orders", json!({"methods": {"get_order": {}}}));
        assert!(d.missing_methods(&routes).is_empty());
    }

    #[test]
    fn described_methods_get_parameter_types() {
        let routes = RouteTable::parse("routes.toml", ROUTES).unwrap();
        let mut d = ServiceDescriptions::new();
        d.insert(
            "users",
            json!({"service_name": "users", "methods": {
                "get_profile": {"parameters": {"type": "object",
                    "properties": {"user_id": {"type": "str"}, "full": {"type": "bool"}},
                    "required": ["user_id"]}},
                "_private": {"parameters": {}},
                "nuropb_describe": {"parameters": {}},
            }}),
        );
        // As nuropb 0.1.8 describes: properties as [name, schema] pairs.
        d.insert(
            "orders",
            json!({"methods": {"get_order": {"parameters": {"type": "object",
                "properties": [["id", {"type": "int", "default": ""}]], "required": ["id"]}}}}),
        );
        let ts = client_ts("b", "/ws", &routes, &d);
        assert!(
            ts.contains(
                r#""get_profile"<R = unknown>(params: { "full"?: boolean; "user_id": string }"#
            ),
            "{ts}"
        );
        assert!(
            ts.contains(r#""order"<R = unknown>(params: { "id": number }"#),
            "{ts}"
        );
        assert!(!ts.contains("_private") && !ts.contains("\"nuropb_describe\""));
    }

    #[test]
    fn names_cannot_break_out_of_strings_or_comments() {
        assert_eq!(quote("a\"b"), r#""a\"b""#);
        assert_eq!(comment("x */ alert(1) /*"), "x * / alert(1) /*");
    }

    #[test]
    fn the_console_lists_routes_and_rules_escaped() {
        let routes = RouteTable::parse("routes.toml", ROUTES).unwrap();
        let html = console_html("web<bff>", "/ws", &routes, "tok\"en");
        assert!(html.contains("shop"), "{html}");
        assert!(html.contains("orders.get_order"), "{html}");
        assert!(html.contains("orders.#"), "{html}");
        assert!(
            html.contains("web&#60;bff&#62;") || html.contains("web&lt;bff&gt;"),
            "{html}"
        );
        assert!(!html.contains("tok\"en"), "the token is escaped: {html}");
    }
}
