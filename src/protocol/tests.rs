use super::*;
use serde_json::json;

// Bodies exactly as nuropb 0.1.8 `encode_payload` writes them.
const NUROPB_REQUEST: &str = r#"{"tag": "request", "service": "orders", "method": "get", "params": {"id": 7}, "correlation_id": "c0ffee", "context": {"user_id": "u1"}, "trace_id": "t1"}"#;
const NUROPB_ERROR_RESPONSE: &str = r#"{"tag": "response", "correlation_id": "c0ffee", "context": {"user_id": "u1"}, "trace_id": "t1", "result": null, "error": {"error": "NuropbException", "description": "Runtime exception calling orders.get:ValueError: bad"}, "warning": null, "reply_to": ""}"#;
const NUROPB_EVENT: &str = r#"{"tag": "event", "correlation_id": "e1", "context": {}, "trace_id": null, "topic": "orders.created", "event": {"id": 1}, "target": ["u1"]}"#;

#[test]
fn decodes_a_nuropb_request() {
    let msg = MeshMessage::decode_as(MessageType::Request, NUROPB_REQUEST.as_bytes()).unwrap();
    let MeshMessage::Request(req) = msg else {
        panic!("expected a request, got {msg:?}")
    };
    assert_eq!(req.service, "orders");
    assert_eq!(req.method, "get");
    assert_eq!(req.params["id"], 7);
    assert_eq!(req.correlation_id, "c0ffee");
    assert_eq!(req.context["user_id"], "u1");
    assert_eq!(req.trace_id.as_deref(), Some("t1"));
}

#[test]
fn decodes_a_nuropb_error_response_and_keeps_the_error() {
    let msg =
        MeshMessage::decode_as(MessageType::Response, NUROPB_ERROR_RESPONSE.as_bytes()).unwrap();
    let MeshMessage::Response(resp) = msg else {
        panic!("expected a response")
    };
    let err = resp.error.unwrap();
    assert_eq!(err.error, "NuropbException");
    assert_eq!(
        err.description.as_deref(),
        Some("Runtime exception calling orders.get:ValueError: bad")
    );
    assert_eq!(resp.result, RawJson::null());
}

#[test]
fn decodes_a_targeted_event() {
    let msg = MeshMessage::decode_as(MessageType::Event, NUROPB_EVENT.as_bytes()).unwrap();
    let MeshMessage::Event(ev) = msg else {
        panic!("expected an event")
    };
    assert_eq!(ev.topic, "orders.created");
    assert_eq!(ev.target, Some(vec!["u1".to_owned()]));
    assert_eq!(ev.trace_id, None);
}

#[test]
fn encodes_a_request_with_the_fields_nuropb_reads() {
    let body = MeshMessage::Request(RequestBody {
        correlation_id: "abc".into(),
        context: json!({"user_id": "u"}).as_object().unwrap().clone(),
        trace_id: Some("t".into()),
        service: "s".into(),
        method: "m".into(),
        params: Map::new(),
    });
    let v: Value = serde_json::to_value(&body).unwrap();
    assert_eq!(
        v,
        json!({"tag":"request","correlation_id":"abc","context":{"user_id":"u"},
               "trace_id":"t","service":"s","method":"m","params":{}})
    );
}

#[test]
fn a_borrowed_request_body_writes_the_same_bytes_as_the_owned_one() {
    let context = json!({"user_id": "u", "Authorization": "Bearer x"});
    let params = json!({"id": 7, "tags": ["a", "b\"c"], "nested": {"k": null}});
    let owned = RequestBody {
        correlation_id: "abc".into(),
        context: context.as_object().unwrap().clone(),
        trace_id: Some("t".into()),
        service: "orders".into(),
        method: "get".into(),
        params: params.as_object().unwrap().clone(),
    };
    for (tag, message) in [
        ("request", MeshMessage::Request(owned.clone())),
        ("command", MeshMessage::Command(owned.clone())),
    ] {
        for trace_id in [Some("t"), None] {
            let mut message = message.clone();
            if let MeshMessage::Request(b) | MeshMessage::Command(b) = &mut message {
                b.trace_id = trace_id.map(str::to_owned);
            }
            let borrowed = RequestBodyRef {
                tag,
                correlation_id: "abc",
                context: &Params::from(context.as_object().unwrap().clone()),
                trace_id,
                service: "orders",
                method: "get",
                params: &Params::from(params.as_object().unwrap().clone()),
            };
            assert_eq!(
                String::from_utf8(serde_json::to_vec(&borrowed).unwrap()).unwrap(),
                String::from_utf8(serde_json::to_vec(&message).unwrap()).unwrap()
            );
        }
    }
}

