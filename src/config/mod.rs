//! Settings of a BFF: `config/default.toml` overridden by `BFF_*`
//! environment variables, one variable per setting, nested keys joined by a
//! double underscore (`BFF_LIMITS__MAX_FRAME_BYTES`). The runtime never reads
//! the environment itself: the binary passes `std::env::vars()` in.
//!
//! The set of keys (and so of variables) is read off [`Settings`] itself,
//! not kept in a second table: every key of [`Settings::every_key`] has a
//! variable, typed like the setting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `From<String>`, `From<&str>` and `From<&String>` for a newtype over a
/// `String`.
macro_rules! from_text {
    ($newtype:ident) => {
        impl From<String> for $newtype {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $newtype {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<&String> for $newtype {
            fn from(s: &String) -> Self {
                Self(s.clone())
            }
        }
    };
}

mod auth;
mod events;

pub use events::Events;

pub use auth::{
    ANY_AUDIENCE, AuthConfig, AuthMode, DEV_TOKEN_MARK, JwksSettings, JwtConfig, KeySource,
    MIN_SECRET_BYTES, Secret,
};

/// Per-connection limits. The defaults suit a browser frontend; every one is
/// a setting (`[limits]` in the file, `BFF_LIMITS__*` in the environment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest client frame accepted, in bytes; larger ones get `MessageTooLarge`.
    pub max_frame_bytes: usize,
    /// Requests one connection may have in flight; more get `RateLimited`.
    pub max_in_flight: usize,
    /// Frames queued towards one slow client before it is disconnected.
    pub outbound_queue: usize,
    /// Bytes queued towards one slow client before it is disconnected (one
    /// frame larger than this still goes into an empty queue).
    pub outbound_queue_bytes: usize,
    /// How long a connection without a handshake token has to authenticate.
    #[serde(rename = "auth_timeout_ms", with = "millis")]
    pub auth_timeout: Duration,
    /// How long one write to a client may take before the client is dropped.
    #[serde(rename = "write_timeout_ms", with = "millis")]
    pub write_timeout: Duration,
    /// Bytes a socket reads from its TCP stream at once, into a buffer it
    /// holds only while they are unread (an idle socket holds none): larger
    /// values mean fewer syscalls for clients that send much at once.
    pub read_buffer_bytes: usize,
    /// How long a client has to send its HTTP request headers.
    #[serde(rename = "handshake_timeout_ms", with = "millis")]
    pub handshake_timeout: Duration,
    /// Sockets open at once; past it, HTTP 503 before the upgrade.
    pub max_connections: usize,
    /// Sockets one user may hold; past it, HTTP 429 before the upgrade.
    pub max_connections_per_user: usize,
    /// How often each socket is pinged (one gateway task pings them, spread
    /// over the interval); one that answers neither two pings nor with any
    /// frame is closed with 1011.
    #[serde(rename = "ping_interval_ms", with = "millis")]
    pub ping_interval: Duration,
    /// Subscription patterns one socket may hold.
    pub max_subscriptions: usize,
    /// Sockets waiting to authenticate (upgraded without a token, before
    /// their `authenticate` frame); past it, HTTP 503 before the upgrade.
    pub max_unauthenticated: usize,
    /// The largest message body taken from the broker (a response, an
    /// event, a control message): a larger one is let go as it arrives,
    /// never buffered, counted in `bff_mesh_messages_dropped_total`, and
    /// the broker link stays up.
    pub max_mesh_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_in_flight: 64,
            outbound_queue: 256,
            outbound_queue_bytes: 8 << 20,
            auth_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            read_buffer_bytes: 2048,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_connections_per_user: 32,
            ping_interval: Duration::from_secs(25),
            max_subscriptions: 128,
            max_unauthenticated: 1000,
            max_mesh_message_bytes: 8 << 20,
        }
    }
}

/// The BFF's own methods on the mesh (bff-contract.md section 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshApi {
    /// The role a caller's token needs for `send_to_users`, `broadcast`
    /// and `disconnect_users`.
    pub push_role: String,
    /// The role a caller's token needs for `presence` (the push role
    /// will do too).
    pub presence_role: String,
    /// Let any broker peer push without a token: for closed development
    /// meshes only (logged as a warning at start).
    pub open: bool,
    /// How long a push waits for the other instances to report what they
    /// delivered.
    #[serde(rename = "gather_ms", with = "millis")]
    pub gather: Duration,
    /// How often each instance tells the others it is alive (and its
    /// counts, for `stats`).
    #[serde(rename = "heartbeat_ms", with = "millis")]
    pub heartbeat: Duration,
}

