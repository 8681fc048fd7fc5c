//! A client call's policy, in one place and without I/O: may it go out
//! (routing table, roles, per-route rate), to which mesh method, under which
//! context; and what every outcome is called, for the client and for the
//! metrics. The socket loop in `ws` only asks and carries out the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mesh::{Call, MeshError};
use crate::protocol::SessionInfo;
use crate::protocol::{ErrorBody, ErrorName, Params};
use crate::routing::{Composed, Delivery, Route, RouteTable};
use crate::topic;

/// Why the gateway refused a call before it reached the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Outside the routing table.
    NotRouted { service: String, method: String },
    /// The route needs one of `roles`, which the user lacks.
    Forbidden {
        service: String,
        method: String,
        roles: Vec<String>,
    },
    /// The route's `rate_per_sec` is used up for this second.
    RateLimited {
        service: String,
        method: String,
        per_sec: u32,
    },
    /// The connection has `limit` calls in flight already.
    TooManyInFlight { limit: usize },
    /// A subscription pattern that is not a bounded topic pattern.
    BadTopic { why: String },
    /// A subscription outside every `subscribers` rule the user may see.
    NotSubscribable { topic: String },
    /// The connection would hold more than `limit` subscriptions.
    TooManySubscriptions { limit: usize },
    /// The gateway is draining for a shutdown.
    ShuttingDown,
}

impl Refusal {
    pub(crate) fn name(&self) -> ErrorName {
        match self {
            Refusal::NotRouted { .. } => ErrorName::RouteNotFound,
            Refusal::Forbidden { .. } => ErrorName::Forbidden,
            Refusal::RateLimited { .. }
            | Refusal::TooManyInFlight { .. }
            | Refusal::TooManySubscriptions { .. } => ErrorName::RateLimited,
            Refusal::BadTopic { .. } => ErrorName::InvalidMessage,
            Refusal::NotSubscribable { .. } => ErrorName::Forbidden,
            Refusal::ShuttingDown => ErrorName::ShuttingDown,
        }
    }

    pub(crate) fn description(&self) -> String {
        match self {
            Refusal::NotRouted { service, method } => {
                format!("{service}.{method} is not routed by this gateway")
            }
            Refusal::Forbidden {
                service,
                method,
                roles,
            } => format!("{service}.{method} requires one of the roles {roles:?}"),
            Refusal::RateLimited {
                service,
                method,
                per_sec,
            } => format!("{service}.{method} allows {per_sec} requests a second"),
            Refusal::TooManyInFlight { limit } => {
                format!("at most {limit} requests may be in flight per connection")
            }
            Refusal::BadTopic { why } => format!("topic {why}"),
            Refusal::NotSubscribable { topic } => {
                format!("`{topic}` is not inside an event rule this connection may subscribe to")
            }
            Refusal::TooManySubscriptions { limit } => {
                format!("at most {limit} subscriptions per connection")
            }
            Refusal::ShuttingDown => {
                "this gateway is shutting down; reconnect to send new requests".into()
            }
        }
    }
}

/// Why a call produced no result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// The gateway refused it.
    Refused(Refusal),
    /// The mesh did not deliver a result (or the service answered an error).
    Mesh(MeshError),
    /// A BFF-local route answered an error.
    Local(ErrorBody),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r)
    }
}

impl Failure {
    /// The error object the client sees. Broker details stay in the log.
    pub(crate) fn to_client(&self) -> ErrorBody {
        match self {
            Failure::Refused(r) => ErrorBody::gateway(r.name(), r.description()),
            Failure::Mesh(e) => e.to_client(),
            Failure::Local(body) => body.clone(),
        }
    }

    /// The `outcome` label of the request metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Failure::Refused(r) => r.name().as_str(),
            Failure::Mesh(e) => match e.gateway_name() {
                Some(name) => name.as_str(),
                None => SERVICE_ERROR,
            },
            Failure::Local(_) => SERVICE_ERROR,
        }
    }
}

/// The outcome label of an error that a service (or a BFF-local route)
/// answered: the gateway passes those on and does not name them.
pub(crate) const SERVICE_ERROR: &str = "service_error";

