//! Keys from identity providers' JWKS endpoints.
//!
//! Each provider (an issuer, and its key set's URL or the OIDC discovery
//! document that names it) has its own key set, so a key is found by
//! (issuer, `kid`) and never by `kid` alone: two providers may publish the
//! same `kid`, and one must not vouch for the other.
//!
//! One task per provider ([`Jwks::maintain`]) fetches the set, refetches it
//! when its `Cache-Control: max-age` (bounded by the settings) runs out, and
//! retries with a jittered backoff when the endpoint fails; the last good
//! set keeps serving meanwhile. Verification only reads the cached set: a
//! slow or failing endpoint never holds up a token whose key is known. A
//! token naming an unknown `kid` wakes the task for at most one refetch per
//! `min_refresh`, and waits for it no longer than the fetch timeout.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::AuthError;
use super::key::{RSA, VerifyKey};
use crate::config::JwksSettings;

/// A key set or discovery document larger than this is refused.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Keys beyond this many in one set are ignored.
const MAX_KEYS: usize = 64;
/// RSA keys shorter than this are not trusted.
const MIN_RSA_BITS: usize = 2048;

/// An identity provider whose keys verify tokens naming it in `iss`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksProvider {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// Its key set; `None`: the `jwks_uri` of
    /// `{issuer}/.well-known/openid-configuration`.
    pub jwks_url: Option<String>,
}

/// The key sets of one or more providers; clones share them.
#[derive(Clone)]
pub(super) struct Jwks(Arc<Inner>);

struct Inner {
    sources: Vec<Source>,
    options: JwksSettings,
    client: reqwest::Client,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.sources.iter().map(|s| &s.provider))
            .finish()
    }
}

/// One provider's cached keys and its refresh bookkeeping.
struct Source {
    provider: JwksProvider,
    keys: RwLock<Arc<KeySet>>,
    loaded: AtomicBool,
    fetching: AtomicBool,
    /// Counts finished fetches (good or not): what an unknown `kid` waits on.
    fetched: watch::Sender<u64>,
    /// Wakes the refresh task early.
    wake: Notify,
    /// The last refetch an unknown `kid` asked for: when, and the fetch count
    /// that answers it.
    refetch: Mutex<Option<(Instant, u64)>>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<VerifyKey>>,
    /// Every usable key, for a token without `kid` when there is only one.
    all: Vec<Arc<VerifyKey>>,
}

impl KeySet {
    fn find(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.all.len() == 1 => self.all.first().cloned(),
            None => None,
        }
    }
}

