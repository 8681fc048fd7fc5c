//! Settings of a BFF: `config/default.toml` overridden by `BFF_*`
//! environment variables. The runtime never reads the environment itself:
//! the binary passes `std::env::vars()` in.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::gateway::{GatewayConfig, Limits};

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMode {
    #[serde(rename = "jwt-hs256")]
    JwtHs256,
    #[serde(rename = "jwt-rs256")]
    JwtRs256,
    #[serde(rename = "none")]
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    #[serde(default = "d_max_frame")]
    pub max_frame_bytes: usize,
    #[serde(default = "d_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "d_queue")]
    pub outbound_queue: usize,
    #[serde(default = "d_auth_timeout")]
    pub auth_timeout_ms: u64,
    #[serde(default = "d_write_timeout")]
    pub write_timeout_ms: u64,
    /// Bytes a socket reads at a time; each socket holds a buffer this
    /// size for its lifetime, so it is the biggest part of an idle socket's
    /// memory.
    #[serde(default = "d_read_buffer")]
    pub read_buffer_bytes: usize,
}

fn d_max_frame() -> usize {
    Limits::default().max_frame_bytes
}
fn d_in_flight() -> usize {
    Limits::default().max_in_flight
}
fn d_queue() -> usize {
    Limits::default().outbound_queue
}
fn d_read_buffer() -> usize {
    Limits::default().read_buffer_bytes
}
fn d_auth_timeout() -> u64 {
    10_000
}
fn d_write_timeout() -> u64 {
    10_000
}
fn d_grace() -> u64 {
    10_000
}
fn d_log() -> String {
    "info".into()
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_frame_bytes: d_max_frame(),
            max_in_flight: d_in_flight(),
            outbound_queue: d_queue(),
            auth_timeout_ms: d_auth_timeout(),
            write_timeout_ms: d_write_timeout(),
            read_buffer_bytes: d_read_buffer(),
        }
    }
}

/// Everything a BFF binary needs to run.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub mesh_service_name: String,
    pub listen: String,
    pub amqp_url: String,
    pub routes: PathBuf,
    pub ws_path: String,
    pub auth: AuthMode,
    #[serde(default)]
    pub jwt_secret: Option<String>,
    #[serde(default)]
    pub jwt_public_key: Option<PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwt_issuer: Option<String>,
    #[serde(default)]
    pub jwt_audience: Option<String>,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    #[serde(default = "d_log")]
    pub log: String,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default = "d_grace")]
    pub shutdown_grace_ms: u64,
    #[serde(default)]
    pub limits: LimitSettings,
}

impl std::fmt::Debug for Settings {
    // The secret stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("mesh_service_name", &self.mesh_service_name)
            .field("listen", &self.listen)
            .field("amqp_url", &crate::mesh::amqp::redact_url(&self.amqp_url))
            .field("routes", &self.routes)
            .field("ws_path", &self.ws_path)
            .field("auth", &self.auth)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("allowed_origins", &self.allowed_origins)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The `BFF_*` variables and the setting each one overrides.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("BFF_LISTEN", "listen"),
    ("BFF_AMQP_URL", "amqp_url"),
    ("BFF_ROUTES", "routes"),
    ("BFF_JWT_SECRET", "jwt_secret"),
    ("BFF_JWT_PUBLIC_KEY", "jwt_public_key"),
    ("BFF_JWKS_URL", "jwks_url"),
    ("BFF_JWT_ISSUER", "jwt_issuer"),
    ("BFF_JWT_AUDIENCE", "jwt_audience"),
    ("BFF_LOG", "log"),
    ("BFF_ALLOWED_ORIGINS", "allowed_origins"),
    ("BFF_MESH_SERVICE_NAME", "mesh_service_name"),
    ("BFF_INSTANCE_ID", "instance_id"),
    ("BFF_WS_PATH", "ws_path"),
];

impl Settings {
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
        let mut warnings = Vec::new();
        for (key, value) in env {
            // BFF_CONFIG names the settings file itself; the binary reads it.
            if !key.starts_with("BFF_") || key == "BFF_CONFIG" {
                continue;
            }
            let Some((_, setting)) = ENV_OVERRIDES.iter().find(|(k, _)| *k == key) else {
                warnings.push(format!("unknown environment variable {key} ignored"));
                continue;
            };
            let v = if *setting == "allowed_origins" {
                toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_owned()))
                        .collect(),
                )
            } else {
                toml::Value::String(value)
            };
            table.insert((*setting).to_owned(), v);
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
        if !(512..=1 << 20).contains(&self.limits.read_buffer_bytes) {
            return bad(format!(
                "limits.read_buffer_bytes must be between 512 and 1048576, found {}",
                self.limits.read_buffer_bytes
            ));
        }
        if !self.ws_path.starts_with('/') {
            return bad(format!(
                "ws_path must start with `/`, found `{}`",
                self.ws_path
            ));
        }
        match self.auth {
            AuthMode::JwtHs256 if self.jwt_secret.as_deref().is_none_or(str::is_empty) => bad(
                "auth is jwt-hs256 but no secret is set: set BFF_JWT_SECRET (or jwt_secret in the settings file)".into(),
            ),
            AuthMode::JwtRs256 if self.jwt_public_key.is_none() => bad(
                "auth is jwt-rs256 but no key is set: set BFF_JWT_PUBLIC_KEY to the path of a PEM public key".into(),
            ),
            _ => Ok(()),
        }
    }

    pub fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig {
            mesh_service_name: self.mesh_service_name.clone(),
            ws_path: self.ws_path.clone(),
            allowed_origins: self.allowed_origins.clone(),
            limits: Limits {
                max_frame_bytes: self.limits.max_frame_bytes,
                max_in_flight: self.limits.max_in_flight.max(1),
                outbound_queue: self.limits.outbound_queue.max(1),
                auth_timeout: Duration::from_millis(self.limits.auth_timeout_ms),
                write_timeout: Duration::from_millis(self.limits.write_timeout_ms),
                read_buffer_bytes: self.limits.read_buffer_bytes,
            },
        }
    }

    /// True when the settings ask for the in-process development mesh.
    pub fn is_memory_mesh(&self) -> bool {
        self.amqp_url.starts_with("memory://")
    }
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
                ("BFF_JWT_SECRET", "k"),
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
        assert_eq!(s.jwt_secret.as_deref(), Some("k"));
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
            env(&[("BFF_JWT_SECRET", "k"), ("BFF_LISTEN", "nope")]),
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
    }

    #[test]
    fn the_read_buffer_is_bounded_and_reaches_the_gateway() {
        let with = |n: usize| format!("{BASE}\n[limits]\nread_buffer_bytes = {n}\n");
        let secret = || env(&[("BFF_JWT_SECRET", "k")]);
        let (s, _) = Settings::parse("d.toml", &with(2048), secret()).unwrap();
        assert_eq!(s.gateway_config().limits.read_buffer_bytes, 2048);
        for bad in [0, 100, 2 << 20] {
            let e = Settings::parse("d.toml", &with(bad), secret()).unwrap_err();
            assert!(e.to_string().contains("read_buffer_bytes"), "{e}");
        }
    }
}
