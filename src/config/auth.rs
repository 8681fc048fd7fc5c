//! The auth settings, read once: [`Settings::auth_config`] checks every
//! auth key together and hands back an [`AuthConfig`] that a verifier is
//! built from without checking anything again, so a setting has one rule and
//! one message. Secrets are [`Secret`]s, whose `Debug` never shows them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

use super::{Settings, SettingsError, check_millis, millis};

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMode {
    #[serde(rename = "jwt-hs256")]
    JwtHs256,
    /// A public key in PEM: RSA (RS*/PS*), EC P-256/P-384 (ES256/ES384)
    /// or Ed25519 (EdDSA); the key's type decides the algorithms.
    #[serde(rename = "jwt-rs256")]
    JwtRs256,
    /// Keys from a JWKS endpoint (`jwks_url`, or the OIDC discovery
    /// document of `jwt_issuer`), by `kid`, refreshed as they rotate.
    #[serde(rename = "jwks")]
    Jwks,
    #[serde(rename = "none")]
    None,
}

/// A credential in the settings (the HS* secret). Its `Debug` and
/// `Display` say `<redacted>`; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

from_text!(Secret);

/// Shorter HS* secrets are refused outside development mode: they can be
/// found by brute force from any one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The signing algorithms a BFF verifies, by their JOSE names.
const ALGORITHMS: [(&str, Algorithm); 12] = [
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

/// The algorithm a JOSE name stands for, among those a BFF verifies.
fn algorithm(name: &str) -> Option<Algorithm> {
    ALGORITHMS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, alg)| alg)
}

/// How a JWKS is fetched and cached (`[jwks]`, `BFF_JWKS__*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwksSettings {
    /// A token with a `kid` the cached set lacks makes at most one refetch
    /// per this interval (a flood of made-up `kid`s cannot hammer the
    /// identity provider).
    #[serde(rename = "min_refresh_ms", with = "millis")]
    pub min_refresh: Duration,
    /// How long one fetch (discovery and key set) may take.
    #[serde(rename = "fetch_timeout_ms", with = "millis")]
    pub fetch_timeout: Duration,
    /// How long a key set is used before it is fetched again when the
    /// response has no `Cache-Control: max-age`.
    #[serde(rename = "default_max_age_ms", with = "millis")]
    pub default_max_age: Duration,
    /// Bounds on a response's `max-age`.
    #[serde(rename = "min_max_age_ms", with = "millis")]
    pub min_max_age: Duration,
    #[serde(rename = "max_max_age_ms", with = "millis")]
    pub max_max_age: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        Self {
            min_refresh: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
            default_max_age: Duration::from_secs(300),
            min_max_age: Duration::from_secs(60),
            max_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl JwksSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        check_millis(
            "jwks",
            &[
                ("min_refresh_ms", self.min_refresh),
                ("fetch_timeout_ms", self.fetch_timeout),
                ("default_max_age_ms", self.default_max_age),
                ("min_max_age_ms", self.min_max_age),
                ("max_max_age_ms", self.max_max_age),
            ],
            Duration::from_secs(366 * 24 * 3600),
        )?;
        if self.min_max_age > self.max_max_age {
            return Err(SettingsError::Invalid(
                "jwks.min_max_age_ms must not exceed jwks.max_max_age_ms".into(),
            ));
        }
        Ok(())
    }
}

/// What a BFF's verifier is built from: the auth settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// `auth = "none"`: every connection is its own anonymous user.
    None,
    /// JWTs, verified with `keys`.
    Jwt(Box<JwtConfig>),
}

/// A JWT verifier's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub keys: KeySource,
    /// `aud` must be present and name this.
    pub audience: Option<String>,
    /// The algorithms accepted; empty: every one the key's type allows.
    pub algorithms: Vec<Algorithm>,
    /// The claim roles are read from: an array of strings, or a
    /// space-separated string (`scope`).
    pub roles_claim: String,
    /// Development mode (the in-process mesh): the only place a
    /// development token (`DEV_TOKEN_MARK`) is accepted.
    pub development: bool,
}

/// The claim that marks a development-mode token: a BFF outside
/// development mode refuses any token carrying it, even one signed with
/// its own secret.
pub const DEV_TOKEN_MARK: &str = "nuropb_bff_development";

/// What `jwt_audience` says to accept tokens for any audience.
pub const ANY_AUDIENCE: &str = "*";

/// Where a verifier's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A shared secret (HS256/384/512); `iss` must name `issuer` when set.
    Secret {
        secret: Secret,
        issuer: Option<String>,
    },
    /// A PEM public key file (RSA, EC P-256/P-384, Ed25519).
    PublicKey {
        path: PathBuf,
        issuer: Option<String>,
    },
    /// The identity provider's key set: `jwks_url`, or the one its OIDC
    /// discovery document names.
    Jwks {
        issuer: String,
        jwks_url: Option<String>,
        options: JwksSettings,
    },
}

