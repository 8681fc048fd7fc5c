//! Authentication: where a token comes from, how it is verified, and who it
//! names ([`Identity`]). JWT verification is shipped here; the generated
//! `auth.rs` implements [`AuthHook`] around it and maps claims.

mod jwks;
mod jwt;
mod key;

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::config::{AuthConfig, AuthMode, Settings};
use crate::error::RunError;
use crate::mesh::BoxFuture;

pub use jwks::JwksProvider;
pub use jwt::{ClaimsMapper, JwtVerifier};

/// A BFF's authentication hook.
///
/// The runtime's [`JwtVerifier`] is one (with [`JwtVerifier::map_claims`]
/// for a team's own claims); a BFF that takes other credentials writes its
/// own:
///
/// ```
/// use nuropb_bff::{AuthError, AuthHook, BoxFuture, Identity};
///
/// /// API keys of machine clients, each naming one user.
/// #[derive(Debug)]
/// struct ApiKeys(Vec<(String, String)>);
///
/// impl AuthHook for ApiKeys {
///     fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>> {
///         Box::pin(async move {
///             let (_, user) = self.0.iter().find(|(key, _)| key == token).ok_or(AuthError::Missing)?;
///             Ok(Identity {
///                 user_id: user.clone(),
///                 username: None,
///                 roles: vec!["machine".into()],
///                 token: None,
///                 expires_at: None,
///             })
///         })
///     }
/// }
/// # let keys = ApiKeys(vec![("k1".into(), "ann".into())]);
/// # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// # assert_eq!(rt.block_on(keys.authenticate("k1")).unwrap().user_id, "ann");
/// # assert!(rt.block_on(keys.authenticate("k2")).is_err());
/// ```
pub trait AuthHook: Send + Sync + fmt::Debug + 'static {
    /// Verify a token and say whom it names.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>>;

    /// The identity of a connection that presented no token, or `None` when a
    /// token is required (the default).
    fn anonymous(&self, session_id: &str) -> Option<Identity> {
        let _ = session_id;
        None
    }

    /// False while the hook cannot verify anything yet (a JWKS that has
    /// never loaded): `/readyz` answers 503 meanwhile.
    fn ready(&self) -> bool {
        true
    }

    /// Background work the hook needs (refreshing a key set); the gateway
    /// runs it until it stops.
    fn maintain(&self) -> Option<BoxFuture<'static, ()>> {
        None
    }
}

/// Who a connection acts for.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub username: Option<String>,
    pub roles: Vec<String>,
    /// The raw bearer token, forwarded to services as `Authorization`.
    pub token: Option<String>,
    /// Unix seconds after which the token is no longer valid.
    pub expires_at: Option<u64>,
}

impl fmt::Debug for Identity {
    // The token is a credential: never in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("roles", &self.roles)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Identity {
    /// The contract's claim mapping: `sub` is the user id, `name` or
    /// `preferred_username` the user name, `roles` (an array, or a
    /// space-separated string) the roles, `exp` the expiry. `scope` is not
    /// read: see [`Identity::from_claims_with`].
    pub fn from_claims(token: &str, claims: &Map<String, Value>) -> Result<Self, AuthError> {
        Self::from_claims_with(token, claims, "roles")
    }

    /// [`Identity::from_claims`], the roles read from `roles_claim` (the
    /// `roles_claim` setting: `scope` counts as roles only when it names
    /// it).
    pub fn from_claims_with(
        token: &str,
        claims: &Map<String, Value>,
        roles_claim: &str,
    ) -> Result<Self, AuthError> {
        let user_id = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::Invalid("the token has no `sub` claim".into())),
        };
        let username = claims
            .get("name")
            .or_else(|| claims.get("preferred_username"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let roles = match claims.get(roles_claim) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            user_id,
            username,
            roles,
            token: Some(token.to_owned()),
            expires_at: claims.get("exp").and_then(unix_seconds),
        })
    }
}