/// A call the policy let through: the route that allowed it and the mesh
/// method it maps to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowed<'a> {
    pub(crate) route: &'a Route,
    /// Its index in the table: its latency series, its rate window.
    pub(crate) route_index: usize,
    pub(crate) service: &'a str,
    pub(crate) method: &'a str,
}

impl Allowed<'_> {
    pub(crate) fn timeout(&self) -> Duration {
        self.route.timeout
    }

    /// The mesh call this allows: its service and method, under the route's
    /// timeout, with `params` and the gateway-built `context`.
    pub(crate) fn call(&self, params: impl Into<Params>, context: Params, trace_id: &str) -> Call {
        Call {
            service: self.service.to_owned(),
            method: self.method.to_owned(),
            params: params.into(),
            context,
            ttl: self.timeout(),
            trace_id: Some(trace_id.to_owned()),
        }
    }
}

/// Per-route request counts of one connection in the current one-second
/// window. Only routes with a `rate_per_sec` take an entry, so its size is
/// bounded by the routing table. Counted per route index of one table: a
/// reloaded table starts them again.
///
/// A vector sorted by route index, not a map: every connection holds one
/// (most of them empty), and an empty vector is half a map's size.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    /// (route index, window start, calls in it), by route index.
    windows: Vec<(usize, Instant, u32)>,
    generation: u64,
}

impl Rates {
    /// Count against `routes` from now on.
    fn follow(&mut self, routes: &RouteTable) {
        if self.generation != routes.generation() {
            self.generation = routes.generation();
            self.windows.clear();
        }
    }

    /// Count a call at `now`; false once the route's limit is used up.
    fn admit(&mut self, route_index: usize, limit: u32, now: Instant) -> bool {
        let at = match self.windows.binary_search_by_key(&route_index, |w| w.0) {
            Ok(at) => at,
            Err(at) => {
                self.windows.insert(at, (route_index, now, 0));
                at
            }
        };
        let (_, start, count) = &mut self.windows[at];
        if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        *count = count.saturating_add(1);
        *count <= limit
    }
}

/// May `session` call `service.method` now? The routing table decides what
/// exists, the route's roles who may call it, its rate how often.
pub(crate) fn authorize<'a>(
    routes: &'a RouteTable,
    session: &SessionInfo,
    rates: &mut Rates,
    now: Instant,
    service: &str,
    method: &'a str,
) -> Result<Allowed<'a>, Refusal> {
    let Some(resolved) = routes.resolve(service, method) else {
        return Err(Refusal::NotRouted {
            service: service.into(),
            method: method.into(),
        });
    };
    let route = resolved.route;
    if !route.allows(&session.roles) {
        return Err(Refusal::Forbidden {
            service: service.into(),
            method: method.into(),
            roles: route.roles.clone(),
        });
    }
    rates.follow(routes);
    if let Some(per_sec) = route.rate_per_sec
        && !rates.admit(resolved.route_index, per_sec, now)
    {
        return Err(Refusal::RateLimited {
            service: service.into(),
            method: method.into(),
            per_sec,
        });
    }
    Ok(Allowed {
        route,
        route_index: resolved.route_index,
        service: resolved.service,
        method: resolved.method,
    })
}

/// May `session` call the composed route `composed` (number `index`) now?
/// Its own roles and rate apply; each of its parts is then authorised like
/// any call.
pub(crate) fn authorize_composed(
    routes: &RouteTable,
    composed: &Composed,
    index: usize,
    session: &SessionInfo,
    rates: &mut Rates,
    now: Instant,
) -> Result<(), Refusal> {
    if !composed.allows(&session.roles) {
        return Err(Refusal::Forbidden {
            service: composed.service.clone(),
            method: composed.method.clone(),
            roles: composed.roles.clone(),
        });
    }
    rates.follow(routes);
    if let Some(per_sec) = composed.rate_per_sec
        && !rates.admit(usize::MAX - index, per_sec, now)
    {
        return Err(Refusal::RateLimited {
            service: composed.service.clone(),
            method: composed.method.clone(),
            per_sec,
        });
    }
    Ok(())
}

