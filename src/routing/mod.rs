//! The routing table: the allow-list of mesh calls a client may make, and the
//! event rules that decide which mesh events reach which sockets. Loaded from
//! `routes.toml` (format documented in the README and in the generated file).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::metrics::{Metrics, RouteLatency};
use crate::topic::{self, validate_pattern};

mod changes;

pub use changes::TableChanges;

/// Timeout of a route that names none and whose file sets no default.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A routing file that could not be loaded: which file, where, and what was
/// expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct RoutesError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// How a mesh event reaches clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Every connection.
    All,
    /// The connections of the users named in the event's `target`.
    Target,
    /// The connections that subscribed to a matching topic.
    Subscribers,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The mesh service called.
    pub service: String,
    /// The mesh method, or `None` for `service.*`.
    pub method: Option<String>,
    /// The name the frontend uses, `service` and optional method.
    pub exposed_service: String,
    pub exposed_method: Option<String>,
    /// Any one of these roles is required; empty means any authenticated user.
    pub roles: Vec<String>,
    pub timeout: Duration,
    /// Requests a second one connection may make on this route; `None` is unlimited.
    pub rate_per_sec: Option<u32>,
}

impl Route {
    pub fn allows(&self, roles: &[String]) -> bool {
        self.roles.is_empty() || self.roles.iter().any(|r| roles.contains(r))
    }