impl Default for MeshApi {
    fn default() -> Self {
        Self {
            push_role: "bff:push".into(),
            presence_role: "bff:presence".into(),
            open: false,
            gather: Duration::from_millis(1000),
            heartbeat: Duration::from_secs(5),
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A broker URL. Its `Debug` hides the password; [`BrokerUrl::as_str`]
/// (or `Deref` to `str`) is the URL itself.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***`: what logs show.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::ops::Deref for BrokerUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

from_text!(BrokerUrl);

/// `url` with the password of its user info replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// Everything a BFF binary needs to run.
///
/// Read from a file and `BFF_*` variables ([`Settings::load`]), or built
/// in code from [`Settings::new`]:
///
/// ```
/// use nuropb_bff::Settings;
///
/// let file = r#"
/// mesh_service_name = "shop-bff"
/// listen = "127.0.0.1:8080"
/// amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
/// routes = "routes.toml"
/// ws_path = "/ws"
/// auth = "jwt-hs256"
/// "#;
/// let env = [
///     ("BFF_JWT_SECRET", "a-secret-of-at-least-32-bytes-long"),
///     ("BFF_LIMITS__MAX_IN_FLIGHT", "8"),
/// ];
/// let env = env.map(|(k, v)| (k.to_owned(), v.to_owned()));
/// let (settings, warnings) = Settings::parse("default.toml", file, env)?;
/// assert_eq!(settings.limits.max_in_flight, 8);
/// assert!(warnings.is_empty());
/// assert!(!format!("{settings:?}").contains("a-secret"), "secrets stay out of Debug");
///
/// // Too short a secret outside development mode: refused, named.
/// let short = [("BFF_JWT_SECRET".to_owned(), "short".to_owned())];
/// let err = Settings::parse("default.toml", file, short).unwrap_err();
/// assert!(err.to_string().contains("at least 32"));
/// # Ok::<(), nuropb_bff::SettingsError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The BFF's own service name on the mesh.
    pub mesh_service_name: String,
    /// Socket address to listen on.
    pub listen: String,
    /// Broker URL; `memory://` runs on in-process echo services.
    pub amqp_url: BrokerUrl,
    /// Path of the routing file. It is read again on SIGHUP and, with
    /// `watch_routes`, when it changes; no other setting is.
    pub routes: PathBuf,
    /// Reload the routing file when it changes on disk (its directory is
    /// watched, so a ConfigMap's symlink swap is seen); false: on SIGHUP
    /// only.
    #[serde(default = "d_true")]
    pub watch_routes: bool,
    /// The WebSocket endpoint path.
    pub ws_path: String,
    pub auth: AuthMode,
    #[serde(default)]
    pub jwt_secret: Option<Secret>,
    #[serde(default)]
    pub jwt_public_key: Option<PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwt_issuer: Option<String>,
    #[serde(default)]
    pub jwt_audience: Option<String>,
    /// The signing algorithms accepted (`RS256`, `ES256`, `EdDSA`, ...);
    /// empty: every one the key's type allows. A token's header never
    /// widens this.
    #[serde(default)]
    pub jwt_algorithms: Vec<String>,
    /// The claim a token's roles are read from: an array of strings, or a
    /// space-separated string. `scope` counts as roles only when this says
    /// so (`roles_claim = "scope"`).
    #[serde(default = "d_roles_claim")]
    pub roles_claim: String,
    #[serde(default)]
    pub jwks: JwksSettings,
    /// Browser origins allowed to open a socket; `*` allows any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    #[serde(default = "d_log")]
    pub log: String,
    /// Distinguishes instances on the broker (a random id when unset).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The key the instances of this BFF seal their control messages with
    /// (HMAC-SHA256): the same on every instance, at least 32 bytes. Without
    /// it an instance works alone: pushes reach its own sockets only.
    #[serde(default)]
    pub cluster_key: Option<Secret>,
    #[serde(default = "d_grace")]
    pub shutdown_grace_ms: u64,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub mesh_api: MeshApi,
    /// The event log, each instance's window of it, and resumes.
    #[serde(default)]
    pub events: Events,
    /// Serve `GET /console` (a page to try calls) and `GET /client.ts` (the
    /// typed client) outside development mode too, where they are always on.
    #[serde(default)]
    pub console: bool,
    /// Publish `bff.{mesh_service_name}.connected`, `.disconnected`,
    /// `.subscribed` and `.unsubscribed` on the events exchange, for the
    /// services to react to sessions.
    #[serde(default)]
    pub lifecycle_events: bool,
    /// A routed `service.method` called on the user's behalf when a socket
    /// opens; its result rides in the `hello` event under `data` (or why it
    /// failed under `data_error`).
    #[serde(default)]
    pub hello_call: Option<String>,
    /// Where the BFF's spans go: an OpenTelemetry collector's OTLP/HTTP
    /// endpoint (`http://collector:4318`; `/v1/traces` is added to a URL
    /// without a path). Unset: no span is made or sent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The share of new traces whose spans are exported, 0 to 1. A call
    /// whose client sent a `traceparent` follows its sampled flag instead
    /// (parent-based).
    #[serde(default = "d_ratio")]
    pub otlp_sample_ratio: f64,
}

fn d_ratio() -> f64 {
    1.0
}

fn d_true() -> bool {
    true
}
fn d_grace() -> u64 {
    10_000
}
fn d_roles_claim() -> String {
    "roles".into()
}
fn d_log() -> String {
    "info".into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The prefix of every settings variable.
const ENV_PREFIX: &str = "BFF_";
/// Names the settings file itself; the binary reads it.
const CONFIG_VAR: &str = "BFF_CONFIG";

impl Settings {
    /// Settings for a gateway named `mesh_service_name` on the in-process
    /// mesh, listening on an ephemeral port, without authentication: the
    /// starting point of tests and benchmarks, which change what they need.
    pub fn new(mesh_service_name: impl Into<String>) -> Self {
        Self {
            mesh_service_name: mesh_service_name.into(),
            listen: "127.0.0.1:0".into(),
            amqp_url: "memory://".into(),
            routes: PathBuf::from("routes.toml"),
            watch_routes: true,
            ws_path: "/ws".into(),
            auth: AuthMode::None,
            jwt_secret: None,
            jwt_public_key: None,
            jwks_url: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_algorithms: Vec::new(),
            roles_claim: d_roles_claim(),
            jwks: JwksSettings::default(),
            allowed_origins: vec!["http://localhost:3000".into()],
            log: d_log(),
            instance_id: None,
            cluster_key: None,
            shutdown_grace_ms: d_grace(),
            limits: Limits::default(),
            mesh_api: MeshApi::default(),
            events: Events::default(),
            hello_call: None,
            console: false,
            lifecycle_events: false,
            otlp_endpoint: None,
            otlp_sample_ratio: d_ratio(),
        }
    }

    /// Settings with every optional key present: the source of the list of
    /// keys (and environment variables) the loader accepts.
    fn every_key() -> Self {
        Self {
            jwt_secret: Some(Secret::default()),
            jwt_public_key: Some(PathBuf::new()),
            jwks_url: Some(String::new()),
            jwt_issuer: Some(String::new()),
            jwt_audience: Some(String::new()),
            instance_id: Some("x".into()),
            cluster_key: Some(Secret::default()),
            hello_call: Some("x.y".into()),
            otlp_endpoint: Some(String::new()),
            ..Self::new("x")
        }
    }

    /// Read `path`, apply `BFF_*` overrides from `env`, validate. Unknown
    /// `BFF_*` variables come back as warnings (a typo should be visible).
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Vec<String>), SettingsError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError::File {
            file: file.clone(),
            message: format!("cannot read the settings file: {e}"),
        })?;
        Self::parse(&file, &text, env)
    }