/// May a user with `roles` subscribe to `pattern`? Only a bounded pattern
/// that lies inside a `subscribers` rule whose roles the user holds
/// (bff-contract.md section 4).
pub(crate) fn authorize_subscription(
    routes: &RouteTable,
    roles: &[String],
    pattern: &str,
) -> Result<(), Refusal> {
    topic::validate_subscription(pattern).map_err(|why| Refusal::BadTopic { why })?;
    let inside = routes.events().iter().any(|rule| {
        rule.delivery == Delivery::Subscribers
            && rule.allows(roles)
            && topic::covers(&rule.pattern, pattern)
    });
    if inside {
        Ok(())
    } else {
        Err(Refusal::NotSubscribable {
            topic: pattern.to_owned(),
        })
    }
}

/// The mesh context the gateway builds for a session's calls (whatever
/// context a client sends is ignored): `Authorization` (the session's
/// token, or null), `session_id`, `trace_id` and `user_id`.
///
/// The token is written as JSON once per session, and again when it
/// changes: it is not copied and escaped again for each call.
pub(crate) struct SessionContext(Option<Arc<serde_json::value::RawValue>>);

impl SessionContext {
    pub(crate) fn new(token: Option<&str>) -> Self {
        // A string always serializes.
        Self(token.and_then(|t| serde_json::value::to_raw_value(t).ok().map(Arc::from)))
    }