    pub fn describe(&self) -> String {
        format!("{}.{}", self.service, self.method.as_deref().unwrap_or("*"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRule {
    pub pattern: String,
    pub delivery: Delivery,
    /// Any one of these roles is needed to receive (and, for
    /// `subscribers`, to subscribe to) its events; empty means any user.
    pub roles: Vec<String>,
}

impl EventRule {
    /// Whether a user with `roles` may receive this rule's events.
    pub fn allows(&self, roles: &[String]) -> bool {
        self.roles.is_empty() || self.roles.iter().any(|r| roles.contains(r))
    }
}

/// A resolved call: which route allowed it and the mesh method to call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved<'a> {
    pub route: &'a Route,
    pub route_index: usize,
    pub service: &'a str,
    pub method: &'a str,
}

/// The allow-list a gateway routes by (`routes.toml`): routes, event rules
/// and composed routes, checked when loaded (a bad entry names its file and
/// line).
///
/// ```
/// use nuropb_bff::RouteTable;
///
/// let file = r#"
/// [[route]]
/// call = "orders.*"
///
/// [[route]]
/// call = "users.get_profile"
/// expose_as = "me.profile"
/// roles = ["user"]
///
/// [[event]]
/// topic = "orders.#"
/// deliver = "subscribers"
///
/// [[compose]]
/// name = "home.load"
/// [[compose.part]]
/// key = "profile"
/// call = "me.profile"
/// "#;
/// let routes = RouteTable::parse("routes.toml", file)?;
/// assert_eq!(routes.routes().len(), 2);
/// assert_eq!(routes.composed_routes()[0].parts[0].key, "profile");
/// assert!(routes.check_call("orders.list").is_ok());
/// assert!(routes.check_call("orders._private").is_err());
///
/// // A part no route covers: refused, with where it is.
/// let err = RouteTable::parse(
///     "routes.toml",
///     "[[compose]]\nname = \"a.b\"\n[[compose.part]]\nkey = \"k\"\ncall = \"users.get\"\n",
/// )
/// .unwrap_err();
/// assert_eq!((err.line, err.to_string().contains("is not routed")), (5, true));
/// # Ok::<(), nuropb_bff::RoutesError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    exact: HashMap<(String, String), usize>,
    wildcard: HashMap<String, usize>,
    events: Vec<EventRule>,
    composed: Vec<Composed>,
    /// Which table this is in a gateway's life (0 at start, one more at
    /// each reload): what is counted per route index, such as rates,
    /// starts again when it changes.
    generation: u64,
    /// Each route's and each composed route's latency series, by index
    /// (set when a gateway puts the table in use).
    latency: Vec<RouteLatency>,
    composed_latency: Vec<RouteLatency>,
}

/// A composed route: one name a client calls that gathers several routed
/// calls, run concurrently on the client's behalf.
#[derive(Debug, Clone, PartialEq)]
pub struct Composed {
    /// The name the client calls, `service` and `method`.
    pub service: String,
    pub method: String,
    /// Any one of these roles is required; empty means any user.
    pub roles: Vec<String>,
    /// Calls a second one connection may make; `None` is unlimited.
    pub rate_per_sec: Option<u32>,
    pub parts: Vec<Part>,
}

/// One call of a composed route.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Where its result goes in the composed result.
    pub key: String,
    /// The routed name it calls (the routing table's rules apply).
    pub service: String,
    pub method: String,
    pub params: PartParams,
    /// A failure of this part fails the whole call.
    pub required: bool,
}

/// Where a part's params come from.
#[derive(Debug, Clone, PartialEq)]
pub enum PartParams {
    /// The client's params as they are.
    Client,
    /// These keys, each a fixed value, a field of the session
    /// (`"$session.user_id"`, `"$session.username"`, `"$session.session_id"`)
    /// or a field of the client's params (`"$client.<key>"`).
    Fields(serde_json::Map<String, serde_json::Value>),
}

impl Composed {
    pub fn allows(&self, roles: &[String]) -> bool {
        self.roles.is_empty() || self.roles.iter().any(|r| roles.contains(r))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    defaults: Option<FileDefaults>,
    #[serde(default)]
    route: Vec<FileRoute>,
    #[serde(default)]
    event: Vec<FileEvent>,
    #[serde(default)]
    compose: Vec<FileCompose>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCompose {
    name: Spanned<String>,
    #[serde(default)]
    roles: Vec<Spanned<String>>,
    rate_per_sec: Option<Spanned<u32>>,
    #[serde(default)]
    part: Vec<FilePart>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePart {
    key: Spanned<String>,
    call: Spanned<String>,
    #[serde(default)]
    params: Option<Spanned<toml::Value>>,
    #[serde(default)]
    required: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDefaults {
    timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    call: Spanned<String>,
    expose_as: Option<Spanned<String>>,
    #[serde(default)]
    roles: Vec<Spanned<String>>,
    timeout_ms: Option<Spanned<u64>>,
    rate_per_sec: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEvent {
    topic: Spanned<String>,
    #[serde(default = "default_delivery")]
    deliver: Delivery,
    #[serde(default)]
    roles: Vec<Spanned<String>>,
}

fn default_delivery() -> Delivery {
    Delivery::Subscribers
}

impl RouteTable {
    /// Read and validate a routing file.
    pub fn load(path: &Path) -> Result<Self, RoutesError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RoutesError {
            file: file.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read the routing file: {e}"),
        })?;
        Self::parse(&file, &text)
    }

    /// Validate routing-file text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, RoutesError> {
        let at = |span: std::ops::Range<usize>, message: String| {
            let (line, column) = line_col(text, span.start);
            RoutesError {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        let doc: FileDoc = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at(span, e.message().trim().to_owned())
        })?;
        let default_timeout = match doc.defaults.and_then(|d| d.timeout_ms) {
            Some(t) => checked_timeout(&t).map_err(|m| at(t.span(), m))?,
            None => DEFAULT_TIMEOUT,
        };
        let mut table = RouteTable::default();
        for r in doc.route {
            let (service, method) = parse_call(r.call.get_ref())
                .map_err(|m| at(r.call.span(), format!("`call` {m}")))?;
            let (exposed_service, exposed_method) = match &r.expose_as {
                None => (service.clone(), method.clone()),
                Some(e) => {
                    let (s, m) = parse_call(e.get_ref())
                        .map_err(|m| at(e.span(), format!("`expose_as` {m}")))?;
                    if m.is_none() != method.is_none() {
                        return Err(at(
                            e.span(),
                            "`expose_as` must be `name.*` when `call` is `service.*`, \
                             and `name.method` when `call` names a method"
                                .into(),
                        ));
                    }
                    (s, m)
                }
            };
            let mut roles = Vec::with_capacity(r.roles.len());
            for role in &r.roles {
                if role.get_ref().trim().is_empty() {
                    return Err(at(role.span(), "a role must not be empty".into()));
                }
                roles.push(role.get_ref().clone());
            }
            let timeout = match &r.timeout_ms {
                Some(t) => checked_timeout(t).map_err(|m| at(t.span(), m))?,
                None => default_timeout,
            };
            let rate_per_sec = match &r.rate_per_sec {
                Some(rate) if *rate.get_ref() == 0 => {
                    return Err(at(
                        rate.span(),
                        "`rate_per_sec` must be at least 1 (leave it out for no limit)".into(),
                    ));
                }
                Some(rate) => Some(*rate.get_ref()),
                None => None,
            };
            let index = table.routes.len();
            let clash = match &exposed_method {
                Some(m) => table
                    .exact
                    .insert((exposed_service.clone(), m.clone()), index)
                    .is_some(),
                None => table
                    .wildcard
                    .insert(exposed_service.clone(), index)
                    .is_some(),
            };
            if clash {
                let span = r.expose_as.as_ref().map_or(r.call.span(), |e| e.span());
                return Err(at(
                    span,
                    format!(
                        "`{}.{}` is routed twice; each name a client calls must appear once",
                        exposed_service,
                        exposed_method.as_deref().unwrap_or("*")
                    ),
                ));
            }
            table.routes.push(Route {
                service,
                method,
                exposed_service,
                exposed_method,
                roles,
                timeout,
                rate_per_sec,
            });
        }
        for e in doc.event {
            validate_pattern(e.topic.get_ref())
                .map_err(|m| at(e.topic.span(), format!("`topic` {m}")))?;
            let mut roles = Vec::with_capacity(e.roles.len());
            for role in &e.roles {
                if role.get_ref().trim().is_empty() {
                    return Err(at(role.span(), "a role must not be empty".into()));
                }
                roles.push(role.get_ref().clone());
            }
            table.events.push(EventRule {
                pattern: e.topic.get_ref().clone(),
                delivery: e.deliver,
                roles,
            });
        }
        for c in doc.compose {
            let (service, method) = match parse_call(c.name.get_ref()) {
                Ok((s, Some(m))) => (s, m),
                _ => {
                    return Err(at(
                        c.name.span(),
                        format!(
                            "`name` must be `service.method`, found `{}`",
                            c.name.get_ref()
                        ),
                    ));
                }
            };
            if table.resolve(&service, &method).is_some()
                || table
                    .composed
                    .iter()
                    .any(|o| o.service == service && o.method == method)
            {
                return Err(at(
                    c.name.span(),
                    format!(
                        "`{service}.{method}` is routed twice; each name a client calls must appear once"
                    ),
                ));
            }
            if c.part.is_empty() {
                return Err(at(
                    c.name.span(),
                    "a composed route needs at least one `[[compose.part]]`".into(),
                ));
            }
            let mut roles = Vec::new();
            for role in &c.roles {
                if role.get_ref().trim().is_empty() {
                    return Err(at(role.span(), "a role must not be empty".into()));
                }
                roles.push(role.get_ref().clone());
            }
            let rate_per_sec = match &c.rate_per_sec {
                Some(rate) if *rate.get_ref() == 0 => {
                    return Err(at(
                        rate.span(),
                        "`rate_per_sec` must be at least 1 (leave it out for no limit)".into(),
                    ));
                }
                other => other.as_ref().map(|r| *r.get_ref()),
            };
            let mut parts: Vec<Part> = Vec::new();
            for p in c.part {
                let key = p.key.get_ref().clone();
                if !is_name(&key) || parts.iter().any(|o| o.key == key) {
                    return Err(at(
                        p.key.span(),
                        format!("`key` must be a name used once in its route, found `{key}`"),
                    ));
                }
                let (service, method) = match parse_call(p.call.get_ref()) {
                    Ok((s, Some(m))) => (s, m),
                    _ => {
                        return Err(at(
                            p.call.span(),
                            format!(
                                "`call` must be a routed `service.method`, found `{}`",
                                p.call.get_ref()
                            ),
                        ));
                    }
                };
                if table.resolve(&service, &method).is_none() {
                    return Err(at(
                        p.call.span(),
                        format!(
                            "`{service}.{method}` is not routed: each part must name a route \
                             above (a `service.*` route covers public method names: a letter, \
                             then letters, digits or `_`)"
                        ),
                    ));
                }
                let params = match &p.params {
                    None => PartParams::Client,
                    Some(v) => match v.get_ref() {
                        toml::Value::String(s) if s == "client" => PartParams::Client,
                        toml::Value::Table(t) => PartParams::Fields(
                            serde_json::to_value(t)
                                .map_err(|e| at(v.span(), e.to_string()))?
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                        ),
                        _ => {
                            return Err(at(
                                v.span(),
                                "`params` must be \"client\" or a table of values".into(),
                            ));
                        }
                    },
                };
                parts.push(Part {
                    key,
                    service,
                    method,
                    params,
                    required: p.required,
                });
            }
            table.composed.push(Composed {
                service,
                method,
                roles,
                rate_per_sec,
                parts,
            });
        }
        Ok(table)
    }

    /// Whether a route covers `call` (`service.method`, by the name a
    /// client calls); why not, when not.
    pub fn check_call(&self, call: &str) -> Result<(), String> {
        let Ok((service, Some(method))) = parse_call(call) else {
            return Err(format!("must be a routed `service.method`, found `{call}`"));
        };
        if self.resolve(&service, &method).is_some() {
            return Ok(());
        }
        Err(format!(
            "`{call}` is not routed by the routing file (a `service.*` route covers public \
             method names: a letter, then letters, digits or `_`)"
        ))
    }

    /// The composed route a client's `service.method` names, and its index.
    pub(crate) fn composed(&self, service: &str, method: &str) -> Option<(usize, &Composed)> {
        self.composed
            .iter()
            .enumerate()
            .find(|(_, c)| c.service == service && c.method == method)
    }

    /// The composed routes.
    pub fn composed_routes(&self) -> &[Composed] {
        &self.composed
    }

    /// Which mesh call a client's `service.method` maps to, if any. A
    /// wildcard covers public method names only ([`is_public_method`]).
    pub(crate) fn resolve<'a>(&'a self, service: &str, method: &'a str) -> Option<Resolved<'a>> {
        let index = match self.exact.get(&(service.to_owned(), method.to_owned())) {
            Some(i) => *i,
            None if is_public_method(method) => *self.wildcard.get(service)?,
            None => return None,
        };
        let route = &self.routes[index];
        Some(Resolved {
            route,
            route_index: index,
            service: &route.service,
            method: route.method.as_deref().unwrap_or(method),
        })
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Take each route's latency series out of `metrics`, once.
    pub(crate) fn set_latency(&mut self, metrics: &Metrics) {
        self.latency = self
            .routes
            .iter()
            .map(|r| {
                let method = r.exposed_method.as_deref().unwrap_or("*");
                metrics.route_latency(&format!("{}.{method}", r.exposed_service))
            })
            .collect();
        self.composed_latency = self
            .composed
            .iter()
            .map(|c| metrics.route_latency(&format!("{}.{}", c.service, c.method)))
            .collect();
    }

    /// Route `index`'s latency series, once the table is in use.
    pub(crate) fn latency(&self, index: usize) -> Option<&RouteLatency> {
        self.latency.get(index)
    }

    /// Composed route `index`'s latency series, once the table is in use.
    pub(crate) fn composed_latency(&self, index: usize) -> Option<&RouteLatency> {
        self.composed_latency.get(index)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn events(&self) -> &[EventRule] {
        &self.events
    }

    /// The first event rule whose pattern matches `topic`.
    pub fn event_rule(&self, topic: &str) -> Option<&EventRule> {
        self.events
            .iter()
            .find(|rule| topic::matches(&rule.pattern, topic))
    }
}

fn checked_timeout(t: &Spanned<u64>) -> Result<Duration, String> {
    match *t.get_ref() {
        0 => Err("`timeout_ms` must be at least 1".into()),
        ms if ms > 3_600_000 => Err("`timeout_ms` must be at most 3600000 (one hour)".into()),
        ms => Ok(Duration::from_millis(ms)),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A service or method name: what nuropb accepts as a routing key and a
/// Python method name.
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Split `service.method` or `service.*`.
pub(crate) fn parse_call(s: &str) -> Result<(String, Option<String>), String> {
    let expected = format!("must be `service.method` or `service.*`, found `{s}`");
    let Some((service, method)) = s.trim().split_once('.') else {
        return Err(expected);
    };
    if !is_name(service) {
        return Err(expected);
    }
    if method == "*" {
        return Ok((service.to_owned(), None));
    }
    if !is_name(method) {
        return Err(expected);
    }
    Ok((service.to_owned(), Some(method.to_owned())))
}

/// A method name a wildcard route (`service.*`) lets a client call: a
/// public Python method name (a letter, then letters, digits or `_`), never
/// one of nuropb's own (`nuropb_describe`, ...). Private (`_x`), dunder,
/// empty, dotted or otherwise odd names never reach a service through a
/// wildcard.
pub(crate) fn is_public_method(m: &str) -> bool {
    m.len() <= 200
        && m.bytes().next().is_some_and(|c| c.is_ascii_alphabetic())
        && m.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !m.starts_with("nuropb_")
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Delivery::All => "all",
            Delivery::Target => "target",
            Delivery::Subscribers => "subscribers",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[defaults]
timeout_ms = 5000

[[route]]
call = "orders.*"

[[route]]
call = "users.get_profile"
expose_as = "me.profile"
roles = ["user", "admin"]
timeout_ms = 1500

[[route]]
call = "billing.*"
expose_as = "pay.*"

[[event]]
topic = "orders.#"
deliver = "target"

[[event]]
topic = "news.*"
"#;

    #[test]
    fn resolves_exact_and_wildcard_routes() {
        let t = RouteTable::parse("routes.toml", SAMPLE).unwrap();
        let r = t.resolve("orders", "list").unwrap();
        assert_eq!((r.service, r.method), ("orders", "list"));
        assert_eq!(r.route.timeout, Duration::from_millis(5000));
        let r = t.resolve("me", "profile").unwrap();
        assert_eq!((r.service, r.method), ("users", "get_profile"));
        assert_eq!(r.route.timeout, Duration::from_millis(1500));
        let r = t.resolve("pay", "charge").unwrap();
        assert_eq!((r.service, r.method), ("billing", "charge"));
    }

    #[test]
    fn anything_outside_the_table_is_refused() {
        let t = RouteTable::parse("routes.toml", SAMPLE).unwrap();
        assert!(t.resolve("users", "get_profile").is_none(), "renamed away");
        assert!(t.resolve("users", "delete").is_none());
        assert!(t.resolve("billing", "charge").is_none(), "renamed away");
        assert!(t.resolve("ordersx", "list").is_none());
    }

    #[test]
    fn roles_gate_routes() {
        let t = RouteTable::parse("routes.toml", SAMPLE).unwrap();
        let r = t.resolve("me", "profile").unwrap().route;
        assert!(!r.allows(&[]));
        assert!(!r.allows(&["guest".to_owned()]));
        assert!(r.allows(&["admin".to_owned()]));
        assert!(t.resolve("orders", "x").unwrap().route.allows(&[]));
    }

    #[test]
    fn event_rules_match_topics() {
        let t = RouteTable::parse("routes.toml", SAMPLE).unwrap();
        assert_eq!(
            t.event_rule("orders.created.eu").unwrap().delivery,
            Delivery::Target
        );
        assert_eq!(
            t.event_rule("news.today").unwrap().delivery,
            Delivery::Subscribers
        );
        assert!(t.event_rule("news.today.late").is_none());
        assert!(t.event_rule("other").is_none());
    }

    #[test]
    fn wildcards_cover_public_method_names_only() {
        let t = RouteTable::parse("routes.toml", SAMPLE).unwrap();
        for m in ["list", "get_profile", "v2", "a_b_c"] {
            assert!(t.resolve("orders", m).is_some(), "{m}");
        }
        for m in [
            "nuropb_describe",
            "nuropb_x",
            "_private",
            "__init__",
            "",
            "a.b",
            "add\n",
            "9lives",
            "a-b",
            "a b",
        ] {
            assert!(t.resolve("orders", m).is_none(), "{m:?}");
        }
        // An exact route names its method itself.
        let t = RouteTable::parse("r", "[[route]]\ncall = \"svc.nuropb_describe\"\n").unwrap();
        assert!(t.resolve("svc", "nuropb_describe").is_some());
    }

    fn err(text: &str) -> RoutesError {
        RouteTable::parse("r.toml", text).unwrap_err()
    }

    #[test]
    fn errors_name_file_line_and_expectation() {
        let e = err("[[route]]\ncall = \"orders\"\n");
        assert_eq!((e.file.as_str(), e.line, e.column), ("r.toml", 2, 8));
        assert!(e.message.contains("`service.method` or `service.*`"), "{e}");
        assert!(e.to_string().starts_with("r.toml:2:8: "), "{e}");

        // What breaks a rule, the line it names, and what the message says.
        let cases: [(&str, Option<usize>, &str); 8] = [
            (
                "[[route]]\ncall = \"a.b\"\ncolour = 1\n",
                Some(3),
                "unknown field `colour`",
            ),
            (
                "[[route]]\ncall = \"a.*\"\nexpose_as = \"b.c\"\n",
                Some(3),
                "`name.*`",
            ),
            (
                "[[route]]\ncall = \"a.b\"\ntimeout_ms = 0\n",
                None,
                "timeout_ms",
            ),
            (
                "[[route]]\ncall = \"a.b\"\n[[route]]\ncall = \"a.b\"\n",
                Some(4),
                "routed twice",
            ),
            ("[[event]]\ntopic = \"a..b\"\n", Some(2), "`topic`"),
            (
                "[[event]]\ntopic = \"a\"\ndeliver = \"some\"\n",
                None,
                "unknown variant",
            ),
            ("[[route]\n", Some(1), ""),
            (
                "[[route]]\nexpose_as = \"a.b\"\n",
                None,
                "missing field `call`",
            ),
        ];
        for (text, line, says) in cases {
            let e = err(text);
            if let Some(line) = line {
                assert_eq!(e.line, line, "{text:?}: {e}");
            }
            assert!(e.message.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = RouteTable::load(Path::new("/nonexistent/routes.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/routes.toml"));
    }

    #[test]
    fn an_empty_table_routes_nothing() {
        let t = RouteTable::parse("r.toml", "").unwrap();
        assert!(t.resolve("a", "b").is_none());
        assert!(t.routes().is_empty());
    }

    #[test]
    fn composed_parts_and_calls_are_checked_against_the_routes() {
        let file = "[[route]]\ncall = \"svc.*\"\n\n[[route]]\ncall = \"users.get\"\nexpose_as = \"me.get\"\n";
        let part = |call: &str| {
            format!(
                "{file}[[compose]]\nname = \"home.load\"\n[[compose.part]]\nkey = \"a\"\ncall = \"{call}\"\n"
            )
        };
        for routed in ["svc.list", "me.get"] {
            RouteTable::parse("r.toml", &part(routed)).unwrap();
        }
        // What a `service.*` route does not cover, and names clients do
        // not call (`users.get` is exposed as `me.get`).
        for unrouted in [
            "svc.9x",
            "svc.a-b",
            "svc._private",
            "svc.nuropb_describe",
            "users.get",
            "other.x",
        ] {
            let e = RouteTable::parse("r.toml", &part(unrouted)).unwrap_err();
            assert_eq!(e.line, 11, "{unrouted}: {e}");
            assert!(e.message.contains("is not routed"), "{unrouted}: {e}");
        }
        let t = RouteTable::parse("r.toml", file).unwrap();
        assert!(t.check_call("svc.list").is_ok());
        assert!(t.check_call("me.get").is_ok());
        for bad in ["svc.9x", "users.get", "svc", "svc.*"] {
            assert!(t.check_call(bad).is_err(), "{bad}");
        }
    }
}
