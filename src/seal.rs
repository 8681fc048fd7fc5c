//! Control messages between the instances of one BFF, sealed with the
//! cluster key. The control exchange is a fanout any broker peer may be
//! able to publish to and read from, so a control message carries no bearer
//! token (the instance that took a push checked the caller's) and is
//! believed only when its HMAC-SHA256 over the whole message is right and
//! its timestamp is within [`WINDOW`]: a captured message replayed as it
//! is acts once (pushes are de-duplicated by id for longer than the
//! window), and one with any field changed does not verify.
//!
//! The sealed form is `{"sealed": "<the message as JSON text>", "sig":
//! "<hex>"}`: the text is verified as the bytes it is, then parsed, so no
//! second serialisation has to agree with the first.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::config::Secret;

/// How far a sealed message's timestamp may be from this instance's clock.
pub(crate) const WINDOW: Duration = Duration::from_secs(30);

/// The largest sealed text opened: control messages are small, and a push
/// carries at most what the mesh API took.
const MAX_SEALED: usize = 1 << 20;

/// Why a control message was not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsealed {
    /// This instance has no cluster key: it cannot tell a peer's message
    /// from an attacker's.
    NoKey,
    /// Not in the sealed form, or not JSON inside.
    Malformed,
    /// The signature does not match the text.
    BadSignature,
    /// Signed, but too old or from too far in the future.
    Stale,
}

impl Unsealed {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Unsealed::NoKey => "no_cluster_key",
            Unsealed::Malformed => "unsealed",
            Unsealed::BadSignature => "bad_signature",
            Unsealed::Stale => "stale",
        }
    }
}

/// Seals and opens control messages with the cluster key (if any).
#[derive(Clone)]
pub(crate) struct Seal {
    key: Option<Secret>,
}

impl fmt::Debug for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seal")
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Seal {
    pub(crate) fn new(key: Option<Secret>) -> Self {
        Self {
            key: key.filter(|k| !k.is_empty()),
        }
    }

    /// Whether control messages can be sealed and opened here.
    pub(crate) fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    fn mac(&self) -> Option<Hmac<Sha256>> {
        let key = self.key.as_ref()?;
        // HMAC takes keys of any length.
        Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()).ok()
    }

    /// `message` (an object) stamped with the time and sealed; `None`
    /// without a key (or for anything but an object).
    pub(crate) fn seal(&self, message: Value) -> Option<Value> {
        self.seal_at(message, now_ms())
    }

    fn seal_at(&self, message: Value, at_ms: u64) -> Option<Value> {
        let Value::Object(mut message) = message else {
            return None;
        };
        let mut mac = self.mac()?;
        message.insert("ts".into(), at_ms.into());
        let text = Value::Object(message).to_string();
        mac.update(text.as_bytes());
        let sig = hex(&mac.finalize().into_bytes());
        Some(serde_json::json!({"sealed": text, "sig": sig}))
    }

    /// The message a sealed control message carries, when its seal is
    /// right and its time within [`WINDOW`].
    pub(crate) fn open(&self, sealed: &Value) -> Result<Map<String, Value>, Unsealed> {
        self.open_at(sealed, now_ms())
    }

    fn open_at(&self, sealed: &Value, now: u64) -> Result<Map<String, Value>, Unsealed> {
        let Some(mut mac) = self.mac() else {
            return Err(Unsealed::NoKey);
        };
        let text = sealed
            .get("sealed")
            .and_then(Value::as_str)
            .filter(|t| t.len() <= MAX_SEALED)
            .ok_or(Unsealed::Malformed)?;
        let sig = sealed
            .get("sig")
            .and_then(Value::as_str)
            .and_then(unhex)
            .ok_or(Unsealed::Malformed)?;
        mac.update(text.as_bytes());
        mac.verify_slice(&sig).map_err(|_| Unsealed::BadSignature)?;
        let Ok(Value::Object(message)) = serde_json::from_str::<Value>(text) else {
            return Err(Unsealed::Malformed);
        };
        let at = message
            .get("ts")
            .and_then(Value::as_u64)
            .ok_or(Unsealed::Malformed)?;
        let window = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        if at.abs_diff(now) > window {
            return Err(Unsealed::Stale);
        }
        Ok(message)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn seal() -> Seal {
        Seal::new(Some("a-cluster-key-of-at-least-32-bytes".into()))
    }

    fn push() -> Value {
        json!({"op": "push", "id": "p1", "origin": "a", "method": "broadcast"})
    }

    #[test]
    fn a_sealed_message_opens_as_it_was_sent() {
        let s = seal();
        let sealed = s.seal_at(push(), 1_000_000).unwrap();
        let opened = s.open_at(&sealed, 1_000_500).unwrap();
        assert_eq!(opened["id"], "p1");
        assert_eq!(opened["ts"], 1_000_000);
    }

    #[test]
    fn any_change_a_wrong_key_a_stale_time_or_no_key_is_refused() {
        let s = seal();
        let sealed = s.seal_at(push(), 1_000_000).unwrap();
        let text = sealed["sealed"].as_str().unwrap();
        let changed = json!({"sealed": text.replace("p1", "p2"), "sig": sealed["sig"]});
        assert_eq!(s.open_at(&changed, 1_000_000), Err(Unsealed::BadSignature));
        let other = Seal::new(Some("another-key-of-at-least-32-bytes-long".into()));
        assert_eq!(
            other.open_at(&sealed, 1_000_000),
            Err(Unsealed::BadSignature)
        );
        let late = 1_000_000 + WINDOW.as_millis() as u64 + 1;
        assert_eq!(s.open_at(&sealed, late), Err(Unsealed::Stale));
        let early = 1_000_000 - WINDOW.as_millis() as u64 - 1;
        assert_eq!(s.open_at(&sealed, early), Err(Unsealed::Stale));
        assert_eq!(
            Seal::new(None).open_at(&sealed, 1_000_000),
            Err(Unsealed::NoKey)
        );
        assert_eq!(Seal::new(None).seal(push()), None);
        assert_eq!(s.seal(json!(["not", "an", "object"])), None);
        for bad in [
            json!({"op": "push", "id": "p1"}),
            json!({"sealed": text, "sig": "zz"}),
            json!({"sealed": 7, "sig": sealed["sig"]}),
        ] {
            assert_eq!(
                s.open_at(&bad, 1_000_000),
                Err(Unsealed::Malformed),
                "{bad}"
            );
        }
        assert!(!format!("{s:?}").contains("cluster-key"));
    }

    proptest! {
        /// Whatever a peer sends, opening it answers (no panic), and only
        /// a message sealed with the key opens.
        #[test]
        fn forged_messages_do_not_open(text in ".{0,200}", sig in "[0-9a-f]{64}") {
            let forged = json!({"sealed": text, "sig": sig});
            prop_assert!(seal().open_at(&forged, 0).is_err());
        }
    }
}
