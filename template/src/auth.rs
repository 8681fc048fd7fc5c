//! The auth hook of {{project-name}}: verifies a client's token and says
//! which user it names. Edit `identity` to map your identity provider's
//! claims (tenant ids, custom role claims, ...).

{%- if auth != "none" %}
use nuropb_bff::{AuthError, AuthHook, Identity, RunError, Settings};
use serde_json::{Map, Value};
{%- else %}
use nuropb_bff::{AuthHook, RunError, Settings};
{%- endif %}
use std::sync::Arc;

{%- if auth == "none" %}

/// The hook for the settings: no authentication, every connection is its
/// own anonymous user. Only for public data or local development.
pub fn hook(settings: &Settings) -> Result<Arc<dyn AuthHook>, RunError> {
    if settings.auth != nuropb_bff::AuthMode::None {
        return Err(RunError::Auth(format!(
            "this BFF was generated with auth = none; the settings ask for {:?}",
            settings.auth
        )));
    }
    Ok(Arc::new(nuropb_bff::NoAuth))
}
{%- else %}

/// The hook for the settings: the runtime's verifier (secret, PEM key or
/// JWKS, as the settings say), with this crate's claim mapping.
pub fn hook(settings: &Settings) -> Result<Arc<dyn AuthHook>, RunError> {
    let verifier = nuropb_bff::jwt_verifier_from_settings(settings)?;
    Ok(Arc::new(verifier.map_claims(identity)))
}

/// The user a connection acts for. `id` is what the settings read from the
/// verified token (`sub`, `name`/`preferred_username`, the roles from
/// `roles_claim`); change it from `claims` as your identity provider needs
/// (a tenant in the user id, roles from a custom claim), or refuse.
pub fn identity(id: Identity, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
    let _ = claims;
    Ok(id)
}
{%- endif %}