    /// [`Settings::load`] from text; `file` names it in errors.
    pub fn parse(
        file: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Vec<String>), SettingsError> {
        let file_err = |message: String| SettingsError::File {
            file: file.to_owned(),
            message,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            file_err(match line {
                Some(l) => format!("line {l}: {}", e.message().trim()),
                None => e.message().trim().to_owned(),
            })
        })?;
        let schema = toml::Table::try_from(Self::every_key())
            .map_err(|e| SettingsError::Invalid(format!("settings schema: {e}")))?;
        let mut warnings = Vec::new();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_VAR)
            .collect();
        env.sort();
        for (key, value) in env {
            match env_override(&schema, &key, value)? {
                Some((path, value)) => insert_path(&mut table, &path, value),
                None => warnings.push(format!("unknown environment variable {key} ignored")),
            }
        }
        let settings: Settings = table
            .try_into()
            .map_err(|e: toml::de::Error| file_err(e.message().trim().to_owned()))?;
        settings.validate()?;
        Ok((settings, warnings))
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!(
                "listen (BFF_LISTEN) must be a socket address like 127.0.0.1:8080, found `{}`",
                self.listen
            ));
        }
        if !crate::routing::is_name(&self.mesh_service_name) {
            return bad(format!(
                "mesh_service_name must be letters, digits, `_` or `-`, found `{}`",
                self.mesh_service_name
            ));
        }
        let l = &self.limits;
        if !(512..=1 << 20).contains(&l.read_buffer_bytes) {
            return bad(format!(
                "limits.read_buffer_bytes must be between 512 and 1048576, found {}",
                l.read_buffer_bytes
            ));
        }
        for (name, value) in [
            ("max_frame_bytes", l.max_frame_bytes),
            ("max_in_flight", l.max_in_flight),
            ("outbound_queue", l.outbound_queue),
            ("outbound_queue_bytes", l.outbound_queue_bytes),
            ("max_connections", l.max_connections),
            ("max_connections_per_user", l.max_connections_per_user),
            ("max_subscriptions", l.max_subscriptions),
            ("max_unauthenticated", l.max_unauthenticated),
            ("max_mesh_message_bytes", l.max_mesh_message_bytes),
        ] {
            if value == 0 {
                return bad(format!("limits.{name} must be at least 1"));
            }
        }
        check_millis(
            "limits",
            &[
                ("auth_timeout_ms", l.auth_timeout),
                ("write_timeout_ms", l.write_timeout),
                ("handshake_timeout_ms", l.handshake_timeout),
                ("ping_interval_ms", l.ping_interval),
            ],
            Duration::from_secs(24 * 3600),
        )?;
        if let Some(id) = &self.instance_id
            && !(crate::routing::is_name(id) && id.len() <= 64)
        {
            return bad(format!(
                "instance_id (BFF_INSTANCE_ID) must be up to 64 letters, digits, `_` or `-`, found `{id}`"
            ));
        }
        if let Some(call) = &self.hello_call
            && !matches!(crate::routing::parse_call(call), Ok((_, Some(_))))
        {
            return bad(format!(
                "hello_call (BFF_HELLO_CALL) must be a routed `service.method`, found `{call}`"
            ));
        }
        if let Some(key) = self.cluster_key.as_ref().filter(|k| !k.is_empty())
            && key.len() < MIN_SECRET_BYTES
            && !self.is_memory_mesh()
        {
            return bad(format!(
                "cluster_key (BFF_CLUSTER_KEY) is {} bytes; at least {MIN_SECRET_BYTES} are needed \
                 (make one with `openssl rand -base64 48`, the same for every instance)",
                key.len()
            ));
        }
        let m = &self.mesh_api;
        if m.push_role.trim().is_empty() || m.presence_role.trim().is_empty() {
            return bad("mesh_api.push_role and mesh_api.presence_role must not be empty".into());
        }
        check_millis(
            "mesh_api",
            &[("gather_ms", m.gather), ("heartbeat_ms", m.heartbeat)],
            Duration::from_secs(3600),
        )?;
        self.events.validate()?;
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            return bad(format!(
                "otlp_sample_ratio (BFF_OTLP_SAMPLE_RATIO) must be between 0 and 1, found {}",
                self.otlp_sample_ratio
            ));
        }
        if let Some(endpoint) = self.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
            crate::spans::traces_url(endpoint).map_err(SettingsError::Invalid)?;
        }
        if !self.ws_path.starts_with('/') {
            return bad(format!(
                "ws_path must start with `/`, found `{}`",
                self.ws_path
            ));
        }
        self.auth_config()?;
        Ok(())
    }

    /// How long shutdown waits for connections and the mesh.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// True when the settings ask for the in-process development mesh.
    pub fn is_memory_mesh(&self) -> bool {
        self.amqp_url.starts_with("memory://")
    }
}