fn check_url(what: &str, url: &str) -> Result<(), AuthError> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
            if u.scheme() == "http" && !u.host_str().is_some_and(is_loopback) {
                tracing::warn!(
                    "{what} `{url}` is plain http: keys fetched without TLS can be replaced on the way"
                );
            }
            Ok(())
        }
        _ => Err(AuthError::Invalid(format!(
            "{what} must be an http(s) URL, found `{url}`"
        ))),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Jwks {
    pub(super) fn new(
        providers: Vec<JwksProvider>,
        options: &JwksSettings,
    ) -> Result<Self, AuthError> {
        if providers.is_empty() {
            return Err(AuthError::Invalid(
                "JWKS needs at least one provider".into(),
            ));
        }
        for (i, p) in providers.iter().enumerate() {
            if p.issuer.is_empty() {
                return Err(AuthError::Invalid("a JWKS provider needs an issuer".into()));
            }
            if providers[..i].iter().any(|q| q.issuer == p.issuer) {
                return Err(AuthError::Invalid(format!(
                    "issuer `{}` is listed twice",
                    p.issuer
                )));
            }
            match &p.jwks_url {
                Some(url) => check_url("the JWKS URL", url)?,
                None => check_url("the issuer (for OIDC discovery)", &p.issuer)?,
            }
        }
        let client = reqwest::Client::builder()
            .timeout(options.fetch_timeout)
            .connect_timeout(options.fetch_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("nuropb-bff/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AuthError::Invalid(format!("cannot make an HTTP client: {e}")))?;
        let sources = providers
            .into_iter()
            .map(|provider| Source {
                provider,
                keys: RwLock::default(),
                loaded: AtomicBool::new(false),
                fetching: AtomicBool::new(false),
                fetched: watch::Sender::new(0),
                wake: Notify::new(),
                refetch: Mutex::new(None),
            })
            .collect();
        Ok(Self(Arc::new(Inner {
            sources,
            options: options.clone(),
            client,
        })))
    }

    /// True once every provider's key set has loaded (it then stays loaded:
    /// a failing endpoint leaves the last good set serving).
    pub(super) fn loaded(&self) -> bool {
        self.0
            .sources
            .iter()
            .all(|s| s.loaded.load(Ordering::Acquire))
    }

    /// The issuer a token must name and the key that verifies it.
    pub(super) async fn key_for(
        &self,
        token: &str,
        kid: Option<&str>,
    ) -> Result<(String, Arc<VerifyKey>), AuthError> {
        let source = self.source_for(token)?;
        let issuer = source.provider.issuer.clone();
        if let Some(key) = source.find(kid) {
            return Ok((issuer, key));
        }
        if !source.loaded.load(Ordering::Acquire) {
            return Err(AuthError::Invalid(
                "the identity provider's keys have not loaded yet".into(),
            ));
        }
        let Some(kid) = kid else {
            return Err(AuthError::Invalid(
                "the token names no `kid` and the key set has several keys".into(),
            ));
        };
        let unknown = || AuthError::Invalid(format!("no key `{kid}` in the issuer's key set"));
        let Some(target) = source.ask_refetch(self.0.options.min_refresh) else {
            return Err(unknown());
        };
        let mut fetched = source.fetched.subscribe();
        let wait = self.0.options.fetch_timeout + Duration::from_millis(100);
        let _ = tokio::time::timeout(wait, fetched.wait_for(|n| *n >= target)).await;
        source
            .find(Some(kid))
            .map(|k| (issuer, k))
            .ok_or_else(unknown)
    }

    fn source_for(&self, token: &str) -> Result<&Source, AuthError> {
        let sources = &self.0.sources;
        if let [only] = sources.as_slice() {
            // The issuer is checked with the signature.
            return Ok(only);
        }
        #[derive(Deserialize)]
        struct Iss {
            iss: Option<String>,
        }
        // Unverified: it only picks the key set, and the token must then be
        // signed by that issuer's key and name it.
        let iss = jsonwebtoken::dangerous::insecure_decode::<Iss>(token)
            .map_err(|e| AuthError::Invalid(format!("unreadable claims: {e}")))?
            .claims
            .iss
            .ok_or_else(|| AuthError::Invalid("the token names no issuer".into()))?;
        sources
            .iter()
            .find(|s| s.provider.issuer == iss)
            .ok_or_else(|| AuthError::Invalid(format!("issuer `{iss}` is not trusted")))
    }

    /// Fetch and refresh every provider's keys; runs until dropped.
    pub(super) async fn maintain(self) {
        let loops = (0..self.0.sources.len()).map(|i| refresh(self.0.clone(), i));
        futures_util::future::join_all(loops).await;
    }
}

impl Source {
    fn find(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        keys.find(kid)
    }

    /// Ask for a refetch because of an unknown `kid`: the fetch count to wait
    /// for, or `None` when one was asked for within `min_refresh` and has
    /// already come back.
    fn ask_refetch(&self, min_refresh: Duration) -> Option<u64> {
        let now = Instant::now();
        let done = *self.fetched.borrow();
        let mut last = self.refetch.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((at, target)) if now.duration_since(at) < min_refresh => {
                (done < target).then_some(target)
            }
            _ => {
                // A fetch under way may have started before the key was
                // published: wait for the one after it.
                let target = done + 1 + u64::from(self.fetching.load(Ordering::Acquire));
                *last = Some((now, target));
                self.wake.notify_one();
                Some(target)
            }
        }
    }
}

/// One provider's refresh loop.
async fn refresh(inner: Arc<Inner>, index: usize) {
    let source = &inner.sources[index];
    let options = &inner.options;
    let issuer = source.provider.issuer.as_str();
    let mut failures: u32 = 0;
    let mut discovered: Option<String> = None;
    loop {
        source.fetching.store(true, Ordering::Release);
        let fetched = tokio::time::timeout(
            options.fetch_timeout,
            fetch(&inner.client, &source.provider, &mut discovered),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {} ms",
                options.fetch_timeout.as_millis()
            ))
        });
        source.fetching.store(false, Ordering::Release);
        let wait = match fetched {
            Ok((set, max_age)) => {
                let was_loaded = source.loaded.load(Ordering::Acquire);
                if failures > 0 || !was_loaded {
                    tracing::info!(issuer, keys = set.all.len(), "JWKS loaded");
                } else {
                    tracing::debug!(issuer, keys = set.all.len(), "JWKS refreshed");
                }
                *source.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                source.loaded.store(true, Ordering::Release);
                failures = 0;
                max_age
                    .unwrap_or(options.default_max_age)
                    .clamp(options.min_max_age, options.max_max_age)
            }
            Err(error) => {
                discovered = None;
                failures = failures.saturating_add(1);
                if failures == 1 {
                    if source.loaded.load(Ordering::Acquire) {
                        tracing::warn!(
                            issuer,
                            %error,
                            "JWKS fetch failed; the last good key set keeps serving"
                        );
                    } else {
                        tracing::warn!(
                            issuer,
                            %error,
                            "JWKS fetch failed; no key set yet, so tokens are refused and /readyz is 503"
                        );
                    }
                } else {
                    tracing::debug!(issuer, %error, failures, "JWKS fetch failed again");
                }
                retry_after(failures, options.min_refresh)
            }
        };
        source.fetched.send_modify(|n| *n += 1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = source.wake.notified() => {}
        }
    }
}

