//! The WebSocket opening handshake (RFC 6455 section 4.2), server side:
//! whether an HTTP/1.1 request asks for a WebSocket, and the `101` that
//! accepts it.
//!
//! Ours rather than axum's `WebSocketUpgrade`: that extractor spawns the
//! connection's task itself, and the task kept the handshake's state (its
//! settings, the callback's captures, the upgrade future) beside the
//! connection's own for the socket's whole life, 700 bytes and more of
//! every idle socket. Here the caller spawns what it wants and the request
//! is only read: each header is looked at once, a refusal says which one
//! was wrong, and nothing of the request is kept.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Why a request is not a WebSocket opening handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotWebSocket {
    Method,
    Version,
    Connection,
    Upgrade,
    WebSocketVersion,
    Key,
}

impl NotWebSocket {
    fn status(self) -> StatusCode {
        match self {
            NotWebSocket::Method => StatusCode::METHOD_NOT_ALLOWED,
            // RFC 6455 4.2.2: an unsupported version is answered 426 with
            // the versions this server speaks.
            NotWebSocket::WebSocketVersion => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn description(self) -> &'static str {
        match self {
            NotWebSocket::Method => "a WebSocket upgrade is a GET request",
            NotWebSocket::Version => "a WebSocket upgrade needs HTTP/1.1",
            NotWebSocket::Connection => "the Connection header does not include `upgrade`",
            NotWebSocket::Upgrade => "the Upgrade header is not `websocket`",
            NotWebSocket::WebSocketVersion => "Sec-WebSocket-Version must be 13",
            NotWebSocket::Key => {
                "Sec-WebSocket-Key is missing or not 16 bytes in base64 (24 characters)"
            }
        }
    }
}

impl IntoResponse for NotWebSocket {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.description()).into_response();
        if self == NotWebSocket::WebSocketVersion {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// Whether a comma-separated header holds `token` (case-insensitively),
/// in any of its values.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The `Sec-WebSocket-Accept` value of a request that asks for a WebSocket,
/// or why it does not.
pub(crate) fn accept_key(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<String, NotWebSocket> {
    if method != Method::GET {
        return Err(NotWebSocket::Method);
    }
    if version != Version::HTTP_11 {
        return Err(NotWebSocket::Version);
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(NotWebSocket::Connection);
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(NotWebSocket::Upgrade);
    }
    let version = headers.get(header::SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v.as_bytes().trim_ascii() != b"13") {
        return Err(NotWebSocket::WebSocketVersion);
    }
    // Sixteen random bytes in base64: 24 characters, the last two `==`
    // (RFC 6455 4.1). The value is only hashed, never decoded.
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .filter(|k| {
            k.len() == 24
                && k.ends_with(b"==")
                && k[..22]
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        })
        .ok_or(NotWebSocket::Key)?;
    Ok(derive_accept_key(key))
}

/// The `101 Switching Protocols` that accepts the handshake.
pub(crate) fn switching(accept: &str) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    const GOOD: [(&str, &str); 4] = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn the_rfc_example_is_accepted_with_its_key() {
        let key = accept_key(&Method::GET, Version::HTTP_11, &request(&GOOD)).unwrap();
        // RFC 6455 section 1.3.
        assert_eq!(key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let response = switching(&key);
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()[header::SEC_WEBSOCKET_ACCEPT], key);
        assert_eq!(response.headers()[header::UPGRADE], "websocket");
    }

    #[test]
    fn browsers_header_lists_are_read_as_lists() {
        // Firefox sends `Connection: keep-alive, Upgrade`.
        let mut pairs = GOOD;
        pairs[0] = ("connection", "keep-alive, Upgrade");
        pairs[1] = ("upgrade", "WebSocket");
        assert!(accept_key(&Method::GET, Version::HTTP_11, &request(&pairs)).is_ok());
        // `upgrades` is not `upgrade`.
        pairs[0] = ("connection", "upgrades");
        assert_eq!(
            accept_key(&Method::GET, Version::HTTP_11, &request(&pairs)),
            Err(NotWebSocket::Connection)
        );
    }

    #[test]
    fn each_missing_or_wrong_part_is_named() {
        let with = |i: usize, value: Option<&str>| {
            let mut pairs: Vec<(&str, &str)> = GOOD.to_vec();
            match value {
                Some(v) => pairs[i].1 = v,
                None => {
                    pairs.remove(i);
                }
            }
            accept_key(&Method::GET, Version::HTTP_11, &request(&pairs))
        };
        assert_eq!(with(0, None), Err(NotWebSocket::Connection));
        assert_eq!(with(1, Some("h2c")), Err(NotWebSocket::Upgrade));
        assert_eq!(with(2, Some("8")), Err(NotWebSocket::WebSocketVersion));
        assert_eq!(with(2, None), Err(NotWebSocket::WebSocketVersion));
        assert_eq!(with(3, None), Err(NotWebSocket::Key));
        assert_eq!(with(3, Some("short==")), Err(NotWebSocket::Key));
        assert_eq!(
            with(3, Some("dGhlIHNhbXBsZSBub25jZQ!=")),
            Err(NotWebSocket::Key)
        );
        let headers = request(&GOOD);
        assert_eq!(
            accept_key(&Method::POST, Version::HTTP_11, &headers),
            Err(NotWebSocket::Method)
        );
        assert_eq!(
            accept_key(&Method::GET, Version::HTTP_10, &headers),
            Err(NotWebSocket::Version)
        );
        let refused = NotWebSocket::WebSocketVersion.into_response();
        assert_eq!(refused.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(refused.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }

    proptest! {
        /// Any header values at all: an answer, never a panic; and an
        /// accepted key is always the hash of a 24-character key.
        #[test]
        fn any_headers_get_an_answer(
            connection in "[ -~]{0,40}",
            upgrade in "[ -~]{0,20}",
            version in "[ -~]{0,4}",
            key in "[ -~]{0,30}",
        ) {
            let pairs = [
                ("connection", connection.as_str()),
                ("upgrade", upgrade.as_str()),
                ("sec-websocket-version", version.as_str()),
                ("sec-websocket-key", key.as_str()),
            ];
            let headers = request(&pairs);
            if let Ok(accept) = accept_key(&Method::GET, Version::HTTP_11, &headers) {
                prop_assert_eq!(key.trim().len(), 24);
                prop_assert_eq!(accept.len(), 28);
            }
        }
    }
}