/// A NumericDate claim as whole seconds: an integer, or a fraction rounded
/// down (a token never lives longer than it says). Negative, infinite or
/// non-numeric values are not dates.
fn unix_seconds(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.floor() as u64)
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token was presented")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// No authentication: every connection is its own anonymous user. For
/// public data and local development only.
#[derive(Debug, Clone, Default)]
pub struct NoAuth;

impl AuthHook for NoAuth {
    fn authenticate<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>> {
        Box::pin(async { Err(AuthError::Invalid("this BFF does not accept tokens".into())) })
    }

    fn anonymous(&self, session_id: &str) -> Option<Identity> {
        Some(Identity {
            user_id: format!("anonymous-{session_id}"),
            username: None,
            roles: Vec::new(),
            token: None,
            expires_at: None,
        })
    }
}

/// The token of a `Bearer <token>` value (either case of `Bearer`), if it
/// names one.
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim();
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?
        .trim();
    (!token.is_empty()).then_some(token)
}

/// The token of a WebSocket handshake, in the contract's order:
/// `Authorization: Bearer`, the `access_token` cookie, the `access_token`
/// query parameter.
pub(crate) fn handshake_token(headers: &HeaderMap, query_token: Option<&str>) -> Option<String> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if let Some(t) = bearer {
        return Some(t.to_owned());
    }
    let cookie = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, v)| *k == "access_token" && !v.is_empty())
        .map(|(_, v)| v.to_owned());
    cookie.or_else(|| query_token.filter(|t| !t.is_empty()).map(str::to_owned))
}

/// Sign `claims` with an HS256 `secret`: the token a
/// [`JwtVerifier::hs256`] with the same secret verifies.
pub(crate) fn sign_hs256(
    secret: &[u8],
    claims: &impl serde::Serialize,
) -> Result<String, AuthError> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| AuthError::Invalid(e.to_string()))
}

/// An HS256 token for `sub` that a [`JwtVerifier::hs256`] with the same
/// secret, issuer and audience accepts; for development mode, where the
/// frontend needs a token before any identity provider is wired up.
pub(crate) fn hs256_dev_token(
    secret: &[u8],
    sub: &str,
    ttl_secs: u64,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    let mut claims = Map::new();
    claims.insert("sub".into(), sub.into());
    claims.insert("name".into(), sub.into());
    claims.insert("exp".into(), (unix_now() + ttl_secs).into());
    // Marked: a BFF outside development mode refuses it, even one that
    // shares the secret.
    claims.insert(crate::config::DEV_TOKEN_MARK.into(), true.into());
    if let Some(iss) = issuer {
        claims.insert("iss".into(), iss.into());
    }
    if let Some(aud) = audience {
        claims.insert("aud".into(), aud.into());
    }
    sign_hs256(secret, &claims)
}

/// The JWT verifier the settings describe (`jwt-hs256`: a secret;
/// `jwt-rs256`: a PEM public key; `jwks`: the identity provider's key set),
/// restricted to `jwt_algorithms` when set. The settings are checked by
/// [`Settings::auth_config`], with its messages.
pub fn jwt_verifier_from_settings(settings: &Settings) -> Result<JwtVerifier, RunError> {
    match settings
        .auth_config()
        .map_err(|e| RunError::Auth(e.to_string()))?
    {
        AuthConfig::None => Err(RunError::Auth(
            "auth is `none`: there is no token verifier".into(),
        )),
        AuthConfig::Jwt(config) => {
            JwtVerifier::from_config(&config).map_err(|e| RunError::Auth(e.to_string()))
        }
    }
}

/// The default auth hook for the settings' mode.
pub fn auth_from_settings(settings: &Settings) -> Result<Arc<dyn AuthHook>, RunError> {
    match settings.auth {
        AuthMode::None => Ok(Arc::new(NoAuth)),
        _ => Ok(Arc::new(jwt_verifier_from_settings(settings)?)),
    }
}