/// Backoff after `failures` failed fetches: 250 ms doubling, capped at
/// `min_refresh` (at least a second), with a quarter of jitter either way.
fn retry_after(failures: u32, min_refresh: Duration) -> Duration {
    let cap = min_refresh.max(Duration::from_secs(1));
    let base = Duration::from_millis(250)
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(cap);
    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    base.mul_f64(0.75 + jitter / 2.0)
}

/// Fetch a provider's key set: the set and its `max-age`.
async fn fetch(
    client: &reqwest::Client,
    provider: &JwksProvider,
    discovered: &mut Option<String>,
) -> Result<(KeySet, Option<Duration>), String> {
    let url = match (&provider.jwks_url, discovered.as_ref()) {
        (Some(url), _) | (None, Some(url)) => url.clone(),
        (None, None) => {
            let url = discover(client, &provider.issuer).await?;
            *discovered = Some(url.clone());
            url
        }
    };
    let (body, headers) = get(client, &url).await?;
    let set = parse_key_set(&body).map_err(|e| format!("{url}: {e}"))?;
    Ok((set, max_age(&headers)))
}

/// The `jwks_uri` of an issuer's OIDC discovery document, which must name
/// the same issuer.
async fn discover(client: &reqwest::Client, issuer: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Discovery {
        issuer: String,
        jwks_uri: String,
    }
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let (body, _) = get(client, &url).await?;
    let doc: Discovery = serde_json::from_slice(&body)
        .map_err(|e| format!("{url}: not a discovery document: {e}"))?;
    if doc.issuer != issuer {
        return Err(format!(
            "{url}: the document is for issuer `{}`, not `{issuer}`",
            doc.issuer
        ));
    }
    match reqwest::Url::parse(&doc.jwks_uri) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Ok(doc.jwks_uri),
        _ => Err(format!(
            "{url}: jwks_uri `{}` is not an http(s) URL",
            doc.jwks_uri
        )),
    }
}

async fn get(
    client: &reqwest::Client,
    url: &str,
) -> Result<(Vec<u8>, reqwest::header::HeaderMap), String> {
    let mut response = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let too_big = || format!("{url}: the body is over {MAX_BODY_BYTES} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, response.headers().clone()))
}

/// `Cache-Control: max-age`, or zero for `no-store` / `no-cache`.
fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let mut age = None;
    for value in headers.get_all(reqwest::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            if lower == "no-store" || lower == "no-cache" {
                return Some(Duration::ZERO);
            }
            if let Some(Ok(secs)) = lower
                .strip_prefix("max-age=")
                .map(|s| s.trim_matches('"').parse::<u64>())
            {
                age = Some(Duration::from_secs(secs));
            }
        }
    }
    age
}

/// The usable signing keys of a JWKS document. Keys this gateway cannot or
/// must not use (encryption keys, symmetric keys, short RSA keys, unknown
/// curves) are skipped; a set with none left is an error, so a broken
/// answer never replaces a good set.
fn parse_key_set(body: &[u8]) -> Result<KeySet, String> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = KeySet::default();
    for value in doc.keys.into_iter().take(MAX_KEYS) {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let Some(key) = usable(&jwk) else { continue };
        let key = Arc::new(key);
        if let Some(kid) = jwk.common.key_id.clone() {
            if set.by_kid.contains_key(&kid) {
                // Two keys under one name: neither can be trusted by name.
                set.by_kid.remove(&kid);
                continue;
            }
            set.by_kid.insert(kid, key.clone());
        }
        set.all.push(key);
    }
    if set.all.is_empty() {
        return Err("no usable signing key in the set".into());
    }
    Ok(set)
}

