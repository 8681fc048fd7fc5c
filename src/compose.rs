//! Composed routes: one client call that gathers several routed calls,
//! made concurrently on the client's behalf, into one object of results.
//! This module holds the pure parts: each part's params, and how the parts'
//! outcomes make the answer. `ws` runs the calls.

use serde_json::{Map, Value};

use crate::protocol::ErrorBody;
use crate::protocol::SessionInfo;
use crate::routing::{Part, PartParams};

/// A part's params: the client's, or its own fields with `$session.*` and
/// `$client.*` values filled in (a missing field is null).
pub(crate) fn part_params(
    part: &Part,
    session: &SessionInfo,
    client: &Map<String, Value>,
) -> Map<String, Value> {
    let fields = match &part.params {
        PartParams::Client => return client.clone(),
        PartParams::Fields(f) => f,
    };
    fields
        .iter()
        .map(|(k, v)| {
            let value = match v.as_str() {
                Some("$session.user_id") => Value::String(session.user_id.clone()),
                Some("$session.session_id") => Value::String(session.session_id.clone()),
                Some("$session.username") => {
                    session.username.clone().map_or(Value::Null, Value::String)
                }
                Some(s) if s.starts_with("$client.") => client
                    .get(&s["$client.".len()..])
                    .cloned()
                    .unwrap_or(Value::Null),
                _ => v.clone(),
            };
            (k.clone(), value)
        })
        .collect()
}

/// What a composed call answers: the results by key and the failures by
/// key, or the first failure of a `required` part.
pub(crate) fn combine(
    parts: &[Part],
    outcomes: Vec<Result<Value, ErrorBody>>,
) -> Result<(Value, Option<Map<String, Value>>), ErrorBody> {
    let mut results = Map::new();
    let mut failed = Map::new();
    for (part, outcome) in parts.iter().zip(outcomes) {
        match outcome {
            Ok(v) => {
                results.insert(part.key.clone(), v);
            }
            Err(e) if part.required => {
                let why = e.description.clone().unwrap_or_default();
                return Err(ErrorBody::new(
                    e.error,
                    format!("required part `{}` failed: {why}", part.key),
                ));
            }
            Err(e) => {
                failed.insert(
                    part.key.clone(),
                    serde_json::to_value(&e).unwrap_or(Value::Null),
                );
            }
        }
    }
    let failed = (!failed.is_empty()).then_some(failed);
    Ok((Value::Object(results), failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn part(key: &str, params: PartParams, required: bool) -> Part {
        Part {
            key: key.into(),
            service: "s".into(),
            method: "m".into(),
            params,
            required,
        }
    }

    #[test]
    fn params_come_from_the_client_fixed_values_or_the_session() {
        let session = SessionInfo {
            session_id: "sid".into(),
            user_id: "ann".into(),
            username: None,
            roles: vec![],
        };
        let client = json!({"page": 2, "q": "x"}).as_object().unwrap().clone();
        assert_eq!(
            part_params(&part("a", PartParams::Client, false), &session, &client),
            client
        );
        let fields = json!({"user": "$session.user_id", "page": "$client.page", "gone": "$client.nope", "limit": 10, "name": "$session.username"});
        let p = part(
            "b",
            PartParams::Fields(fields.as_object().unwrap().clone()),
            false,
        );
        assert_eq!(
            Value::Object(part_params(&p, &session, &client)),
            json!({"user": "ann", "page": 2, "gone": null, "limit": 10, "name": null})
        );
    }

    #[test]
    fn failed_parts_are_named_unless_required() {
        let parts = [
            part("a", PartParams::Client, false),
            part("b", PartParams::Client, false),
            part("c", PartParams::Client, true),
        ];
        let boom = || Err(ErrorBody::new("NuropbException", "boom"));
        let (result, failed) = combine(&parts, vec![Ok(json!(1)), boom(), Ok(json!(3))]).unwrap();
        assert_eq!(result, json!({"a": 1, "c": 3}));
        assert_eq!(failed.unwrap()["b"]["error"], "NuropbException");
        let e = combine(&parts, vec![Ok(json!(1)), Ok(json!(2)), boom()]).unwrap_err();
        assert_eq!(e.error, "NuropbException");
        assert!(e.description.unwrap().contains("required part `c`"));
        let (_, none_failed) =
            combine(&parts, vec![Ok(json!(1)), Ok(json!(2)), Ok(json!(3))]).unwrap();
        assert!(none_failed.is_none());
    }
}
