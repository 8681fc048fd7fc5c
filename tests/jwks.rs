//! Identity providers: tokens of every algorithm verified from a JWKS served
//! by a real HTTP server on 127.0.0.1:0 (and from PEM keys and secrets),
//! key rotation, unknown `kid`s, endpoints that are down or slow, issuers
//! that must not vouch for each other, and algorithm confusion.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::{MeshSetup, eventually, http_get, start};
use nuropb_bff::testing::{TestClient, TestKey, jwks_document};
use nuropb_bff::{
    AuthHook, DefaultHandler, JwksProvider, JwksSettings, JwtAlgorithm as Alg, JwtVerifier,
    MemoryMesh,
};
use serde_json::{Value, json};

const ALL: [Alg; 9] = [
    Alg::RS256,
    Alg::RS384,
    Alg::RS512,
    Alg::PS256,
    Alg::PS384,
    Alg::PS512,
    Alg::ES256,
    Alg::ES384,
    Alg::EdDSA,
];

/// What the test identity provider serves, changed by the tests as they go.
struct Idp {
    keys: Value,
    status: StatusCode,
    delay: Duration,
    max_age: Option<u64>,
    /// The issuer its discovery document names.
    issuer: String,
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<Idp>>,
    /// Key set requests served (whatever the answer).
    hits: Arc<AtomicUsize>,
    base: String,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

async fn serve_keys(State(s): State<Server>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let (keys, status, delay, max_age) = {
        let idp = s.state.lock().unwrap();
        (idp.keys.clone(), idp.status, idp.delay, idp.max_age)
    };
    tokio::time::sleep(delay).await;
    if status != StatusCode::OK {
        return (status, "identity provider trouble").into_response();
    }
    let mut response = axum::Json(keys).into_response();
    if let Some(age) = max_age {
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(&format!("public, max-age={age}")).unwrap(),
        );
    }
    response
}

async fn discovery(State(s): State<Server>) -> Response {
    let issuer = s.state.lock().unwrap().issuer.clone();
    axum::Json(json!({"issuer": issuer, "jwks_uri": format!("{}/keys", s.base)})).into_response()
}