/// In development mode with HS256, a token for `dev-user`, valid 8 hours,
/// that the frontend (and the console page) can use at once; `None` in any
/// other mode.
pub(crate) fn dev_token(settings: &Settings) -> Option<Result<String, AuthError>> {
    let secret = settings.jwt_secret.as_ref().filter(|s| !s.is_empty())?;
    if !settings.is_memory_mesh() || settings.auth != AuthMode::JwtHs256 {
        return None;
    }
    Some(hs256_dev_token(
        secret.expose().as_bytes(),
        "dev-user",
        8 * 3600,
        settings.jwt_issuer.as_deref(),
        settings.jwt_audience.as_deref(),
    ))
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(secret: &str, claims: Value) -> String {
        sign_hs256(secret.as_bytes(), &claims).unwrap()
    }

    fn exp_in(secs: i64) -> u64 {
        (unix_now() as i64 + secs) as u64
    }

    #[tokio::test]
    async fn a_dev_token_passes_the_matching_verifier_only() {
        let t = hs256_dev_token(b"k", "dev-user", 60, Some("me"), Some("app")).unwrap();
        let ok = JwtVerifier::hs256(b"k", Some("me"), Some("app")).in_development(true);
        assert_eq!(ok.authenticate(&t).await.unwrap().user_id, "dev-user");
        let other_secret = JwtVerifier::hs256(b"x", Some("me"), Some("app"));
        assert!(other_secret.authenticate(&t).await.is_err());
        let other_issuer = JwtVerifier::hs256(b"k", Some("them"), Some("app"));
        assert!(other_issuer.authenticate(&t).await.is_err());
    }

    #[tokio::test]
    async fn accepts_a_good_token_and_maps_claims() {
        let auth = JwtVerifier::hs256(b"s3cret", None, None);
        let t = token(
            "s3cret",
            json!({"sub":"u1","name":"Ann","roles":["admin","user"],"exp":exp_in(60)}),
        );
        let id = auth.authenticate(&t).await.unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.username.as_deref(), Some("Ann"));
        assert_eq!(id.roles, vec!["admin", "user"]);
        assert_eq!(id.token.as_deref(), Some(t.as_str()));
        assert!(
            !format!("{id:?}").contains(&t),
            "token must not be in Debug"
        );
    }

    #[tokio::test]
    async fn scope_counts_as_roles_only_when_the_settings_say_so() {
        let t = token(
            "k",
            json!({"sub":"u2","preferred_username":"bo","scope":"read write","exp":exp_in(60)}),
        );
        let id = JwtVerifier::hs256(b"k", None, None)
            .authenticate(&t)
            .await
            .unwrap();
        assert_eq!(id.username.as_deref(), Some("bo"));
        assert!(id.roles.is_empty(), "{:?}", id.roles);
        let id = JwtVerifier::hs256(b"k", None, None)
            .with_roles_claim("scope")
            .authenticate(&t)
            .await
            .unwrap();
        assert_eq!(id.roles, vec!["read", "write"]);
    }

    #[tokio::test]
    async fn a_development_token_is_refused_outside_development_mode() {
        let dev = hs256_dev_token(b"shared-secret", "dev-user", 60, None, None).unwrap();
        let production = JwtVerifier::hs256(b"shared-secret", None, None);
        let err = production.authenticate(&dev).await.unwrap_err();
        assert!(err.to_string().contains("development"), "{err}");
        let development = JwtVerifier::hs256(b"shared-secret", None, None).in_development(true);
        assert_eq!(
            development.authenticate(&dev).await.unwrap().user_id,
            "dev-user"
        );
    }

    #[tokio::test]
    async fn refuses_bad_tokens() {
        let auth = JwtVerifier::hs256(b"right", Some("issuer-a"), Some("bff"));
        let good = json!({"sub":"u","iss":"issuer-a","aud":"bff","exp":exp_in(60)});
        assert!(
            auth.authenticate(&token("right", good.clone()))
                .await
                .is_ok()
        );

        let wrong_key = token("wrong", good.clone());
        assert!(matches!(
            auth.authenticate(&wrong_key).await,
            Err(AuthError::Invalid(_))
        ));

        let mut expired = good.clone();
        expired["exp"] = json!(exp_in(-3600));
        assert_eq!(
            auth.authenticate(&token("right", expired)).await,
            Err(AuthError::Expired)
        );

        let mut other_iss = good.clone();
        other_iss["iss"] = json!("issuer-b");
        assert!(auth.authenticate(&token("right", other_iss)).await.is_err());

        let mut other_aud = good.clone();
        other_aud["aud"] = json!("someone-else");
        assert!(auth.authenticate(&token("right", other_aud)).await.is_err());

        let mut no_sub = good.clone();
        no_sub.as_object_mut().unwrap().remove("sub");
        assert!(auth.authenticate(&token("right", no_sub)).await.is_err());

        assert!(auth.authenticate("not.a.jwt").await.is_err());
        assert!(auth.authenticate("").await.is_err());
    }

    #[tokio::test]
    async fn time_claims_and_configured_issuer_and_audience_are_enforced() {
        let auth = JwtVerifier::hs256(b"k", Some("idp"), Some("bff"));
        let now = unix_now();
        let with = |extra: Value| {
            let mut c = json!({"sub":"u","iss":"idp","aud":"bff","exp": now + 60});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let auth = &auth;
        let ok = |claims: Value| {
            let t = token("k", claims);
            async move { auth.authenticate(&t).await }
        };
        assert!(ok(with(json!({}))).await.is_ok());
        assert!(
            ok(with(json!({"nbf": now + 3600}))).await.is_err(),
            "not yet valid"
        );
        assert!(
            ok(with(json!({"nbf": now + 5}))).await.is_ok(),
            "within the leeway"
        );
        let mut no_iss = with(json!({}));
        no_iss.as_object_mut().unwrap().remove("iss");
        assert!(ok(no_iss).await.is_err(), "iss is required when configured");
        let mut no_aud = with(json!({}));
        no_aud.as_object_mut().unwrap().remove("aud");
        assert!(ok(no_aud).await.is_err(), "aud is required when configured");
        let mut no_exp = with(json!({}));
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(ok(no_exp).await.is_err(), "exp is required");

        let fractional = ok(with(json!({"exp": now as f64 + 3.5}))).await.unwrap();
        assert_eq!(fractional.expires_at, Some(now + 3));
        let far = ok(with(json!({"exp": u64::MAX}))).await.unwrap();
        assert_eq!(far.expires_at, Some(u64::MAX));
        for absurd in [json!(1e300), json!(-5), json!("soon"), json!(null)] {
            assert!(ok(with(json!({"exp": absurd}))).await.is_err(), "{absurd}");
        }
    }

    #[test]
    fn handshake_token_sources_in_order() {
        let mut h = HeaderMap::new();
        assert_eq!(handshake_token(&h, None), None);
        assert_eq!(handshake_token(&h, Some("q")), Some("q".into()));
        h.insert("cookie", "a=b; access_token=c1; x=y".parse().unwrap());
        assert_eq!(handshake_token(&h, Some("q")), Some("c1".into()));
        h.insert("authorization", "Bearer hdr".parse().unwrap());
        assert_eq!(handshake_token(&h, Some("q")), Some("hdr".into()));
    }

    #[test]
    fn no_auth_makes_a_user_per_connection() {
        let a = NoAuth.anonymous("s1").unwrap();
        let b = NoAuth.anonymous("s2").unwrap();
        assert_ne!(a.user_id, b.user_id);
        assert!(
            JwtVerifier::hs256(b"k", None, None)
                .anonymous("s")
                .is_none()
        );
    }
}
