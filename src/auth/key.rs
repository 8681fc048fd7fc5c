//! Key material: a key and the algorithms a token signed with it may name.
//! The key's type decides those algorithms (settings may narrow them), so
//! a token's header never picks how it is checked. Shared by fixed keys
//! (`jwt`) and key sets (`jwks`).

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey};

use super::AuthError;

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
pub(super) const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// A key and the algorithms a token signed with it may name.
pub(super) struct VerifyKey {
    pub(super) key: DecodingKey,
    pub(super) algorithms: Vec<Algorithm>,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// A shared secret: HS256, HS384 or HS512.
    pub(super) fn secret(secret: &[u8]) -> Self {
        Self {
            key: DecodingKey::from_secret(secret),
            algorithms: HMAC.to_vec(),
        }
    }

    /// A public key in PEM (SubjectPublicKeyInfo, or PKCS#1 for RSA).
    pub(super) fn from_pem(pem: &[u8]) -> Result<Self, AuthError> {
        let key = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            VerifyKey {
                key,
                algorithms: RSA.to_vec(),
            }
        } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            // The key is the curve point: its length names the curve.
            let algorithm = match key.try_get_as_bytes().map(<[u8]>::len) {
                Ok(65 | 33) => Algorithm::ES256,
                Ok(97 | 49) => Algorithm::ES384,
                _ => {
                    return Err(AuthError::Invalid(
                        "an EC public key on a curve other than P-256 or P-384".into(),
                    ));
                }
            };
            VerifyKey {
                key,
                algorithms: vec![algorithm],
            }
        } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            VerifyKey {
                key,
                algorithms: vec![Algorithm::EdDSA],
            }
        } else {
            return Err(AuthError::Invalid(
                "not a PEM public key (RSA, EC P-256/P-384 or Ed25519)".into(),
            ));
        };
        Ok(key)
    }
}