/// Each of a section's durations is at least 10 ms and at most `max`.
fn check_millis(
    section: &str,
    values: &[(&str, Duration)],
    max: Duration,
) -> Result<(), SettingsError> {
    for (name, value) in values {
        if *value < Duration::from_millis(10) || *value > max {
            return Err(SettingsError::Invalid(format!(
                "{section}.{name} must be between 10 and {} ms, found {}",
                max.as_millis(),
                value.as_millis()
            )));
        }
    }
    Ok(())
}

/// The setting a `BFF_*` variable names and its value typed like that
/// setting; `None` when no setting has that name.
fn env_override(
    schema: &toml::Table,
    var: &str,
    value: String,
) -> Result<Option<(Vec<String>, toml::Value)>, SettingsError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    let mut at = schema;
    let mut kind = None;
    for (i, key) in path.iter().enumerate() {
        match at.get(key) {
            Some(toml::Value::Table(t)) if i + 1 < path.len() => at = t,
            Some(v) if i + 1 == path.len() => kind = Some(v),
            _ => return Ok(None),
        }
    }
    let Some(kind) = kind else { return Ok(None) };
    let wrong = |expected: &str| {
        SettingsError::Invalid(format!("{var} must be {expected}, found `{value}`"))
    };
    let typed = match kind {
        toml::Value::String(_) => toml::Value::String(value.clone()),
        toml::Value::Integer(_) => {
            toml::Value::Integer(value.trim().parse().map_err(|_| wrong("a whole number"))?)
        }
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(value.trim().parse().map_err(|_| wrong("true or false"))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(value.trim().parse().map_err(|_| wrong("a number"))?)
        }
        toml::Value::Array(_) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        toml::Value::Table(_) => {
            return Err(SettingsError::Invalid(format!(
                "{var} names a section; set its keys, like {var}__KEY"
            )));
        }
        toml::Value::Datetime(_) => return Err(wrong("a date")),
    };
    Ok(Some((path, typed)))
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in parents {
        let entry = at
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(t) = entry else { return };
        at = t;
    }
    at.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
