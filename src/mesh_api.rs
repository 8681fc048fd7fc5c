//! The BFF on the mesh: the methods other services call on it
//! (`send_to_users`, `broadcast`, `disconnect_users`, `stats`,
//! `nuropb_describe`), and the fan-out of mesh events to sessions by the
//! routing file's event rules.
//!
//! Pushes are guarded and clustered (bff-contract.md section 5): a caller
//! proves it may push with a token the BFF's own verifier accepts and whose
//! roles include `mesh_api.push_role`. The instance that takes the call
//! from the shared service queue fans it out to every instance over the
//! BFF's control exchange; each instance checks the caller's token itself,
//! applies the push once to its own sockets and reports its count back to
//! the origin, which answers with the total.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::bearer_token;
use crate::cluster::{Ack, Cluster};
use crate::history;
use crate::hub::Hub;
use crate::mesh::{
    BoxFuture, IncomingEvent, IncomingRequest, MeshError, MeshHandler, unknown_method,
};
use crate::protocol::{ErrorBody, RawJson, ServerFrame, close};
use crate::recovery;
use crate::routing::Delivery;
use crate::seal::Unsealed;
use crate::throttle::Throttle;

/// A control message on its way out, and where to.
#[derive(Debug)]
pub(crate) enum ControlOut {
    /// To every instance, this one included.
    All(Value),
    /// To one instance.
    To(String, Value),
}

/// A control message and, when the sender waits for it, where to say
/// whether the broker took it.
pub(crate) type ControlItem = (ControlOut, Option<oneshot::Sender<Result<(), MeshError>>>);

/// Control messages waiting to be published.
pub(crate) const CONTROL_OUTBOX: usize = 1024;

/// The handler the mesh calls for requests, events and control messages
/// addressed to the BFF.
#[derive(Debug)]
pub(crate) struct BffService {
    hub: Hub,
    cluster: Arc<Cluster>,
    /// Control messages go out through the gateway, which owns the mesh.
    control: mpsc::Sender<ControlItem>,
    unsealed: UnsealedLog,
}

impl BffService {
    pub(crate) fn new(hub: Hub, cluster: Arc<Cluster>, control: mpsc::Sender<ControlItem>) -> Self {
        Self {
            hub,
            cluster,
            control,
            unsealed: UnsealedLog::default(),
        }
    }
}

/// A push, as the caller asked it and as it travels between instances.
#[derive(Debug, Clone, PartialEq)]
enum Push {
    ToUsers {
        users: Vec<String>,
        topic: String,
        message: Value,
    },
    All {
        topic: String,
        message: Value,
    },
    Disconnect {
        users: Vec<String>,
    },
}

impl Push {
    fn parse(method: &str, p: &Map<String, Value>) -> Result<Option<Self>, ErrorBody> {
        Ok(Some(match method {
            "send_to_users" => {
                let users = string_list(p, "user_ids")?;
                let (topic, message) = push_parts(p)?;
                Push::ToUsers {
                    users,
                    topic,
                    message,
                }
            }
            "broadcast" => {
                let (topic, message) = push_parts(p)?;
                Push::All { topic, message }
            }
            "disconnect_users" => Push::Disconnect {
                users: string_list(p, "user_ids")?,
            },
            _ => return Ok(None),
        }))
    }

    fn method(&self) -> &'static str {
        match self {
            Push::ToUsers { .. } => "send_to_users",
            Push::All { .. } => "broadcast",
            Push::Disconnect { .. } => "disconnect_users",
        }
    }

    fn params(&self) -> Value {
        match self {
            Push::ToUsers {
                users,
                topic,
                message,
            } => json!({"user_ids": users, "topic": topic, "message": message}),
            Push::All { topic, message } => json!({"topic": topic, "message": message}),
            Push::Disconnect { users } => json!({"user_ids": users}),
        }
    }

    /// What the caller's answer calls the count.
    fn counted(&self) -> &'static str {
        match self {
            Push::Disconnect { .. } => "disconnected",
            _ => "delivered",
        }
    }
}