    /// The context of the call `trace_id` names (and whose span
    /// `traceparent` is, when the call is traced), made for `session`.
    pub(crate) fn render(
        &self,
        session: &Arc<SessionInfo>,
        trace_id: &str,
        traceparent: Option<&str>,
    ) -> Params {
        Params::context(session.clone(), self.0.clone(), trace_id, traceparent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    const ROUTES: &str = r#"
[[route]]
call = "orders.*"

[[route]]
call = "admin.purge"
roles = ["admin", "ops"]

[[route]]
call = "users.get_profile"
expose_as = "me.profile"

[[route]]
call = "search.query"
rate_per_sec = 2

[[event]]
topic = "orders.#"
deliver = "subscribers"

[[event]]
topic = "audit.#"
deliver = "subscribers"
roles = ["auditor"]

[[event]]
topic = "system.*"
deliver = "all"
"#;

    fn table() -> RouteTable {
        RouteTable::parse("routes.toml", ROUTES).unwrap()
    }

    fn user(roles: &[&str]) -> SessionInfo {
        SessionInfo {
            session_id: "s1".into(),
            user_id: "u1".into(),
            username: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn ask<'a>(
        t: &'a RouteTable,
        s: &SessionInfo,
        rates: &mut Rates,
        service: &str,
        method: &'a str,
    ) -> Result<(String, String), Refusal> {
        authorize(t, s, rates, Instant::now(), service, method)
            .map(|a| (a.service.to_owned(), a.method.to_owned()))
    }

    #[test]
    fn wildcards_exact_routes_and_aliases_resolve_to_mesh_methods() {
        let t = table();
        let mut r = Rates::default();
        let u = user(&[]);
        assert_eq!(
            ask(&t, &u, &mut r, "orders", "list"),
            Ok(("orders".into(), "list".into()))
        );
        assert_eq!(
            ask(&t, &u, &mut r, "me", "profile"),
            Ok(("users".into(), "get_profile".into()))
        );
        let a = authorize(&t, &u, &mut r, Instant::now(), "orders", "x").unwrap();
        assert_eq!(a.timeout(), crate::routing::DEFAULT_TIMEOUT);
    }

    #[test]
    fn what_is_not_routed_is_refused_by_name() {
        let t = table();
        let mut r = Rates::default();
        let u = user(&["admin"]);
        for (s, m) in [
            ("users", "get_profile"),
            ("admin", "other"),
            ("ordersx", "list"),
            ("", ""),
        ] {
            let refusal = ask(&t, &u, &mut r, s, m).unwrap_err();
            assert_eq!(refusal.name(), ErrorName::RouteNotFound);
            assert!(refusal.description().contains("is not routed"));
        }
    }

    #[test]
    fn roles_gate_a_route() {
        let t = table();
        let mut r = Rates::default();
        let refusal = ask(&t, &user(&["user"]), &mut r, "admin", "purge").unwrap_err();
        assert_eq!(refusal.name(), ErrorName::Forbidden);
        assert!(refusal.description().contains("admin"), "{refusal:?}");
        assert!(ask(&t, &user(&[]), &mut r, "admin", "purge").is_err());
        assert!(ask(&t, &user(&["ops"]), &mut r, "admin", "purge").is_ok());
    }

    #[test]
    fn a_route_rate_is_per_second_and_per_connection() {
        let t = table();
        let u = user(&[]);
        let mut r = Rates::default();
        let t0 = Instant::now();
        let at = |r: &mut Rates, ms: u64| {
            authorize(&t, &u, r, t0 + Duration::from_millis(ms), "search", "query")
        };
        assert!(at(&mut r, 0).is_ok());
        assert!(at(&mut r, 10).is_ok());
        let refusal = at(&mut r, 20).unwrap_err();
        assert_eq!(refusal.name(), ErrorName::RateLimited);
        assert!(refusal.description().contains("2 requests a second"));
        assert!(at(&mut r, 1000).is_ok(), "a new window");
        let mut other_connection = Rates::default();
        assert!(at(&mut other_connection, 20).is_ok());
        // Unlimited routes take no window.
        for _ in 0..100 {
            assert!(authorize(&t, &u, &mut r, t0, "orders", "list").is_ok());
        }
        assert_eq!(r.windows.len(), 1);
    }

    #[test]
    fn subscriptions_stay_inside_subscribers_rules_the_user_may_see() {
        let t = table();
        let none: Vec<String> = vec![];
        let auditor = vec!["auditor".to_owned()];
        for ok in ["orders.#", "orders.created", "orders.*.eu"] {
            assert_eq!(authorize_subscription(&t, &none, ok), Ok(()), "{ok}");
        }
        for (pattern, name) in [
            ("#", ErrorName::Forbidden),
            ("*.*", ErrorName::Forbidden),
            ("secret.stuff", ErrorName::Forbidden),
            ("nuropb.#", ErrorName::Forbidden),
            ("system.restart", ErrorName::Forbidden),
            ("audit.#", ErrorName::Forbidden),
            ("orders..x", ErrorName::InvalidMessage),
            ("orders.#.a.#.b.#", ErrorName::InvalidMessage),
        ] {
            let refusal = authorize_subscription(&t, &none, pattern).unwrap_err();
            assert_eq!(refusal.name(), name, "{pattern}");
        }
        assert_eq!(authorize_subscription(&t, &auditor, "audit.login"), Ok(()));
        let evil = format!("{}x", "#.".repeat(20_000));
        let refusal = authorize_subscription(&t, &none, &evil).unwrap_err();
        assert_eq!(refusal.name(), ErrorName::InvalidMessage);
        assert!(
            refusal.description().len() < 200,
            "no echo of the whole input"
        );
    }

    #[test]
    fn the_context_names_the_user_and_carries_the_token() {
        let session = Arc::new(user(&[]));
        let ctx = SessionContext::new(Some("tok")).render(&session, "t1", None);
        assert_eq!(ctx["user_id"], "u1");
        assert_eq!(ctx["Authorization"], "tok");
        assert_eq!(ctx["trace_id"], "t1");
        assert_eq!(ctx["session_id"], "s1");
        assert_eq!(ctx.len(), 4);
        let anonymous = SessionContext::new(None).render(&session, "t", None);
        assert_eq!(anonymous["Authorization"], Value::Null);
        // A session's calls differ by their trace id only.
        let text = SessionContext::new(Some("tok"));
        assert_eq!(text.render(&session, "a", None)["trace_id"], "a");
        assert_eq!(text.render(&session, "b", None)["trace_id"], "b");
        // Its debug form leaves the token out.
        let shown = format!("{:?}", text.render(&session, "a", None));
        assert!(shown.contains("s1") && !shown.contains("tok"), "{shown}");
        // Empty ids, no token: the keys in their order, as a map writes them.
        let empty = Arc::new(SessionInfo {
            session_id: String::new(),
            user_id: String::new(),
            username: None,
            roles: vec![],
        });
        assert_eq!(
            serde_json::to_string(&SessionContext::new(None).render(&empty, "", None)).unwrap(),
            r#"{"Authorization":null,"session_id":"","trace_id":"","user_id":""}"#
        );
    }

    /// The context built as a map: what the text must be the JSON of.
    fn context_map(
        session: &SessionInfo,
        token: Option<&str>,
        trace_id: &str,
    ) -> Map<String, Value> {
        let mut ctx = Map::new();
        ctx.insert("user_id".into(), session.user_id.clone().into());
        ctx.insert(
            "Authorization".into(),
            token.map_or(Value::Null, Value::from),
        );
        ctx.insert("trace_id".into(), trace_id.into());
        ctx.insert("session_id".into(), session.session_id.clone().into());
        ctx
    }

    proptest::proptest! {
        /// Calls on several limited routes, in any order and at any pace:
        /// each route's window counts alone, as a map by route would.
        #[test]
        fn each_route_counts_in_its_own_window(
            calls in proptest::collection::vec((0usize..6, 0u64..700, 1u32..4), 0..200),
        ) {
            let mut rates = Rates::default();
            let mut model: std::collections::HashMap<usize, (Instant, u32)> = Default::default();
            let mut now = Instant::now();
            for (route, step_ms, limit) in calls {
                now += Duration::from_millis(step_ms);
                let (start, count) = model.entry(route).or_insert((now, 0));
                if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
                    *start = now;
                    *count = 0;
                }
                *count += 1;
                proptest::prop_assert_eq!(rates.admit(route, limit, now), *count <= limit);
            }
            proptest::prop_assert!(rates.windows.is_sorted_by_key(|w| w.0));
        }

        /// Any ids and token a client or an identity provider could put in
        /// it (quotes, backslashes, control characters, any script): the
        /// context's text is byte for byte the JSON of the map.
        #[test]
        fn the_context_text_is_the_json_of_the_context(
            user_id in "\\PC*|[\"\\\\\u{0}-\u{1f}\u{7f}\u{2028}é😀a]{0,12}",
            session_id in "\\PC{0,40}",
            token in proptest::option::of("[A-Za-z0-9._\"\\\\-]{0,80}"),
            trace_id in "\\PC*|[\"\\\\\u{0}-\u{1f}a]{0,12}",
        ) {
            let session = SessionInfo {
                session_id,
                user_id,
                username: None,
                roles: vec![],
            };
            let built = context_map(&session, token.as_deref(), &trace_id);
            let session = Arc::new(session);
            let rendered = SessionContext::new(token.as_deref()).render(&session, &trace_id, None);
            proptest::prop_assert_eq!(
                serde_json::to_string(&rendered).unwrap(),
                serde_json::to_string(&built).unwrap()
            );
            proptest::prop_assert_eq!(&*rendered, &built);
        }
    }

    #[test]
    fn every_failure_has_a_client_name_and_a_label() {
        let cases = [
            (
                Failure::Refused(Refusal::TooManyInFlight { limit: 3 }),
                "RateLimited",
                "RateLimited",
            ),
            (
                Failure::Mesh(MeshError::Timeout(Duration::from_millis(5))),
                "Timeout",
                "Timeout",
            ),
            (
                Failure::Mesh(MeshError::Unavailable("secret broker detail".into())),
                "MeshUnavailable",
                "MeshUnavailable",
            ),
            (
                Failure::Mesh(MeshError::NotDelivered {
                    service: "a".into(),
                    method: "b".into(),
                }),
                "NuropbNotDeliveredError",
                "NuropbNotDeliveredError",
            ),
            (
                Failure::Mesh(MeshError::Remote(ErrorBody::new("NuropbException", "x"))),
                "NuropbException",
                SERVICE_ERROR,
            ),
            (
                Failure::Local(ErrorBody::new("Timeout", "a local route's own")),
                "Timeout",
                SERVICE_ERROR,
            ),
        ];
        for (failure, name, label) in cases {
            let body = failure.to_client();
            assert_eq!(body.error, name);
            assert_eq!(failure.label(), label);
            assert!(!body.description.unwrap_or_default().contains("secret"));
        }
    }
}