impl Server {
    async fn start(keys: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(Idp {
            keys,
            status: StatusCode::OK,
            delay: Duration::ZERO,
            max_age: None,
            issuer: base.clone(),
        }));
        let hits = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<Server>();
        let task = tokio::spawn(async move {
            let server = rx.await.unwrap();
            let app = Router::new()
                .route("/keys", get(serve_keys))
                .route("/.well-known/openid-configuration", get(discovery))
                .with_state(server);
            axum::serve(listener, app).await.unwrap();
        });
        let server = Server {
            state,
            hits,
            base,
            task: Arc::new(task),
        };
        let _ = tx.send(server.clone());
        server
    }

    fn url(&self) -> String {
        format!("{}/keys", self.base)
    }

    fn provider(&self) -> JwksProvider {
        JwksProvider {
            issuer: self.base.clone(),
            jwks_url: Some(self.url()),
        }
    }

    fn set(&self, change: impl FnOnce(&mut Idp)) {
        change(&mut self.state.lock().unwrap());
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn options(min_refresh_ms: u64) -> JwksSettings {
    JwksSettings {
        min_refresh: Duration::from_millis(min_refresh_ms),
        fetch_timeout: Duration::from_millis(1500),
        ..JwksSettings::default()
    }
}

/// A verifier for `providers` whose refresh task runs until the test ends.
fn verifier(providers: Vec<JwksProvider>, o: &JwksSettings) -> JwtVerifier {
    let v = JwtVerifier::jwks(providers, Some("shop"), o).unwrap();
    tokio::spawn(v.maintain().expect("a JWKS verifier has work to do"));
    v
}

/// A gateway whose auth hook verifies from `server`'s key set (the
/// gateway runs the verifier's refresh task).
async fn gateway_on(server: &Server) -> (JwtVerifier, common::Running) {
    let v = JwtVerifier::jwks(vec![server.provider()], Some("shop"), &options(1_000)).unwrap();
    let bff = start(
        "[[route]]\ncall = \"orders.get\"\n",
        Arc::new(v.clone()),
        Arc::new(DefaultHandler),
        |_| {},
        MeshSetup::Memory(MemoryMesh::new()),
    )
    .await;
    (v, bff)
}

/// Wait (5 s at most) until `v`'s key sets have loaded.
async fn until_loaded(v: &JwtVerifier) {
    eventually("the key sets to load", Duration::from_secs(5), async || {
        v.ready().then_some(())
    })
    .await;
}

fn tok(key: &TestKey, issuer: &str, sub: &str) -> String {
    key.token(sub, &["reader"], 300, Some(issuer), Some("shop"))
}

#[tokio::test]
async fn every_algorithm_verifies_from_a_jwks() {
    let keys: Vec<TestKey> = ALL.iter().map(|a| TestKey::generate(*a)).collect();
    let server = Server::start(jwks_document(&keys.iter().collect::<Vec<_>>())).await;
    let v = verifier(vec![server.provider()], &options(30_000));
    until_loaded(&v).await;
    for key in &keys {
        let id = v
            .authenticate(&tok(key, &server.base, "ann"))
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", key.algorithm()));
        assert_eq!(id.user_id, "ann");
        assert_eq!(id.roles, ["reader"]);
    }
    // A token signed by one key but naming another's `kid`.
    let (a, b) = (&keys[0], &keys[6]);
    let stolen_kid = TestKey::generate(Alg::ES256).with_kid(b.kid());
    assert!(
        v.authenticate(&tok(&stolen_kid, &server.base, "eve"))
            .await
            .is_err()
    );
    let wrong_alg_for_key = a.clone().with_kid(b.kid());
    assert!(
        v.authenticate(&tok(&wrong_alg_for_key, &server.base, "eve"))
            .await
            .is_err(),
        "an RSA signature under an EC key's kid"
    );
    // Audience and issuer are still checked.
    let other_aud = a.token("ann", &[], 300, Some(&server.base), Some("elsewhere"));
    assert!(v.authenticate(&other_aud).await.is_err());
}

#[tokio::test]
async fn every_algorithm_verifies_from_a_pem_key_and_hmac_from_a_secret() {
    for alg in ALL {
        let key = TestKey::generate(alg);
        let v = JwtVerifier::public_key_pem(key.public_pem().as_bytes(), Some("idp"), None)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        let t = key.token("bo", &[], 60, Some("idp"), None);
        assert_eq!(v.authenticate(&t).await.unwrap().user_id, "bo", "{alg:?}");
        let other = TestKey::generate(alg);
        let forged = other.token("bo", &[], 60, Some("idp"), None);
        assert!(v.authenticate(&forged).await.is_err(), "{alg:?}");
        // HS256 signed with the public key's bytes as the secret.
        let confused = nuropb_bff::testing::hs256_token_with(
            key.public_pem(),
            &json!({"sub": "mallory", "iss": "idp", "exp": nuropb_bff::testing::unix_time() + 60}),
        );
        assert!(v.authenticate(&confused).await.is_err(), "{alg:?}");
    }
    let secret = "a-secret-of-at-least-thirty-two-bytes!";
    let v = JwtVerifier::hs256(secret.as_bytes(), None, None);
    for alg in [Alg::HS256, Alg::HS384, Alg::HS512] {
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &json!({"sub": "cy", "exp": nuropb_bff::testing::unix_time() + 60}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.authenticate(&t).await.unwrap().user_id, "cy", "{alg:?}");
        let only_256 = v.clone().with_algorithms(&[Alg::HS256]);
        assert_eq!(only_256.authenticate(&t).await.is_ok(), alg == Alg::HS256);
    }
    assert!(JwtVerifier::public_key_pem(b"-----BEGIN NONSENSE-----", None, None).is_err());
}

#[tokio::test]
async fn an_unknown_kid_is_refused_after_one_refetch_and_rotation_is_picked_up() {
    let old = TestKey::generate(Alg::ES256);
    let server = Server::start(jwks_document(&[&old])).await;
    let v = verifier(vec![server.provider()], &options(1_000));
    until_loaded(&v).await;
    assert!(v.authenticate(&tok(&old, &server.base, "a")).await.is_ok());
    let loads = server.hits();

    // Unknown kids: one refetch, then refusals without asking again.
    let stranger = TestKey::generate(Alg::ES256);
    for _ in 0..5 {
        assert!(
            v.authenticate(&tok(&stranger, &server.base, "x"))
                .await
                .is_err()
        );
    }
    assert_eq!(server.hits(), loads + 1, "one refetch per min_refresh");

    // The provider rotates: the new key is picked up on its first token
    // (once min_refresh has passed), and the old one stops working with the
    // next refresh.
    let new = TestKey::generate(Alg::RS256);
    server.set(|idp| idp.keys = jwks_document(&[&new]));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let id = v.authenticate(&tok(&new, &server.base, "b")).await.unwrap();
    assert_eq!(id.user_id, "b");
    assert_eq!(server.hits(), loads + 2);
    assert!(v.authenticate(&tok(&old, &server.base, "a")).await.is_err());
}

#[tokio::test]
async fn an_endpoint_down_at_start_means_not_ready_and_no_tokens() {
    let key = TestKey::generate(Alg::EdDSA);
    let server = Server::start(jwks_document(&[&key])).await;
    server.set(|idp| idp.status = StatusCode::INTERNAL_SERVER_ERROR);
    let (v, bff) = gateway_on(&server).await;
    eventually("a fetch was tried", Duration::from_secs(5), async || {
        (server.hits() >= 2).then_some(())
    })
    .await;
    let (status, body) = http_get(bff.addr, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("identity provider"), "{body}");
    let t = tok(&key, &server.base, "ann");
    let refused = TestClient::connect(&bff.url(), Some(&t)).await;
    assert!(refused.expect_err("no keys, no entry").contains("401"));

    // The provider comes back: ready, and the same token is let in.
    server.set(|idp| idp.status = StatusCode::OK);
    until_loaded(&v).await;
    assert_eq!(http_get(bff.addr, "/readyz").await.unwrap().0, 200);
    let (_c, hello) = common::connect(&bff.url(), &t).await;
    assert_eq!(hello["payload"]["event"]["user_id"], "ann");
    bff.stop().await;
}

#[tokio::test]
async fn cached_keys_keep_serving_while_the_endpoint_is_down() {
    let key = TestKey::generate(Alg::PS256);
    let server = Server::start(jwks_document(&[&key])).await;
    // Every answer expires at once (bounded below by 50 ms), so the set is
    // refetched over and over.
    server.set(|idp| idp.max_age = Some(0));
    let o = JwksSettings {
        min_max_age: Duration::from_millis(50),
        ..options(200)
    };
    let v = verifier(vec![server.provider()], &o);
    until_loaded(&v).await;
    eventually("max-age is honoured", Duration::from_secs(5), async || {
        (server.hits() >= 3).then_some(())
    })
    .await;
    server.set(|idp| idp.status = StatusCode::BAD_GATEWAY);
    let failing_from = server.hits();
    eventually("refetches fail", Duration::from_secs(5), async || {
        (server.hits() >= failing_from + 3).then_some(())
    })
    .await;
    assert!(v.ready(), "a loaded set stays loaded");
    assert!(
        v.authenticate(&tok(&key, &server.base, "ann"))
            .await
            .is_ok()
    );
    // A garbage answer does not replace the good set either.
    server.set(|idp| {
        idp.status = StatusCode::OK;
        idp.keys = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
    });
    let from = server.hits();
    eventually("garbage is fetched", Duration::from_secs(5), async || {
        (server.hits() >= from + 2).then_some(())
    })
    .await;
    assert!(
        v.authenticate(&tok(&key, &server.base, "ann"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_slow_endpoint_does_not_stall_other_handshakes() {
    let key = TestKey::generate(Alg::ES384);
    let server = Server::start(jwks_document(&[&key])).await;
    let (v, bff) = gateway_on(&server).await;
    until_loaded(&v).await;
    server.set(|idp| idp.delay = Duration::from_secs(5));

    // An unknown kid waits on a refetch that takes 5 s (and is cut at the
    // 1.5 s fetch timeout) ...
    let stranger = TestKey::generate(Alg::ES384);
    let url = bff.url();
    let stranger_token = tok(&stranger, &server.base, "x");
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = TestClient::connect(&url, Some(&stranger_token)).await;
        (r.is_ok(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... while known keys let others in at once.
    for user in ["ann", "bo", "cy"] {
        let started = Instant::now();
        let (_c, hello) = common::connect(&bff.url(), &tok(&key, &server.base, user)).await;
        assert_eq!(hello["payload"]["event"]["user_id"], user);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a handshake took {:?} behind a slow JWKS fetch",
            started.elapsed()
        );
    }
    let (accepted, took) = waiting.await.unwrap();
    assert!(!accepted, "an unknown kid is refused");
    assert!(
        took < Duration::from_secs(4),
        "bounded by the fetch timeout: {took:?}"
    );
    bff.stop().await;
}

#[tokio::test]
async fn issuers_never_vouch_for_each_other() {
    // Two providers publish the same kid with different keys.
    let a_key = TestKey::generate(Alg::RS256).with_kid("shared");
    let b_key = TestKey::generate(Alg::RS256).with_kid("shared");
    let a = Server::start(jwks_document(&[&a_key])).await;
    let b = Server::start(jwks_document(&[&b_key])).await;
    let v = verifier(vec![a.provider(), b.provider()], &options(30_000));
    until_loaded(&v).await;
    assert!(v.authenticate(&tok(&a_key, &a.base, "ann")).await.is_ok());
    assert!(v.authenticate(&tok(&b_key, &b.base, "bo")).await.is_ok());
    assert!(
        v.authenticate(&tok(&b_key, &a.base, "eve")).await.is_err(),
        "B's key must not vouch for issuer A"
    );
    assert!(v.authenticate(&tok(&a_key, &b.base, "eve")).await.is_err());
    assert!(
        v.authenticate(&tok(&a_key, "https://evil.example", "eve"))
            .await
            .is_err(),
        "the right key, another issuer"
    );
    let no_iss = a_key.token("eve", &[], 60, None, Some("shop"));
    assert!(v.authenticate(&no_iss).await.is_err());

    // With one provider, a token signed by its key but naming another
    // issuer is refused too.
    let single = verifier(vec![a.provider()], &options(30_000));
    until_loaded(&single).await;
    assert!(
        single
            .authenticate(&tok(&a_key, &a.base, "ann"))
            .await
            .is_ok()
    );
    assert!(
        single
            .authenticate(&tok(&a_key, "https://evil.example", "eve"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let key = TestKey::generate(Alg::RS256);
    let server = Server::start(jwks_document(&[&key])).await;
    let v = verifier(vec![server.provider()], &options(30_000));
    until_loaded(&v).await;
    let claims = json!({
        "sub": "mallory", "iss": server.base, "aud": "shop",
        "exp": nuropb_bff::testing::unix_time() + 60,
    });
    // HS256 keyed with the RSA public key (as PEM, and as the JWK's `n`),
    // under the RSA key's kid.
    let n = key.jwk()["n"].as_str().unwrap().to_owned();
    for secret in [key.public_pem().as_bytes(), n.as_bytes()] {
        let mut header = jsonwebtoken::Header::new(Alg::HS256);
        header.kid = Some(key.kid().to_owned());
        let forged = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap();
        let err = v.authenticate(&forged).await.unwrap_err();
        assert!(err.to_string().contains("algorithm"), "{err}");
    }
    // `alg: none` is no algorithm at all.
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims.to_string())
    );
    assert!(v.authenticate(&none).await.is_err());
    // The settings may narrow what the key type allows: RS256 only.
    let narrowed = v.clone().with_algorithms(&[Alg::RS384]);
    assert!(
        narrowed
            .authenticate(&tok(&key, &server.base, "ann"))
            .await
            .is_err()
    );
    assert!(
        v.authenticate(&tok(&key, &server.base, "ann"))
            .await
            .is_ok()
    );
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn oidc_discovery_names_the_key_set_and_must_name_the_issuer() {
    let key = TestKey::generate(Alg::ES256);
    let server = Server::start(jwks_document(&[&key])).await;
    let discovered = JwksProvider {
        issuer: server.base.clone(),
        jwks_url: None,
    };
    let v = verifier(vec![discovered.clone()], &options(30_000));
    eventually(
        "discovery and keys load",
        Duration::from_secs(5),
        async || v.ready().then_some(()),
    )
    .await;
    assert!(
        v.authenticate(&tok(&key, &server.base, "ann"))
            .await
            .is_ok()
    );

    // A discovery document for someone else is not followed.
    server.set(|idp| idp.issuer = "https://someone-else.example".into());
    let hits = server.hits();
    let wary = verifier(vec![discovered], &options(30_000));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!wary.ready());
    assert_eq!(server.hits(), hits, "the key set was never asked for");
}

#[tokio::test]
async fn settings_build_a_jwks_verifier_and_refuse_short_secrets() {
    let key = TestKey::generate(Alg::EdDSA);
    let server = Server::start(jwks_document(&[&key])).await;
    let mut s = nuropb_bff::Settings::new("bff");
    s.auth = nuropb_bff::AuthMode::Jwks;
    s.jwt_issuer = Some(server.base.clone());
    s.jwks_url = Some(server.url());
    s.jwt_algorithms = vec!["EdDSA".into()];
    let v = nuropb_bff::jwt_verifier_from_settings(&s).unwrap();
    tokio::spawn(v.maintain().unwrap());
    until_loaded(&v).await;
    let t = key.token("ann", &[], 60, Some(&server.base), None);
    assert!(v.authenticate(&t).await.is_ok());

    let mut hs = nuropb_bff::Settings::new("bff");
    hs.auth = nuropb_bff::AuthMode::JwtHs256;
    hs.jwt_secret = Some("short".into());
    assert!(
        nuropb_bff::jwt_verifier_from_settings(&hs).is_ok(),
        "development mode (memory://) takes any secret"
    );
    hs.amqp_url = "amqp://127.0.0.1".into();
    let err = nuropb_bff::jwt_verifier_from_settings(&hs).unwrap_err();
    assert!(err.to_string().contains("32"), "{err}");
    hs.jwt_secret = Some("x".repeat(32).into());
    assert!(nuropb_bff::jwt_verifier_from_settings(&hs).is_ok());
}

#[test]
fn a_jwks_verifier_is_built_before_any_runtime_exists() {
    // The binary builds its auth hook before it starts the async runtime.
    let mut s = nuropb_bff::Settings::new("bff");
    s.auth = nuropb_bff::AuthMode::Jwks;
    s.jwt_issuer = Some("https://idp.example.com/realms/shop".into());
    let v = nuropb_bff::jwt_verifier_from_settings(&s).expect("no runtime needed to build it");
    assert!(!v.ready(), "nothing loaded yet");
    assert!(v.maintain().is_some());
}
