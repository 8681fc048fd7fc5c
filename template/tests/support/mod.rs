//! The test credentials of {{project-name}}: the settings its auth mode
//! needs and tokens it must accept (or refuse). Keys are made when the tests
//! run; no private key ships with the crate.
#![allow(dead_code)]
{%- if auth == "jwt-hs256" %}

const SECRET: &str = "a-test-secret-of-at-least-thirty-two-bytes";

pub fn auth_env() -> Vec<(String, String)> {
    vec![("BFF_JWT_SECRET".to_owned(), SECRET.to_owned())]
}

pub fn token(sub: &str) -> Option<String> {
    Some(nuropb_bff::testing::hs256_token(SECRET, sub, &[], 300))
}

pub fn forged_token(sub: &str) -> Option<String> {
    let guess = "not-the-secret-but-every-bit-as-long-as-it";
    Some(nuropb_bff::testing::hs256_token(guess, sub, &[], 300))
}
{%- elsif auth == "jwt-rs256" %}

use std::path::PathBuf;
use std::sync::OnceLock;

use nuropb_bff::JwtAlgorithm;
use nuropb_bff::testing::TestKey;

fn key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| TestKey::generate(JwtAlgorithm::RS256))
}

/// BFF_JWT_PUBLIC_KEY names a file: the public half of this run's key.
fn public_key_file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let name = format!("test_public_{}.pem", std::process::id());
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, key().public_pem()).expect("write the test public key");
        path
    })
}

pub fn auth_env() -> Vec<(String, String)> {
    let path = public_key_file().display().to_string();
    vec![("BFF_JWT_PUBLIC_KEY".to_owned(), path)]
}

pub fn token(sub: &str) -> Option<String> {
    Some(key().token(sub, &[], 300, None, None))
}

pub fn forged_token(sub: &str) -> Option<String> {
    let other = TestKey::generate(JwtAlgorithm::RS256);
    Some(other.token(sub, &[], 300, None, None))
}
{%- elsif auth == "jwks" %}

use std::sync::OnceLock;

use nuropb_bff::JwtAlgorithm;
use nuropb_bff::testing::{TestIdp, TestKey};

/// A JWKS endpoint on 127.0.0.1 standing in for the identity provider.
fn idp() -> &'static TestIdp {
    static IDP: OnceLock<TestIdp> = OnceLock::new();
    IDP.get_or_init(|| {
        TestIdp::start(vec![TestKey::generate(JwtAlgorithm::ES256)])
            .expect("the test identity provider starts")
    })
}

pub fn auth_env() -> Vec<(String, String)> {
    vec![
        ("BFF_JWT_ISSUER".to_owned(), idp().issuer.clone()),
        ("BFF_JWKS_URL".to_owned(), idp().jwks_url.clone()),
    ]
}

/// The audience config/default.toml names.
const AUDIENCE: &str = "{{project-name}}";

pub fn token(sub: &str) -> Option<String> {
    let (key, issuer) = (idp().key(), &idp().issuer);
    Some(key.token(sub, &[], 300, Some(issuer), Some(AUDIENCE)))
}

/// Signed by another key under the provider's `kid`.
pub fn forged_token(sub: &str) -> Option<String> {
    let other = TestKey::generate(JwtAlgorithm::ES256).with_kid(idp().key().kid());
    Some(other.token(sub, &[], 300, Some(&idp().issuer), Some(AUDIENCE)))
}
{%- else %}

pub fn auth_env() -> Vec<(String, String)> {
    Vec::new()
}

pub fn token(_sub: &str) -> Option<String> {
    None
}
{%- endif %}