fn non_empty(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl Settings {
    /// The auth settings, every rule checked here and only here: the
    /// verifier built from the answer checks nothing again.
    pub fn auth_config(&self) -> Result<AuthConfig, SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        self.jwks.validate()?;
        let algorithms = self
            .jwt_algorithms
            .iter()
            .map(|name| {
                algorithm(name).ok_or_else(|| {
                    let names: Vec<&str> = ALGORITHMS.iter().map(|(n, _)| *n).collect();
                    SettingsError::Invalid(format!(
                        "jwt_algorithms: `{name}` is not one of {}",
                        names.join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let issuer = non_empty(&self.jwt_issuer);
        let keys = match self.auth {
            AuthMode::None => return Ok(AuthConfig::None),
            AuthMode::JwtHs256 => {
                let Some(secret) = self.jwt_secret.as_ref().filter(|s| !s.is_empty()) else {
                    return bad("auth is jwt-hs256 but no secret is set: set BFF_JWT_SECRET (or jwt_secret in the settings file)".into());
                };
                if secret.len() < MIN_SECRET_BYTES && !self.is_memory_mesh() {
                    return bad(format!(
                        "BFF_JWT_SECRET is {} bytes; at least {MIN_SECRET_BYTES} are needed outside development mode \
                         (make one with `openssl rand -base64 48`)",
                        secret.len()
                    ));
                }
                KeySource::Secret {
                    secret: secret.clone(),
                    issuer,
                }
            }
            AuthMode::JwtRs256 => {
                let Some(path) = self.jwt_public_key.clone() else {
                    return bad("auth is jwt-rs256 but no key is set: set BFF_JWT_PUBLIC_KEY to the path of a PEM public key".into());
                };
                KeySource::PublicKey { path, issuer }
            }
            AuthMode::Jwks => {
                let Some(issuer) = issuer else {
                    return bad("auth is jwks but no issuer is set: set BFF_JWT_ISSUER (tokens must name it in `iss`; without BFF_JWKS_URL its OIDC discovery document names the key set)".into());
                };
                // An identity provider issues tokens for many clients:
                // without an audience, a token for any of them would do.
                if non_empty(&self.jwt_audience).is_none() && !self.is_memory_mesh() {
                    return bad(format!(
                        "auth is jwks but jwt_audience is not set: set BFF_JWT_AUDIENCE to the audience \
                         the identity provider puts in this BFF's tokens (its client id), or to `{ANY_AUDIENCE}` \
                         to accept tokens issued for any client of the provider"
                    ));
                }
                KeySource::Jwks {
                    issuer,
                    jwks_url: non_empty(&self.jwks_url),
                    options: self.jwks.clone(),
                }
            }
        };
        let roles_claim = self.roles_claim.trim();
        if roles_claim.is_empty() || roles_claim.len() > 128 {
            return bad("roles_claim must name a claim (for example `roles`, or `scope`)".into());
        }
        Ok(AuthConfig::Jwt(Box::new(JwtConfig {
            keys,
            audience: non_empty(&self.jwt_audience).filter(|a| a != ANY_AUDIENCE),
            algorithms,
            roles_claim: roles_claim.to_owned(),
            development: self.is_memory_mesh(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_in_debug_or_display() {
        let s = Secret::from("hunter2-hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2-hunter2");
        let mut settings = Settings::new("bff");
        settings.jwt_secret = Some(s);
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn every_algorithm_name_reads_back() {
        for (name, alg) in ALGORITHMS {
            assert_eq!(algorithm(name), Some(alg));
        }
        assert_eq!(algorithm("none"), None);
        assert_eq!(algorithm("hs256"), None, "names are case-sensitive");
    }

    #[test]
    fn the_auth_settings_are_checked_in_one_place() {
        let mut s = Settings::new("bff");
        assert_eq!(s.auth_config(), Ok(AuthConfig::None));
        s.auth = AuthMode::JwtHs256;
        let err = s.auth_config().unwrap_err().to_string();
        assert!(err.contains("BFF_JWT_SECRET"), "{err}");
        s.jwt_secret = Some("short".into());
        assert!(s.auth_config().is_ok(), "development mode takes any secret");
        s.amqp_url = "amqp://127.0.0.1".into();
        let err = s.auth_config().unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
        s.jwt_secret = Some("x".repeat(32).into());
        s.jwt_issuer = Some(String::new());
        s.jwt_algorithms = vec!["HS512".into()];
        let Ok(AuthConfig::Jwt(jwt)) = s.auth_config() else {
            panic!("a long secret is accepted")
        };
        assert_eq!(jwt.algorithms, [Algorithm::HS512]);
        assert!(
            matches!(jwt.keys, KeySource::Secret { issuer: None, .. }),
            "an empty issuer is none"
        );
        s.jwt_algorithms = vec!["none".into()];
        let err = s.auth_config().unwrap_err().to_string();
        assert!(err.contains("`none` is not one of HS256"), "{err}");

        let mut s = Settings::new("bff");
        s.auth = AuthMode::Jwks;
        let err = s.auth_config().unwrap_err().to_string();
        assert!(err.contains("BFF_JWT_ISSUER"), "{err}");
        s.jwt_issuer = Some("https://idp.example".into());
        assert!(
            s.auth_config().is_ok(),
            "development mode needs no audience"
        );
        s.amqp_url = "amqp://127.0.0.1".into();
        let err = s.auth_config().unwrap_err().to_string();
        assert!(err.contains("BFF_JWT_AUDIENCE"), "{err}");
        s.jwt_audience = Some("*".into());
        let Ok(AuthConfig::Jwt(jwt)) = s.auth_config() else {
            panic!("`*` accepts any audience")
        };
        assert_eq!(jwt.audience, None);
        s.jwt_audience = Some("shop".into());
        s.roles_claim = "scope".into();
        let Ok(AuthConfig::Jwt(jwt)) = s.auth_config() else {
            panic!("an audience")
        };
        assert_eq!(
            (jwt.audience.as_deref(), jwt.roles_claim.as_str()),
            (Some("shop"), "scope")
        );
        s.roles_claim = " ".into();
        assert!(s.auth_config().is_err());
        let mut s = Settings::new("bff");
        s.auth = AuthMode::Jwks;
        s.jwt_issuer = Some("https://idp.example".into());
        s.jwks.min_max_age = Duration::from_secs(10);
        s.jwks.max_max_age = Duration::from_secs(5);
        let err = s.auth_config().unwrap_err().to_string();
        assert!(err.contains("min_max_age_ms"), "{err}");
    }
}