/// The caller's token in a NuroPb context: `Authorization`, raw or
/// `Bearer `.
fn caller_token(context: &Map<String, Value>) -> Option<&str> {
    let raw = context.get("Authorization")?.as_str()?;
    bearer_token(raw).or_else(|| Some(raw.trim()).filter(|t| !t.is_empty()))
}

fn not_authorized(why: &str) -> ErrorBody {
    ErrorBody::new("NuropbAuthorizationError", why)
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
        description: "Push a message to every connection of these users, on every instance (requires a caller token with the push role)",
        params: &[
            ("user_ids", "list", None),
            ("message", "", None),
            ("topic", "str", Some("message")),
        ],
    },
    MethodDoc {
        name: "broadcast",
        description: "Push a message to every connection, on every instance (requires a caller token with the push role)",
        params: &[("message", "", None), ("topic", "str", Some("message"))],
    },
    MethodDoc {
        name: "disconnect_users",
        description: "Close every connection of these users, on every instance (requires a caller token with the push role)",
        params: &[("user_ids", "list", None)],
    },
    MethodDoc {
        name: "stats",
        description: "Connection counts of this instance and of the live instances it knows",
        params: &[],
    },
    MethodDoc {
        name: "presence",
        description: "For each user, the sessions open on every instance and on how many instances (at most 1000 users); needs the presence or push role",
        params: &[("user_ids", "list", None)],
    },
];

pub(crate) fn event_frame(topic: &str, event: RawJson, position: Option<u64>) -> Utf8Bytes {
    ServerFrame::Event {
        topic: topic.to_owned(),
        event,
        position,
    }
    .to_json()
    .into()
}

/// Users one `presence` call may ask about.
const MAX_PRESENCE_USERS: usize = 1000;

