//! JWT verification: a shared secret (HS*), a public key in PEM (RS*, PS*,
//! ES256/384, EdDSA) or the keys a JWKS endpoint publishes. Which
//! algorithms a token may use is fixed by the key's type and the settings,
//! never by the token's own header.

use std::fmt;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Map, Value};

use super::jwks::{Jwks, JwksProvider};
use super::key::VerifyKey;
use super::{AuthError, AuthHook, Identity};
use crate::config::{DEV_TOKEN_MARK, JwksSettings, JwtConfig, KeySource};
use crate::mesh::BoxFuture;

/// A token longer than this is refused before any parsing: real ones are a
/// few kilobytes even with group claims.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
enum Keys {
    /// A secret or a PEM public key from the settings.
    Fixed(Arc<VerifyKey>),
    Jwks(Jwks),
}

/// Turns the identity the settings read from a verified token (and the
/// token's claims) into the one a connection acts for (see
/// [`JwtVerifier::map_claims`]).
pub type ClaimsMapper =
    Arc<dyn Fn(Identity, &Map<String, Value>) -> Result<Identity, AuthError> + Send + Sync>;

/// Verifies a token's signature, expiry, `nbf`, issuer and audience and
/// returns its claims; as an [`AuthHook`], maps them to an [`Identity`]
/// ([`Identity::from_claims`] unless [`JwtVerifier::map_claims`] says
/// otherwise). Cheap to clone; clones share the keys.
///
/// ```
/// use nuropb_bff::JwtVerifier;
/// use jsonwebtoken::{EncodingKey, Header, encode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let secret = b"a-secret-of-at-least-32-bytes-long";
/// let verifier = JwtVerifier::hs256(secret, Some("https://idp.example"), None);
/// let claims = serde_json::json!({"sub": "ann", "iss": "https://idp.example", "exp": 4_000_000_000u64});
/// let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(secret)).unwrap();
/// assert_eq!(verifier.verify(&token).await.unwrap()["sub"], "ann");
///
/// let other = serde_json::json!({"sub": "ann", "iss": "https://evil.example", "exp": 4_000_000_000u64});
/// let token = encode(&Header::default(), &other, &EncodingKey::from_secret(secret)).unwrap();
/// assert!(verifier.verify(&token).await.is_err(), "another issuer");
/// # }
/// ```
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Keys,
    /// The identity the settings read, changed by the BFF's own mapping.
    identity: Option<ClaimsMapper>,
    /// Where roles are read from (`roles_claim`).
    roles_claim: Arc<str>,
    /// Development mode: development tokens are taken.
    development: bool,
    /// Several identity providers: a user id is qualified by its issuer,
    /// so two providers' `sub`s never name the same user.
    qualify_issuer: bool,
    /// Everything but the algorithm (and, for JWKS, the issuer).
    validation: Validation,
    /// The settings' restriction (`jwt_algorithms`); empty: none.
    allowed: Vec<Algorithm>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys)
            .field("allowed", &self.allowed)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .finish_non_exhaustive()
    }
}