mesh_service_name = "web-bff"
listen = "127.0.0.1:8080"
amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
routes = "routes.toml"
ws_path = "/ws"
auth = "jwt-hs256"
allowed_origins = ["http://localhost:3000"]
"#;

    /// A secret long enough outside development mode.
    const K: &str = "k-k-k-k-k-k-k-k-k-k-k-k-k-k-k-k-k";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_the_file() {
        let (s, warnings) = Settings::parse(
            "default.toml",
            BASE,
            env(&[
                ("BFF_JWT_SECRET", K),
                ("BFF_LISTEN", "0.0.0.0:9000"),
                (
                    "BFF_ALLOWED_ORIGINS",
                    "https://a.example, https://b.example",
                ),
                ("BFF_TYPO", "x"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen, "0.0.0.0:9000");
        assert_eq!(s.jwt_secret.as_ref().map(Secret::expose), Some(K));
        assert_eq!(
            s.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(
            warnings,
            vec!["unknown environment variable BFF_TYPO ignored"]
        );
        assert!(
            !format!("{s:?}").contains("\"k\""),
            "secret must not be in Debug"
        );
        assert!(!format!("{s:?}").contains("guest:guest"), "{s:?}");
    }

    #[test]
    fn jwks_settings_need_an_issuer_and_sane_bounds() {
        let jwks = BASE.replace("jwt-hs256", "jwks");
        let err = Settings::parse("d.toml", &jwks, env(&[])).unwrap_err();
        assert!(err.to_string().contains("BFF_JWT_ISSUER"), "{err}");
        let (s, warnings) = Settings::parse(
            "d.toml",
            &jwks,
            env(&[
                ("BFF_JWT_ISSUER", "https://idp.example.com"),
                ("BFF_JWT_AUDIENCE", "shop"),
                ("BFF_JWKS__MIN_REFRESH_MS", "1500"),
                ("BFF_JWT_ALGORITHMS", "ES256, RS256"),
            ]),
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(s.auth, AuthMode::Jwks);
        assert_eq!(s.jwks.min_refresh, Duration::from_millis(1500));
        assert_eq!(s.jwt_algorithms, ["ES256", "RS256"]);
        let issuer = ("BFF_JWT_ISSUER", "https://idp.example.com");
        let err = Settings::parse("d.toml", &jwks, env(&[issuer])).unwrap_err();
        assert!(err.to_string().contains("BFF_JWT_AUDIENCE"), "{err}");
        let issuer = ("BFF_JWT_AUDIENCE", "*");
        let issuer_too = ("BFF_JWT_ISSUER", "https://idp.example.com");
        for (var, value, named) in [
            ("BFF_JWT_ALGORITHMS", "none", "jwt_algorithms"),
            ("BFF_JWKS__FETCH_TIMEOUT_MS", "0", "fetch_timeout_ms"),
            ("BFF_JWKS__MIN_MAX_AGE_MS", "999999999", "min_max_age_ms"),
        ] {
            let err = Settings::parse("d.toml", &jwks, env(&[issuer, issuer_too, (var, value)]))
                .unwrap_err();
            assert!(err.to_string().contains(named), "{var}: {err}");
        }
    }

    #[test]
    fn nested_settings_have_variables_typed_like_the_setting() {
        let (s, warnings) = Settings::parse(
            "d.toml",
            BASE,
            env(&[
                ("BFF_JWT_SECRET", "12345678901234567890123456789012"),
                ("BFF_LIMITS__MAX_FRAME_BYTES", "1000"),
                ("BFF_LIMITS__AUTH_TIMEOUT_MS", "250"),
                ("BFF_SHUTDOWN_GRACE_MS", "7"),
                ("BFF_EVENTS__RECOVER_MAX", "50"),
                ("BFF_WATCH_ROUTES", "false"),
                ("BFF_LIMITS__NOPE", "1"),
                ("BFF_CONFIG", "elsewhere.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.jwt_secret.as_ref().map(Secret::expose),
            Some("12345678901234567890123456789012"),
            "a string stays one"
        );
        assert_eq!(s.limits.max_frame_bytes, 1000);
        assert_eq!(s.limits.auth_timeout, Duration::from_millis(250));
        assert_eq!(s.shutdown_grace_ms, 7);
        assert_eq!(s.events.recover_max, 50);
        assert!(!s.watch_routes);
        assert_eq!(
            s.events.history_max_age_s, 300,
            "the rest keep their defaults"
        );
        assert_eq!(
            warnings,
            vec!["unknown environment variable BFF_LIMITS__NOPE ignored"]
        );
        let e = Settings::parse(
            "d.toml",
            BASE,
            env(&[("BFF_JWT_SECRET", K), ("BFF_LIMITS__MAX_IN_FLIGHT", "lots")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("BFF_LIMITS__MAX_IN_FLIGHT"), "{e}");
        assert!(e.to_string().contains("whole number"), "{e}");
        let e = Settings::parse("d.toml", BASE, env(&[("BFF_LIMITS", "1")])).unwrap_err();
        assert!(e.to_string().contains("BFF_LIMITS__KEY"), "{e}");
    }

    #[test]
    fn hs256_without_a_secret_refuses_to_start() {
        let e = Settings::parse("default.toml", BASE, env(&[])).unwrap_err();
        assert!(e.to_string().contains("BFF_JWT_SECRET"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Settings::parse(
            "d.toml",
            BASE,
            env(&[("BFF_JWT_SECRET", K), ("BFF_LISTEN", "nope")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("BFF_LISTEN"), "{e}");
        let e =
            Settings::parse("d.toml", &BASE.replace("jwt-hs256", "magic"), env(&[])).unwrap_err();
        assert!(e.to_string().starts_with("d.toml: "), "{e}");
        assert!(e.to_string().contains("magic"), "{e}");
        let e = Settings::parse("d.toml", "listen = ", env(&[])).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = Settings::parse("d.toml", &format!("{BASE}\ncolour = 1\n"), env(&[])).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = Settings::parse(
            "d.toml",
            &format!("{BASE}\n[events]\nwindow_events = 0\n"),
            env(&[("BFF_JWT_SECRET", K)]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("events.window_events"), "{e}");
        let e = Settings::parse(
            "d.toml",
            &format!("{BASE}\n[limits]\nmax_in_flight = 0\n"),
            env(&[("BFF_JWT_SECRET", K)]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("limits.max_in_flight"), "{e}");
    }

    #[test]
    fn the_read_buffer_is_bounded() {
        let with = |n: usize| format!("{BASE}\n[limits]\nread_buffer_bytes = {n}\n");
        let secret = || env(&[("BFF_JWT_SECRET", K)]);
        let (s, _) = Settings::parse("d.toml", &with(2048), secret()).unwrap();
        assert_eq!(s.limits.read_buffer_bytes, 2048);
        for bad in [0, 100, 2 << 20] {
            let e = Settings::parse("d.toml", &with(bad), secret()).unwrap_err();
            assert!(e.to_string().contains("read_buffer_bytes"), "{e}");
        }
    }

    #[test]
    fn the_test_settings_are_valid() {
        Settings::new("t").validate().unwrap();
        Settings::every_key().validate().unwrap();
    }
}