#[test]
fn encodes_a_response_like_nuropb() {
    let body = MeshMessage::Response(ResponseBody {
        correlation_id: "c0ffee".into(),
        context: json!({"user_id": "u1"}).as_object().unwrap().clone(),
        trace_id: Some("t1".into()),
        result: RawJson::null(),
        error: Some(ErrorBody::new(
            "NuropbException",
            "Runtime exception calling orders.get:ValueError: bad",
        )),
        warning: None,
        reply_to: String::new(),
    });
    let ours: Value = serde_json::to_value(&body).unwrap();
    let theirs: Value = serde_json::from_str(NUROPB_ERROR_RESPONSE).unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn service_error_extras_pass_through() {
    let v = json!({"error": "NuropbAuthorizationException", "description": "no", "code": 7});
    let e: ErrorBody = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(serde_json::to_value(&e).unwrap(), v);
}

#[test]
fn client_request_decodes_and_ignores_client_context() {
    let f = ClientFrame::decode(
        r#"{"type":"request","payload":{"service":"a","method":"b","params":{"x":1},"trace_id":"t","context":{"user_id":"admin"}}}"#,
    )
    .unwrap();
    assert_eq!(
        f,
        ClientFrame::Request(ClientCall {
            service: "a".into(),
            method: "b".into(),
            params: json!({"x":1}).as_object().unwrap().clone().into(),
            trace_id: Some("t".into()),
            traceparent: None,
        })
    );
}

#[test]
fn params_default_to_an_empty_object() {
    let f = ClientFrame::decode(r#"{"type":"command","payload":{"service":"a","method":"b"}}"#)
        .unwrap();
    let ClientFrame::Command(call) = f else {
        panic!("expected a command")
    };
    assert!(call.params.is_empty());
    assert_eq!(call.trace_id, None);
}

#[test]
fn malformed_frames_are_described() {
    let cases = [
        ("not json", "not valid JSON"),
        ("[1,2]", "must be a JSON object"),
        (r#"{"payload":{}}"#, "missing field `type`"),
        (r#"{"type":5,"payload":{}}"#, "`type` must be a string"),
        (r#"{"type":"request"}"#, "missing field `payload`"),
        (
            r#"{"type":"launch","payload":{}}"#,
            "unknown variant `launch`",
        ),
        (
            r#"{"type":"request","payload":{"method":"b"}}"#,
            "missing field `service`",
        ),
        (
            r#"{"type":"request","payload":{"service":"a","method":"b","params":[1]}}"#,
            "invalid type",
        ),
        (
            r#"{"type":"subscribe","payload":{"topics":"x"}}"#,
            "invalid type",
        ),
    ];
    for (text, expected) in cases {
        let err = ClientFrame::decode(text).unwrap_err();
        assert!(
            err.description.contains(expected),
            "{text}: {:?} does not mention {expected:?}",
            err.description
        );
    }
}

#[test]
fn the_one_pass_decode_takes_and_refuses_what_the_checked_one_does() {
    let frames = [
        r#"{"type":"request","payload":{"service":"a","method":"b","params":{"x":[1,{"y":null}]},"trace_id":"t"}}"#,
        r#"{"payload":{"service":"a","method":"b"},"type":"command"}"#,
        r#"{"type":"request","extra":1,"payload":{"service":"a","method":"b","context":{}}}"#,
        r#"{"type":"request","type":"command","payload":{"service":"a","method":"b"}}"#,
        r#"{"type":"subscribe","payload":{"topics":["a.*","b.#"]}}"#,
        r#"{"type":"unsubscribe","payload":{"topics":[]}}"#,
        r#"{"type":"authenticate","payload":{"token":"x.y.z"}}"#,
        r#"{"type":"request","payload":{"service":"a","method":"b","trace_id":null}}"#,
        r#"{"type":"request","payload":{"service":"a","method":"b","params":null}}"#,
        r#"{"type":"request","payload":{"service":"a"}}"#,
        r#"{"type":"request","payload":null}"#,
        r#"{"type":"Request","payload":{"service":"a","method":"b"}}"#,
        r#"{"type":"request","payload":{"service":"a","method":"b"}} trailing"#,
        r#"{"type":"request","payload":{"service":"a","method":"b"},"payload":{}}"#,
        r#"{"type":"re\u0071uest","payload":{"service":"a","method":"b"}}"#,
        r#"{"payload":{"topics":["x"],"topics":["y"]},"type":"subscribe"}"#,
        r#"{"type":"authenticate","payload":{"token":"t","token":"u"}}"#,
        r#"{"type":"request","payload":{"service":"a","method":"b","params":{"k":1,"k":2}}}"#,
        r#"  {"type":"command","payload":{"service":"a","method":"b"}}  "#,
        "",
        "null",
    ];
    for text in frames {
        let checked = ClientFrame::decode_checked(text);
        match ClientFrame::decode(text) {
            Ok(frame) => assert_eq!(Ok(frame), checked, "{text}"),
            Err(e) => assert_eq!(Err(e), checked, "{text}"),
        }
    }
}

#[test]
fn a_bad_frame_keeps_its_trace_id() {
    let err = ClientFrame::decode(r#"{"type":"request","payload":{"trace_id":"t9","method":1}}"#)
        .unwrap_err();
    assert_eq!(err.trace_id.as_deref(), Some("t9"));
}

#[test]
fn server_frames_have_the_contract_shapes() {
    let hello = ServerFrame::Event {
        topic: "hello".into(),
        event: json!({"session_id":"s","user_id":"u","username":"n"}).into(),
        position: None,
    };
    assert_eq!(
        serde_json::to_value(&hello).unwrap(),
        json!({"type":"event","payload":{"topic":"hello","event":{"session_id":"s","user_id":"u","username":"n"}}})
    );
    let resp = ServerFrame::Response {
        failed: None,
        trace_id: "t".into(),
        result: json!(3).into(),
        error: None,
    };
    assert_eq!(
        serde_json::to_value(&resp).unwrap(),
        json!({"type":"response","payload":{"trace_id":"t","result":3,"error":null}})
    );
    let err = ServerFrame::error(ErrorName::RouteNotFound, "no", None);
    assert_eq!(
        serde_json::to_value(&err).unwrap(),
        json!({"type":"error","payload":{"error":"RouteNotFound","description":"no"}})
    );
    let ack = ServerFrame::Ack {
        trace_id: "t".into(),
    };
    assert_eq!(
        ack.to_json(),
        r#"{"type":"ack","payload":{"trace_id":"t"}}"#
    );
}

mod decoder_never_panics {
    use super::super::ClientFrame;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// JSON values of any shape, a few levels deep.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("request"),
                Just("command"),
                Just("subscribe"),
                Just("authenticate"),
                Just("payload"),
                Just("topics"),
            ]
            .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("type".to_owned()),
                        Just("payload".to_owned()),
                        Just("service".to_owned()),
                        Just("method".to_owned()),
                        Just("params".to_owned()),
                        Just("trace_id".to_owned()),
                        Just("topics".to_owned()),
                        Just("token".to_owned()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn on_any_text(text in ".{0,200}") {
            let _ = ClientFrame::decode(&text);
        }

        #[test]
        fn on_any_json(v in value()) {
            let _ = ClientFrame::decode(&v.to_string());
        }

        #[test]
        fn on_frames_of_the_right_type_with_any_payload(
            kind in prop_oneof![Just("request"), Just("command"), Just("subscribe"), Just("unsubscribe"), Just("authenticate")],
            payload in value(),
        ) {
            let frame = json!({"type": kind, "payload": payload}).to_string();
            let _ = ClientFrame::decode(&frame);
        }
    }

    #[test]
    fn on_deep_nesting() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(ClientFrame::decode(&deep).is_err());
        let deep_obj = format!(
            r#"{{"type":"request","payload":{{"service":"a","method":"b","params":{}1{}}}}}"#,
            r#"{"a":"#.repeat(10_000),
            "}".repeat(10_000)
        );
        assert!(ClientFrame::decode(&deep_obj).is_err());
    }
}

#[test]
fn decoding_by_the_header_type_reads_what_the_body_types_read() {
    let Ok(MeshMessage::Request(req)) =
        MeshMessage::decode_as(MessageType::Request, NUROPB_REQUEST.as_bytes())
    else {
        panic!("a request")
    };
    assert_eq!(
        req,
        serde_json::from_str::<RequestBody>(NUROPB_REQUEST).unwrap()
    );
    let Ok(MeshMessage::Event(ev)) =
        MeshMessage::decode_as(MessageType::Event, NUROPB_EVENT.as_bytes())
    else {
        panic!("an event")
    };
    assert_eq!(ev, serde_json::from_str::<EventBody>(NUROPB_EVENT).unwrap());
    let command = NUROPB_REQUEST.replace(r#""tag": "request""#, r#""tag": "command""#);
    assert!(matches!(
        MeshMessage::decode_as(MessageType::Command, command.as_bytes()),
        Ok(MeshMessage::Command(_))
    ));
}

#[test]
fn a_body_whose_tag_is_not_its_header_type_is_refused() {
    let e = MeshMessage::decode_as(MessageType::Response, NUROPB_REQUEST.as_bytes()).unwrap_err();
    assert!(e.contains("does not match body tag `request`"), "{e}");
    let e =
        MeshMessage::decode_as(MessageType::Response, br#"{"correlation_id": "c"}"#).unwrap_err();
    assert!(e.contains("missing field `tag`"), "{e}");
    let e = MeshMessage::decode_as(MessageType::Response, br#"{"tag": 7}"#).unwrap_err();
    assert!(e.starts_with("undecodable body"), "{e}");
    // The right tag, a body that is not a response.
    let e = MeshMessage::decode_as(MessageType::Response, br#"{"tag": "response"}"#).unwrap_err();
    assert!(e.contains("missing field `correlation_id`"), "{e}");
    let e = MeshMessage::decode_as(MessageType::Event, b"[1, 2]").unwrap_err();
    assert!(e.starts_with("undecodable body"), "{e}");
    // Read in one pass, a body of another kind is still named as that,
    // whether or not it also decodes as the kind its header says.
    let e =
        MeshMessage::decode_as(MessageType::Event, NUROPB_ERROR_RESPONSE.as_bytes()).unwrap_err();
    assert!(e.contains("does not match body tag `response`"), "{e}");
    let e = MeshMessage::decode_as(MessageType::Response, NUROPB_EVENT.as_bytes()).unwrap_err();
    assert!(e.contains("does not match body tag `event`"), "{e}");
    let e = MeshMessage::decode_as(MessageType::Response, br#"{"tag": "event", "topic": "t"}"#)
        .unwrap_err();
    assert!(e.contains("does not match body tag `event`"), "{e}");
    let e =
        MeshMessage::decode_as(MessageType::Event, br#"{"tag": "event", "topic": 1}"#).unwrap_err();
    assert!(e.starts_with("undecodable body"), "{e}");
}

#[test]
fn received_responses_and_events_are_read_for_what_the_gateway_uses() {
    let body = br#"{"tag": "response", "correlation_id": "c", "context": 5, "trace_id": ["x"],
        "result": {"n": 1}, "error": null, "warning": 7, "reply_to": {}}"#;
    let Ok(MeshMessage::Response(resp)) = MeshMessage::decode_as(MessageType::Response, body)
    else {
        panic!("a response with odd extras is still a response")
    };
    assert_eq!(resp.correlation_id, "c");
    assert_eq!(
        resp.result.get(),
        r#"{"n": 1}"#,
        "the service's JSON, as it sent it"
    );
    assert!(resp.context.is_empty() && resp.trace_id.is_none() && resp.warning.is_none());
    let event =
        br#"{"tag": "event", "correlation_id": "e", "context": [1], "topic": "t", "event": 2}"#;
    let Ok(MeshMessage::Event(ev)) = MeshMessage::decode_as(MessageType::Event, event) else {
        panic!("an event's context is not read")
    };
    assert_eq!((ev.topic.as_str(), ev.event.get()), ("t", "2"));
    assert!(ev.context.is_empty());
    // The outcome itself is still checked.
    let bad = br#"{"tag": "response", "correlation_id": "c", "error": "not an object"}"#;
    assert!(MeshMessage::decode_as(MessageType::Response, bad).is_err());
}

#[test]
fn params_are_kept_as_the_client_wrote_them_until_changed() {
    let frame = r#"{"type":"request","payload":{"service":"a","method":"b","params":{"z": 1, "a": "\u00e9", "big": 1000000000000000000000000000000}}}"#;
    let Ok(ClientFrame::Request(call)) = ClientFrame::decode(frame) else {
        panic!("a request")
    };
    let written = |params: &Params| {
        let body = RequestBodyRef {
            tag: "request",
            correlation_id: "c",
            context: &Params::default(),
            trace_id: None,
            service: "a",
            method: "b",
            params,
        };
        String::from_utf8(serde_json::to_vec(&body).unwrap()).unwrap()
    };
    let mut params = call.params;
    assert!(
        written(&params).contains(
            r#""params":{"z": 1, "a": "\u00e9", "big": 1000000000000000000000000000000}"#
        ),
        "{}",
        written(&params)
    );
    // Taken as a map, unread or read, they are the map.
    assert_eq!(Map::from(params.clone())["a"], "é");
    // Read, they are the map; still written as they came.
    assert_eq!(params["a"], "é");
    assert_eq!(Map::from(params.clone()).len(), 3);
    assert_eq!(params.len(), 3);
    assert!(written(&params).contains(r#""z": 1, "a""#));
    // Changed, the map is written.
    params.insert("added".into(), json!(true));
    assert_eq!(params.len(), 4);
    assert!(
        written(&params).contains(r#""added":true"#),
        "{}",
        written(&params)
    );
    assert_eq!(params, Params::from(Map::clone(&params)));
}

#[test]
fn params_that_a_map_cannot_hold_are_refused_on_arrival() {
    for (params, why) in [
        ("[1]", "invalid type"),
        (r#""x""#, "invalid type"),
        ("null", "invalid type"),
        ("7", "invalid type"),
        (r#"{"n": 1e400}"#, "number out of range"),
        (r#"{"a": [1, {"b": -1e999}]}"#, "number out of range"),
    ] {
        let frame = format!(
            r#"{{"type":"request","payload":{{"service":"a","method":"b","params":{params}}}}}"#
        );
        let e = ClientFrame::decode(&frame).unwrap_err();
        assert!(e.description.contains(why), "{params}: {}", e.description);
    }
    let frame = r#"{"type":"request","payload":{"service":"a","method":"b","params":{"n": 1e300, "m": [1e-400]}}}"#;
    assert!(
        ClientFrame::decode(frame).is_ok(),
        "what a Value holds is taken"
    );
}

#[test]
fn a_body_that_is_not_utf8_is_refused_and_any_utf8_is_read() {
    let mut body = br#"{"tag": "response", "correlation_id": "c", "result": ""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""}"#);
    for kind in [
        MessageType::Response,
        MessageType::Event,
        MessageType::Request,
    ] {
        let e = MeshMessage::decode_as(kind, &body).unwrap_err();
        assert!(e.starts_with("undecodable body: not UTF-8"), "{e}");
    }
    let text =
        r#"{"tag": "response", "correlation_id": "c", "result": {"naïve": "日本 😀 \u00e9"}}"#;
    let Ok(MeshMessage::Response(r)) =
        MeshMessage::decode_as(MessageType::Response, text.as_bytes())
    else {
        panic!("a response")
    };
    assert_eq!(r.result.get(), r#"{"naïve": "日本 😀 \u00e9"}"#);
}

#[test]
fn a_request_body_is_written_into_a_buffer_sized_for_it() {
    let session = std::sync::Arc::new(crate::protocol::SessionInfo {
        session_id: "0123456789abcdef0123456789abcdef".into(),
        user_id: "user-\"quoted\"-ü".into(),
        username: None,
        roles: vec![],
    });
    let token = serde_json::value::to_raw_value(&"t".repeat(900)).unwrap();
    for (token, params) in [
        (None, r#"{}"#.to_owned()),
        (
            Some(token),
            format!(r#"{{"blob": "{}", "n": [1, 2.5, -3]}}"#, "x".repeat(4096)),
        ),
    ] {
        let context = Params::context(session.clone(), token.map(Into::into), "trace-1", None);
        let params: Params = serde_json::from_str(&params).unwrap();
        let body = RequestBodyRef {
            tag: "request",
            correlation_id: "c0ffee",
            context: &context,
            trace_id: Some("trace-1"),
            service: "orders",
            method: "get",
            params: &params,
        };
        let written = body.to_vec().unwrap();
        assert_eq!(written, serde_json::to_vec(&body).unwrap());
        assert!(
            written.len() <= body.size_hint(),
            "{} bytes, {} foreseen",
            written.len(),
            body.size_hint()
        );
    }
}