/// A JWK as a verification key, with the algorithms its type allows
/// (narrowed to its `alg` when it names one).
fn usable(jwk: &Jwk) -> Option<VerifyKey> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let n = base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                rsa.n.trim_end_matches('='),
            )
            .ok()?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < MIN_RSA_BITS {
                return None;
            }
            RSA.to_vec()
        }
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return None,
        },
        // A shared secret published on the network is no secret.
        _ => return None,
    };
    let algorithms = match &jwk.common.key_algorithm {
        None => by_type,
        Some(named) => {
            let alg = signing_algorithm(named)?;
            if !by_type.contains(&alg) {
                return None;
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey { key, algorithms })
}

fn signing_algorithm(named: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match named {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rsa_n(bytes: usize) -> String {
        let mut n = vec![0xc5u8; bytes];
        n[bytes - 1] = 0x01;
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, n)
    }

    #[test]
    fn only_signing_keys_it_can_trust_are_kept() {
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "r", "n": rsa_n(256), "e": "AQAB"},
            {"kty": "RSA", "kid": "short", "n": rsa_n(128), "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": rsa_n(256), "e": "AQAB"},
            {"kty": "RSA", "kid": "ps", "alg": "PS384", "n": rsa_n(256), "e": "AQAB"},
            {"kty": "RSA", "kid": "wrong-alg", "alg": "ES256", "n": rsa_n(256), "e": "AQAB"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "OKP", "kid": "x", "crv": "X25519", "x": "AAAA"},
            {"kty": "nonsense"},
            "not even an object",
        ]});
        let set = parse_key_set(doc.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = set.by_kid.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["ps", "r"]);
        assert_eq!(set.by_kid["r"].algorithms, RSA.to_vec());
        assert_eq!(set.by_kid["ps"].algorithms, vec![Algorithm::PS384]);
        assert!(set.find(None).is_none(), "two keys: a kid is needed");
    }

    #[test]
    fn a_set_without_usable_keys_or_with_twins_is_not_trusted() {
        let none = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        assert!(parse_key_set(none.to_string().as_bytes()).is_err());
        assert!(parse_key_set(b"{\"keys\": 5}").is_err());
        assert!(parse_key_set(b"<html>").is_err());
        let twins = json!({"keys": [
            {"kty": "RSA", "kid": "same", "n": rsa_n(256), "e": "AQAB"},
            {"kty": "RSA", "kid": "same", "n": rsa_n(300), "e": "AQAB"},
        ]});
        let set = parse_key_set(twins.to_string().as_bytes()).unwrap();
        assert!(set.find(Some("same")).is_none());
    }

    #[test]
    fn cache_control_max_age_is_read() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(max_age(&h), None);
        h.insert("cache-control", "public, max-age=3600".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::from_secs(3600)));
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::ZERO));
        h.insert("cache-control", "max-age=soon".parse().unwrap());
        assert_eq!(max_age(&h), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let cap = Duration::from_secs(30);
        let first = retry_after(1, cap);
        assert!(first >= Duration::from_millis(187) && first <= Duration::from_millis(313));
        let late = retry_after(40, cap);
        assert!(
            late <= cap.mul_f64(1.25) && late >= cap.mul_f64(0.75),
            "{late:?}"
        );
    }

    #[test]
    fn providers_are_checked() {
        let o = JwksSettings::default();
        let p = |iss: &str, url: Option<&str>| JwksProvider {
            issuer: iss.into(),
            jwks_url: url.map(Into::into),
        };
        assert!(Jwks::new(vec![], &o).is_err());
        assert!(Jwks::new(vec![p("", None)], &o).is_err());
        assert!(Jwks::new(vec![p("not a url", None)], &o).is_err());
        assert!(Jwks::new(vec![p("https://a", Some("ftp://x/keys"))], &o).is_err());
        assert!(Jwks::new(vec![p("https://a", None), p("https://a", None)], &o).is_err());
        let ok = Jwks::new(vec![p("https://a", None), p("b", Some("https://b/k"))], &o).unwrap();
        assert!(!ok.loaded());
    }
}