fn validation(issuer: Option<&str>, audience: Option<&str>) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    // Clock skew between the identity provider and this host.
    validation.leeway = 30;
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match issuer {
        Some(iss) => {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    match audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

impl JwtVerifier {
    /// HS256, HS384 or HS512 with a shared secret.
    pub fn hs256(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        let key = VerifyKey::secret(secret);
        Self::fixed(key, issuer, audience)
    }

    /// A public key in PEM (SubjectPublicKeyInfo, or PKCS#1 for RSA): RSA
    /// verifies RS256/384/512 and PS256/384/512, EC P-256 ES256, EC P-384
    /// ES384, Ed25519 EdDSA.
    pub fn public_key_pem(
        pem: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, AuthError> {
        let key = VerifyKey::from_pem(pem)?;
        Ok(Self::fixed(key, issuer, audience))
    }

    /// An RSA public key in PEM; see [`JwtVerifier::public_key_pem`], which
    /// takes any supported key type.
    pub fn rs256_pem(
        pem: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, AuthError> {
        DecodingKey::from_rsa_pem(pem)
            .map_err(|e| AuthError::Invalid(format!("not an RSA public key in PEM: {e}")))?;
        Self::public_key_pem(pem, issuer, audience)
    }

    /// The keys the identity providers publish, chosen by the token's `iss`
    /// and `kid`. Each provider's keys vouch for its own issuer only. Call
    /// [`JwtVerifier::maintain`] (the gateway does, for its auth hook) to
    /// load and refresh them.
    pub fn jwks(
        providers: Vec<JwksProvider>,
        audience: Option<&str>,
        options: &JwksSettings,
    ) -> Result<Self, AuthError> {
        let qualify_issuer = providers.len() > 1;
        let jwks = Jwks::new(providers, options)?;
        Ok(Self {
            keys: Keys::Jwks(jwks),
            identity: None,
            roles_claim: Arc::from("roles"),
            development: false,
            qualify_issuer,
            validation: validation(None, audience),
            allowed: Vec::new(),
        })
    }

    /// The verifier a checked [`JwtConfig`] describes (a PEM key is read
    /// from its file here).
    pub fn from_config(config: &JwtConfig) -> Result<Self, AuthError> {
        let audience = config.audience.as_deref();
        let verifier = match &config.keys {
            KeySource::Secret { secret, issuer } => {
                Self::hs256(secret.expose().as_bytes(), issuer.as_deref(), audience)
            }
            KeySource::PublicKey { path, issuer } => {
                let pem = std::fs::read(path).map_err(|e| {
                    AuthError::Invalid(format!("cannot read {}: {e}", path.display()))
                })?;
                Self::public_key_pem(&pem, issuer.as_deref(), audience)
                    .map_err(|e| AuthError::Invalid(format!("{}: {e}", path.display())))?
            }
            KeySource::Jwks {
                issuer,
                jwks_url,
                options,
            } => {
                let provider = JwksProvider {
                    issuer: issuer.clone(),
                    jwks_url: jwks_url.clone(),
                };
                Self::jwks(vec![provider], audience, options)?
            }
        };
        Ok(verifier
            .with_algorithms(&config.algorithms)
            .with_roles_claim(&config.roles_claim)
            .in_development(config.development))
    }

    fn fixed(key: VerifyKey, issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self {
            keys: Keys::Fixed(Arc::new(key)),
            identity: None,
            roles_claim: Arc::from("roles"),
            development: false,
            qualify_issuer: false,
            validation: validation(issuer, audience),
            allowed: Vec::new(),
        }
    }

    /// Change the identity a verified token names before a connection acts
    /// for it: `identity` gets what the settings read (`sub`, the user
    /// name, the roles from `roles_claim`) and the token's claims, and
    /// answers the identity to use (a tenant in the user id, roles from a
    /// custom claim, a refusal). The verifier stays the hook: keys,
    /// readiness and refreshes unchanged.
    ///
    /// ```
    /// use nuropb_bff::{AuthError, Identity, JwtVerifier};
    /// use serde_json::{Map, Value};
    ///
    /// fn tenant_user(mut id: Identity, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
    ///     if let Some(tenant) = claims.get("tenant").and_then(Value::as_str) {
    ///         id.user_id = format!("{tenant}/{}", id.user_id);
    ///     }
    ///     Ok(id)
    /// }
    ///
    /// let verifier = JwtVerifier::hs256(b"a-secret-of-at-least-32-bytes-long", None, None)
    ///     .map_claims(tenant_user);
    /// # drop(verifier);
    /// ```
    pub fn map_claims(
        mut self,
        identity: impl Fn(Identity, &Map<String, Value>) -> Result<Identity, AuthError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.identity = Some(Arc::new(identity));
        self
    }

    /// Read roles from `claim` (an array of strings, or a space-separated
    /// string such as `scope`) instead of `roles`.
    pub fn with_roles_claim(mut self, claim: &str) -> Self {
        self.roles_claim = Arc::from(claim);
        self
    }

    /// Development mode: take development tokens (which carry
    /// `DEV_TOKEN_MARK`); outside it they are refused, whatever signed them.
    pub fn in_development(mut self, development: bool) -> Self {
        self.development = development;
        self
    }

    /// Accept only these algorithms (the key's type still has the last
    /// word). Empty: no restriction beyond the key's type.
    pub fn with_algorithms(mut self, algorithms: &[Algorithm]) -> Self {
        self.allowed = algorithms.to_vec();
        self
    }

    /// True once the keys are there: always for a secret or a PEM key; for
    /// JWKS, once every provider's key set has loaded.
    pub fn ready(&self) -> bool {
        match &self.keys {
            Keys::Fixed(_) => true,
            Keys::Jwks(jwks) => jwks.loaded(),
        }
    }

    /// What keeps the keys fresh (JWKS: fetch, refetch on expiry and on an
    /// unknown `kid`); `None` for fixed keys. Runs until dropped.
    pub fn maintain(&self) -> Option<BoxFuture<'static, ()>> {
        match &self.keys {
            Keys::Fixed(_) => None,
            Keys::Jwks(jwks) => Some(Box::pin(jwks.clone().maintain())),
        }
    }

    /// Check signature, algorithm, expiry, `nbf`, issuer and audience; the
    /// claims.
    pub async fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid(format!(
                "the token is longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header =
            decode_header(token).map_err(|e| AuthError::Invalid(format!("bad header: {e}")))?;
        let mut validation = self.validation.clone();
        let key = match &self.keys {
            Keys::Fixed(key) => key.clone(),
            Keys::Jwks(jwks) => {
                let (issuer, key) = jwks.key_for(token, header.kid.as_deref()).await?;
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims.insert("iss".into());
                key
            }
        };
        let alg = header.alg;
        if !key.algorithms.contains(&alg)
            || !(self.allowed.is_empty() || self.allowed.contains(&alg))
        {
            return Err(AuthError::Invalid(format!(
                "algorithm {alg:?} is not accepted for this key"
            )));
        }
        validation.algorithms = vec![alg];
        let claims = decode::<Map<String, Value>>(token, &key.key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        if !self.development && claims.contains_key(DEV_TOKEN_MARK) {
            return Err(AuthError::Invalid(
                "a development-mode token: refused outside development mode".into(),
            ));
        }
        Ok(claims)
    }

    /// The identity a verified token names: the settings' reading, the
    /// user id qualified by its issuer when several providers are trusted,
    /// then the BFF's own mapping.
    fn identity(&self, token: &str, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
        let mut id = Identity::from_claims_with(token, claims, &self.roles_claim)?;
        if self.qualify_issuer
            && let Some(iss) = claims.get("iss").and_then(Value::as_str)
        {
            id.user_id = format!("{iss}|{}", id.user_id);
        }
        match &self.identity {
            Some(map) => map(id, claims),
            None => Ok(id),
        }
    }
}

impl AuthHook for JwtVerifier {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>> {
        Box::pin(async move { self.identity(token, &self.verify(token).await?) })
    }

    fn ready(&self) -> bool {
        JwtVerifier::ready(self)
    }

    fn maintain(&self) -> Option<BoxFuture<'static, ()>> {
        JwtVerifier::maintain(self)
    }
}