/// The users of a `presence` call: at most [`MAX_PRESENCE_USERS`] ids of
/// at most 255 bytes each.
fn presence_users(params: &Map<String, Value>) -> Result<Vec<String>, ErrorBody> {
    let users = string_list(params, "user_ids")?;
    if users.len() > MAX_PRESENCE_USERS {
        return Err(invalid(format!(
            "`user_ids` holds {} ids; at most {MAX_PRESENCE_USERS} may be asked at once",
            users.len()
        )));
    }
    if users.iter().any(|u| u.is_empty() || u.len() > 255) {
        return Err(invalid("each user id must be 1 to 255 bytes".into()));
    }
    let mut seen = HashSet::new();
    Ok(users
        .into_iter()
        .filter(|u| seen.insert(u.clone()))
        .collect())
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
            "authorization": if self.hub.settings().mesh_api.open {
                "none: mesh_api.open is set; any broker peer may push".to_owned()
            } else {
                format!(
                    "send_to_users, broadcast and disconnect_users need context.Authorization: \
                     a JWT this BFF accepts whose roles include `{}`; presence, `{}` or that one",
                    self.hub.settings().mesh_api.push_role,
                    self.hub.settings().mesh_api.presence_role
                )
            },
            "encrypted_methods": false,
            "warnings": [],
            "methods": methods,
        })
    }

    fn stats(&self) -> Value {
        let c = self.hub.sessions().counts();
        let (sessions, users) = (c.sessions as u64, c.users as u64);
        let cluster = self.cluster.counts(sessions, users, Instant::now());
        json!({
            "sessions": c.sessions,
            "users": c.users,
            "instance": self.cluster.me(),
            "cluster": {
                "instances": cluster.instances,
                "sessions": cluster.sessions,
                "user_sessions": cluster.user_sessions,
            },
        })
    }

    /// May the holder of `token` push? (Always, with `mesh_api.open`.)
    async fn may_push(&self, token: Option<&str>) -> Result<(), ErrorBody> {
        let role = self.hub.settings().mesh_api.push_role.clone();
        self.may(token, "a push", &[role]).await
    }

    /// May the holder of `token` do `what`: a token this BFF accepts with
    /// one of `roles`? (Always, with `mesh_api.open`.)
    async fn may(
        &self,
        token: Option<&str>,
        what: &str,
        roles: &[String],
    ) -> Result<(), ErrorBody> {
        let api = &self.hub.settings().mesh_api;
        if api.open {
            return Ok(());
        }
        let Some(token) = token else {
            return Err(not_authorized(&format!(
                "{what} needs a caller token in context.Authorization"
            )));
        };
        let identity = self
            .hub
            .auth()
            .authenticate(token)
            .await
            .map_err(|e| not_authorized(&format!("the caller token was refused: {e}")))?;
        if roles.iter().any(|r| identity.roles.contains(r)) {
            Ok(())
        } else {
            Err(not_authorized(&format!(
                "the caller token lacks the role `{}`",
                roles.join("` or `")
            )))
        }
    }

    /// This instance's sessions of each of `users`.
    fn local_presence(&self, users: &[String]) -> Vec<(String, u64)> {
        let sessions = self.hub.sessions();
        users
            .iter()
            .map(|u| (u.clone(), sessions.sessions_of(u).len() as u64))
            .collect()
    }

    /// For each of `users`, the sessions open on every instance of this
    /// BFF and on how many instances, gathered as a push's counts are.
    async fn presence_everywhere(&self, users: Vec<String>) -> Value {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let me = self.cluster.me().to_owned();
        let mut totals: std::collections::HashMap<&str, (u64, u64)> =
            users.iter().map(|u| (u.as_str(), (0, 0))).collect();
        let mut add = |counts: &[(String, u64)]| {
            for (u, n) in counts {
                if let Some(t) = totals.get_mut(u.as_str())
                    && *n > 0
                {
                    t.0 = t.0.saturating_add(*n);
                    t.1 += 1;
                }
            }
        };
        add(&self.local_presence(&users));
        let query = json!({"op": "presence_query", "id": id, "origin": me, "user_ids": users});
        let sealed = self.hub.seal().seal(query);
        let acks = sealed.as_ref().and_then(|_| self.cluster.gather(&id));
        if let (Some(body), Some(mut acks)) = (sealed, acks) {
            let expected = self.cluster.others(Instant::now());
            if self.send(ControlOut::All(body), true).await.is_ok() {
                for ack in self.gather(&mut acks, &expected).await {
                    // This instance counted itself above.
                    if ack.instance != me {
                        add(&ack.users);
                    }
                }
            }
            self.cluster.done(&id);
        }
        let out: Map<String, Value> = users
            .iter()
            .map(|u| {
                let (sessions, instances) = totals.get(u.as_str()).copied().unwrap_or((0, 0));
                (
                    u.clone(),
                    json!({"sessions": sessions, "instances": instances}),
                )
            })
            .collect();
        Value::Object(out)
    }

    /// Apply a push to this instance's sockets; how many it reached.
    async fn apply(&self, push: &Push) -> u64 {
        let sessions = self.hub.sessions();
        let metrics = self.hub.metrics();
        let n = match push {
            Push::ToUsers {
                users,
                topic,
                message,
            } => {
                let frame = event_frame(topic, RawJson::from_value(message), None);
                sessions.fan_out_to_users(users, frame).run().await
            }
            Push::All { topic, message } => {
                let frame = event_frame(topic, RawJson::from_value(message), None);
                sessions.fan_out_to_all(frame).run().await
            }
            Push::Disconnect { users } => {
                sessions.close_users(users, close::DISCONNECTED, "disconnected by the server")
            }
        };
        if !matches!(push, Push::Disconnect { .. }) {
            metrics.pushed(push.method(), n);
        }
        n as u64
    }

    /// Queue a control message; with `wait`, until the broker took it.
    async fn send(&self, out: ControlOut, wait: bool) -> Result<(), MeshError> {
        if !wait {
            return self
                .control
                .try_send((out, None))
                .map_err(|_| MeshError::Unavailable("control outbox full".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.control
            .send((out, Some(tx)))
            .await
            .map_err(|_| MeshError::Unavailable("gateway stopping".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(MeshError::Unavailable("gateway stopping".into())))
    }

    /// Fan a push out to every instance and gather their counts. The
    /// caller's token was checked here; the others believe the seal, so
    /// no token travels on the control exchange. Without a cluster key
    /// this instance works alone.
    async fn push_everywhere(&self, push: Push) -> Value {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let me = self.cluster.me().to_owned();
        let local_only = |n: u64| json!({push.counted(): n, "instances": 1});
        let message = json!({
            "op": "push",
            "id": id,
            "origin": me,
            "method": push.method(),
            "params": push.params(),
        });
        let sealed = self.hub.seal().seal(message);
        // Gathered only for a push that goes out: a keyless one does not.
        let acks = sealed.as_ref().and_then(|_| self.cluster.gather(&id));
        let (Some(body), Some(mut acks)) = (sealed, acks) else {
            self.cluster.first_time(&id, Instant::now());
            return local_only(self.apply(&push).await);
        };
        let expected: HashSet<String> = {
            let mut others = self.cluster.others(Instant::now());
            others.insert(me);
            others
        };
        if let Err(e) = self.send(ControlOut::All(body), true).await {
            // No broker to fan out with: this instance's sockets at least.
            tracing::debug!(error = %e, "push not fanned out; applied here only");
            self.cluster.done(&id);
            self.cluster.first_time(&id, Instant::now());
            return local_only(self.apply(&push).await);
        }
        let answers = self.gather(&mut acks, &expected).await;
        self.cluster.done(&id);
        let total = answers
            .iter()
            .fold(0u64, |total, ack| total.saturating_add(ack.count));
        json!({push.counted(): total, "instances": answers.len()})
    }

    /// The acks of a push or a presence query, one per instance, until
    /// every `expected` instance has answered or `mesh_api.gather_ms` is
    /// over.
    async fn gather(&self, acks: &mut mpsc::Receiver<Ack>, expected: &HashSet<String>) -> Vec<Ack> {
        let deadline = tokio::time::Instant::now() + self.hub.settings().mesh_api.gather;
        let mut answered = HashSet::new();
        let mut answers = Vec::new();
        while !expected.is_subset(&answered) {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(ack)) => {
                    if answered.insert(ack.instance.clone()) {
                        answers.push(ack);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        answers
    }

    /// Seal `ack` and send it to the instance `origin` that asked, without
    /// waiting (a full control outbox drops it: the origin stops waiting
    /// at its gather time).
    async fn answer(&self, origin: &str, ack: Value, what: &str) {
        let Some(ack) = self.hub.seal().seal(ack) else {
            return;
        };
        if self
            .send(ControlOut::To(origin.to_owned(), ack), false)
            .await
            .is_err()
        {
            tracing::debug!("{what} dropped: control outbox full");
        }
    }

    async fn call(&self, request: IncomingRequest) -> Result<Value, ErrorBody> {
        let method = request.method.as_str();
        match method {
            "nuropb_describe" => return Ok(self.describe()),
            "stats" => return Ok(self.stats()),
            "presence" => {
                let users = presence_users(&request.params)?;
                let api = &self.hub.settings().mesh_api;
                let roles = [api.presence_role.clone(), api.push_role.clone()];
                let token = caller_token(&request.context);
                if let Err(refused) = self.may(token, "presence", &roles).await {
                    self.hub.metrics().push_refused();
                    return Err(refused);
                }
                return Ok(self.presence_everywhere(users).await);
            }
            _ => {}
        }
        let Some(push) = Push::parse(method, &request.params)? else {
            return Err(unknown_method(self.hub.service_name(), method));
        };
        let token = caller_token(&request.context);
        if let Err(refused) = self.may_push(token).await {
            self.hub.metrics().push_refused();
            return Err(refused);
        }
        Ok(self.push_everywhere(push).await)
    }

    /// A control message from an instance of this BFF (maybe this one),
    /// believed only when its seal is right (see `seal`).
    async fn control(&self, sealed: Value) {
        let body = match self.hub.seal().open(&sealed) {
            Ok(body) => body,
            // Its own unsealed heartbeat, come back: nothing to say.
            Err(Unsealed::NoKey)
                if sealed.get("instance").and_then(Value::as_str) == Some(self.cluster.me()) =>
            {
                return;
            }
            Err(why) => {
                self.hub.metrics().control_dropped(why.label());
                self.unsealed.log(why);
                return;
            }
        };
        let text = |k: &str| body.get(k).and_then(Value::as_str);
        // Instance ids become routing keys (an ack goes to the origin's
        // response queue): the form a setting's instance_id has.
        let instance = |k: &str| text(k).filter(|i| i.len() <= 64 && crate::routing::is_name(i));
        let now = Instant::now();
        match text("op") {
            Some("push") => {
                let (Some(id), Some(origin), Some(method)) =
                    (text("id"), instance("origin"), text("method"))
                else {
                    return;
                };
                let Some(params) = body.get("params").and_then(Value::as_object) else {
                    return;
                };
                let Ok(Some(push)) = Push::parse(method, params) else {
                    return;
                };
                if !self.cluster.first_time(id, now) {
                    return;
                }
                let count = self.apply(&push).await;
                let ack =
                    json!({"op": "ack", "id": id, "instance": self.cluster.me(), "count": count});
                self.answer(origin, ack, "push ack").await;
            }
            Some("ack") => {
                let (Some(id), Some(instance), Some(count)) = (
                    text("id"),
                    instance("instance"),
                    body.get("count").and_then(Value::as_u64),
                ) else {
                    return;
                };
                let instance = instance.to_owned();
                // A presence answer: sessions by user (the origin keeps
                // only the users it asked about).
                let users = body
                    .get("users")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .take(MAX_PRESENCE_USERS)
                            .filter_map(|(u, n)| Some((u.clone(), n.as_u64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                self.cluster.acked(
                    id,
                    Ack {
                        instance,
                        count,
                        users,
                    },
                );
            }
            Some("presence_query") => {
                let (Some(id), Some(origin)) = (text("id"), instance("origin")) else {
                    return;
                };
                if origin == self.cluster.me() {
                    return;
                }
                let Ok(users) = presence_users(&body) else {
                    return;
                };
                let counts = self.local_presence(&users);
                let total: u64 = counts.iter().map(|c| c.1).sum();
                let users: Map<String, Value> =
                    counts.into_iter().map(|(u, n)| (u, json!(n))).collect();
                let ack = json!({"op": "ack", "id": id, "instance": self.cluster.me(), "count": total, "users": users});
                self.answer(origin, ack, "presence answer").await;
            }
            Some("presence") => {
                let count = |k: &str| body.get(k).and_then(Value::as_u64).unwrap_or(0);
                if let Some(instance) = instance("instance") {
                    if self
                        .cluster
                        .heard(instance, count("sessions"), count("users"), now)
                    {
                        // A new instance: it hears all of ours next.
                        self.hub.roster_in_full_next();
                    }
                    let pairs = |k: &str| -> Vec<(String, String)> {
                        body.get(k)
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(|p| {
                                        let p = p.as_array()?;
                                        Some((
                                            p.first()?.as_str()?.to_owned(),
                                            p.get(1)?.as_str()?.to_owned(),
                                        ))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    let closed: Vec<String> = body
                        .get("closed")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| Some(s.as_str()?.to_owned()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let full = body.get("full").and_then(Value::as_bool).unwrap_or(false);
                    if body.get("opened").is_some() {
                        self.cluster.roster(instance, full, pairs("opened"), closed);
                    }
                }
            }
            Some("leave") => {
                if let Some(instance) = instance("instance") {
                    self.cluster.left(instance);
                }
            }
            _ => {}
        }
    }

    /// Deliver a mesh event to the sessions its rule picks (a handler may
    /// rewrite or drop it first), and keep it in the event window when it
    /// has a log position (a resume replays from there; what is read from
    /// the log before this instance is live only goes there). Who may get it is
    /// found under the window's lock, with the event pushed to the window:
    /// a resume that begins after sees it in the window, and each session's
    /// own lock orders that resume's hold against this event's push to it
    /// (`session::Fanout::run`); the picks and the writes are made off the
    /// window's lock, spread over the workers.
    async fn fan_out(&self, event: IncomingEvent) {
        let hub = &self.hub;
        let (delivery, topic, fanout) = {
            let routes = hub.routes();
            let (live, position) = (event.live, event.position);
            let named = tracing::enabled!(tracing::Level::DEBUG).then(|| event.topic.clone());
            let Some((rule, entry)) = recovery::entry_of(hub, &routes, event) else {
                tracing::debug!(topic = ?named, "mesh event matches no event rule (or the handler dropped it)");
                return;
            };
            let mut log = hub.log();
            if position.is_some() && !log.push(entry.clone()) {
                return;
            }
            if !live {
                return;
            }
            let history::Entry {
                topic,
                target,
                frame,
                ..
            } = entry;
            let target = target.as_deref();
            // A targeted rule reaches no one without targets.
            let fanout = (rule.delivery != Delivery::Target || target.is_some()).then(|| {
                let subscribers = rule.delivery == Delivery::Subscribers;
                let roles = &rule.roles;
                hub.sessions()
                    .fan_out_event(&topic, target, subscribers, roles, frame, position)
            });
            drop(log);
            (rule.delivery, topic, fanout)
        };
        let n = match fanout {
            Some(fanout) => fanout.run().await,
            None => 0,
        };
        hub.metrics().pushed("event", n);
        tracing::debug!(topic = %&*topic, %delivery, sessions = n, "mesh event pushed");
    }
}

/// This instance's heartbeat, sealed: alive, and its counts. Without a
/// cluster key, only that it exists, unsealed: nothing believes it, but
/// another instance without a key says in its log that they run side by
/// side, each alone.
pub(crate) fn presence(hub: &Hub, instance: &str) -> Option<Value> {
    if !hub.seal().is_keyed() {
        return Some(json!({"op": "presence", "instance": instance}));
    }
    let c = hub.sessions().counts();
    let mut beat =
        json!({"op": "presence", "instance": instance, "sessions": c.sessions, "users": c.users});
    if let (Some(news), Value::Object(fields)) = (hub.roster_news(), &mut beat) {
        fields.insert("full".into(), json!(news.full));
        fields.insert("opened".into(), json!(news.opened));
        fields.insert("closed".into(), json!(news.closed));
    }
    hub.seal().seal(beat)
}

/// This instance is leaving, sealed.
pub(crate) fn leave(hub: &Hub, instance: &str) -> Option<Value> {
    hub.seal()
        .seal(json!({"op": "leave", "instance": instance}))
}

/// Logs, at most once a minute, why control messages are not believed.
#[derive(Debug)]
struct UnsealedLog(Throttle);

impl Default for UnsealedLog {
    fn default() -> Self {
        Self(Throttle::every(60))
    }
}

impl UnsealedLog {
    fn log(&self, why: Unsealed) {
        if !self.0.ready() {
            return;
        }
        match why {
            Unsealed::NoKey => tracing::warn!(
                "another instance of this BFF is on the broker, and this one has no cluster_key: each \
                 works alone (a push reaches only the sockets of the instance that took it); set \
                 BFF_CLUSTER_KEY, the same on every instance"
            ),
            other => tracing::warn!(
                reason = other.label(),
                "a control message was not believed (its seal is missing, wrong or stale): a peer \
                 without the cluster key, or instances with different keys"
            ),
        }
    }
}

impl MeshHandler for BffService {
    fn handle_request(&self, request: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        Box::pin(self.call(request))
    }

    fn handle_control(&self, body: Value) -> BoxFuture<'_, ()> {
        Box::pin(self.control(body))
    }

    fn handle_event(&self, event: IncomingEvent) -> BoxFuture<'_, ()> {
        Box::pin(self.fan_out(event))
    }

    fn handle_log_live(&self, position: u64) -> BoxFuture<'_, ()> {
        self.hub.log().go_live(position);
        tracing::info!(
            position,
            "the event log is read up to this instance's start"
        );
        Box::pin(async {})
    }

    fn log_gap(&self, position: u64) {
        self.hub.log().gap(position);
    }
}
