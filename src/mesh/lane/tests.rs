use super::codec::*;
use super::socket::*;
use super::*;
use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::frame::AMQPFrame;
use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn reader_of(bytes: Vec<u8>) -> FrameReader {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let _ = b.write_all(&bytes).await;
    });
    FrameReader::new(Box::pin(a))
}

#[tokio::test]
async fn frames_over_the_negotiated_size_are_refused_before_buffering() {
    // A header announcing a 1 MiB payload: refused from its 7 bytes.
    let mut bytes = vec![FRAME_BODY, 0, 1];
    bytes.extend_from_slice(&(1u32 << 20).to_be_bytes());
    let mut r = reader_of(bytes);
    r.fill(None).await.unwrap();
    let err = r.buf.buffered().unwrap_err();
    assert!(err.to_string().contains("negotiated"), "{err}");
}

#[tokio::test]
async fn a_frame_without_its_end_byte_is_refused() {
    let mut bytes = vec![FRAME_BODY, 0, 1, 0, 0, 0, 2, b'h', b'i', 0x00];
    bytes.extend_from_slice(&[0; 4]);
    let mut r = reader_of(bytes);
    r.fill(None).await.unwrap();
    assert!(
        r.buf
            .buffered()
            .unwrap_err()
            .to_string()
            .contains("end byte")
    );
}

#[test]
fn bodies_are_cut_to_the_frame_size() {
    let mut out = Vec::new();
    let body = vec![7u8; 10_000];
    put_body(&mut out, &body, 4096);
    // 4088 + 4088 + 1824
    assert_eq!(out.len(), 10_000 + 3 * FRAME_OVERHEAD);
    assert_eq!(&out[3..7], &4088u32.to_be_bytes());
    assert_eq!(out[7 + 4088], FRAME_END);
}

#[tokio::test]
async fn a_publish_encodes_method_header_and_body_that_parse_back() {
    let inner = test_inner();
    let lane = Lane {
        inner: inner.clone(),
    };
    let props = Properties {
        content_type: "application/json",
        correlation_id: "abc",
        reply_to: "rq",
        expiration_ms: 500,
        headers: &[("trace_id", Some("t"))],
    };
    lane.publish("x", "svc", true, &props, b"{\"a\":1}")
        .unwrap();
    let bytes = std::mem::take(&mut *lock(&inner.out));
    let mut r = reader_of(bytes);
    r.fill(None).await.unwrap();
    let m = r.buf.buffered().unwrap().unwrap();
    match decode_method(r.buf.payload(m)).unwrap() {
        AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
            assert_eq!(p.exchange.as_str(), "x");
            assert_eq!(p.routing_key.as_str(), "svc");
            assert!(p.mandatory);
        }
        other => panic!("{other:?}"),
    }
    let h = r.buf.buffered().unwrap().unwrap();
    let (_, header) = parse_content_header(r.buf.payload(h)).unwrap();
    assert_eq!(header.body_size, 7);
    assert_eq!(
        header
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("abc")
    );
    let b = r.buf.buffered().unwrap().unwrap();
    assert_eq!(r.buf.payload(b), b"{\"a\":1}");
    // Closed: refused at once.
    inner.open.store(false, Ordering::Release);
    assert!(lane.publish("x", "svc", true, &props, b"{}").is_err());
}

/// A content header as lapin's codec writes it: every basic property
/// set, and a header of every field type a broker sends.
fn full_header(body_size: u64) -> Vec<u8> {
    use amq_protocol::types::{DecimalValue, FieldArray};
    let mut nested = FieldTable::default();
    nested.insert("deep".into(), AMQPValue::LongString("no".into()));
    let mut headers = FieldTable::default();
    let values = [
        AMQPValue::Boolean(true),
        AMQPValue::ShortShortInt(-1),
        AMQPValue::ShortShortUInt(1),
        AMQPValue::ShortInt(-2),
        AMQPValue::ShortUInt(2),
        AMQPValue::LongInt(-3),
        AMQPValue::LongUInt(3),
        AMQPValue::LongLongInt(-4),
        AMQPValue::Float(1.5),
        AMQPValue::Double(2.5),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 314,
        }),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString("x".into())])),
        AMQPValue::Timestamp(1_700_000_000),
        AMQPValue::FieldTable(nested),
        AMQPValue::ByteArray(vec![1u8, 2, 3].into()),
        AMQPValue::Void,
    ];
    for (i, v) in values.into_iter().enumerate() {
        headers.insert(format!("h{i:02}").into(), v);
    }
    headers.insert(
        "nuropb_type".into(),
        AMQPValue::LongString("response".into()),
    );
    headers.insert(
        "z_bytes".into(),
        AMQPValue::LongString(vec![0xff, b'a'].into()),
    );
    headers.insert("x-stream-offset".into(), AMQPValue::LongLongInt(1 << 40));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("corr-1".into())
        .with_reply_to("rq".into())
        .with_expiration("1000".into())
        .with_message_id("m".into())
        .with_timestamp(1_700_000_000)
        .with_type("t".into())
        .with_user_id("guest".into())
        .with_app_id("app".into())
        .with_cluster_id("c".into());
    let header = AMQPContentHeader {
        class_id: BASIC_CLASS,
        body_size,
        properties,
    };
    let mut out = Vec::new();
    encode(&AMQPFrame::Header(CHANNEL, header), &mut out).unwrap();
    // The payload: without the frame's 7-byte head and its end byte.
    out[7..out.len() - 1].to_vec()
}

#[test]
fn a_content_header_is_read_in_place_as_lapins_codec_wrote_it() {
    let payload = full_header(1234);
    let (size, p) = parse_header(&payload).unwrap();
    assert_eq!(size, 1234);
    assert_eq!(p.correlation_id(), Some("corr-1"));
    assert_eq!(p.header("nuropb_type").as_deref(), Some("response"));
    // Bytes that are not UTF-8 are replaced, not refused.
    assert_eq!(p.header("z_bytes").as_deref(), Some("\u{fffd}a"));
    // A header of another type is no string; a nested one is not a
    // top-level one; an absent one is absent.
    assert_eq!(p.header("h00"), None);
    assert_eq!(p.header("deep"), None);
    assert_eq!(p.header("absent"), None);
    // Integers: a stream's offset; signed ones only when not negative.
    assert_eq!(p.int_header("x-stream-offset"), Some(1 << 40));
    let ints: Vec<Option<u64>> = (1..=7).map(|i| p.int_header(&format!("h{i:02}"))).collect();
    assert_eq!(ints, [None, Some(1), None, Some(2), None, Some(3), None]);
    assert_eq!(p.int_header("h12"), None, "a timestamp is no integer");
    assert_eq!(p.int_header("nuropb_type"), None);
    // Only the correlation id and the headers: nothing else set.
    let bare = {
        let header = AMQPContentHeader {
            class_id: BASIC_CLASS,
            body_size: 0,
            properties: BasicProperties::default(),
        };
        let mut out = Vec::new();
        encode(&AMQPFrame::Header(CHANNEL, header), &mut out).unwrap();
        out[7..out.len() - 1].to_vec()
    };
    let (size, p) = parse_header(&bare).unwrap();
    assert_eq!((size, p.correlation_id(), p.header("x")), (0, None, None));
}

#[test]
fn a_cut_or_malformed_content_header_is_refused_not_misread() {
    let payload = full_header(7);
    // Cut anywhere: refused (never a panic, never a short read taken
    // for the whole).
    for cut in 0..payload.len() {
        assert!(parse_header(&payload[..cut]).is_err(), "cut at {cut}");
    }
    // Another class.
    let mut other = payload.clone();
    other[1] = 50;
    assert!(parse_header(&other).is_err());
    // A field of a type no broker sends ('h00' holds a boolean).
    let at = payload.windows(4).position(|w| w == b"h00t").unwrap();
    let mut unknown = payload.clone();
    unknown[at + 3] = b'?';
    assert!(parse_header(&unknown).is_err());
    // A continuation flag word naming more properties.
    let mut more = payload[..14].to_vec();
    more[13] |= 1;
    more.extend_from_slice(&[0x80, 0x00]);
    more.extend_from_slice(&payload[14..]);
    assert!(parse_header(&more).is_err());
}

#[test]
fn a_deliver_is_read_in_place_and_anything_else_is_left_to_the_codec() {
    let frame = deliver_to(EVENTS_TAG, 42);
    let payload = &frame[7..frame.len() - 1];
    assert_eq!(parse_deliver(payload, EVENTS_TAG), Some((42, true)));
    assert_eq!(parse_deliver(payload, RESPONSES_TAG), Some((42, false)));
    // Cut short: neither reader takes it, so the lane ends on it
    // (never an unread deliver left to the codec's ignored methods).
    for cut in 0..payload.len() {
        assert_eq!(parse_deliver(&payload[..cut], EVENTS_TAG), None);
        assert!(decode_method(&payload[..cut]).is_err(), "cut at {cut}");
    }
    // Bytes after its fields are left unread by both, as lapin's codec
    // leaves them.
    let mut longer = payload.to_vec();
    longer.extend_from_slice(b"more");
    assert_eq!(parse_deliver(&longer, EVENTS_TAG), Some((42, true)));
    assert!(matches!(
        decode_method(&longer),
        Ok(AMQPClass::Basic(basic::AMQPMethod::Deliver(_)))
    ));
    let ack = method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 1,
            multiple: false,
        })),
    );
    assert_eq!(parse_deliver(&ack[7..ack.len() - 1], EVENTS_TAG), None);
}

/// What lapin's codec writes for the same publish.
fn lapin_publish(
    mandatory: bool,
    props: &Properties<'_>,
    body: &[u8],
    frame_max: usize,
) -> Vec<u8> {
    let publish = basic::AMQPMethod::Publish(basic::Publish {
        exchange: "nuropb-rpc-exchange".into(),
        routing_key: "orders".into(),
        mandatory,
        immediate: false,
    });
    let mut out = method(CHANNEL, AMQPClass::Basic(publish));
    let mut headers = FieldTable::default();
    for (name, value) in props.headers {
        let value = value.map_or(AMQPValue::Void, |v| AMQPValue::LongString(v.into()));
        headers.insert((*name).into(), value);
    }
    let properties = BasicProperties::default()
        .with_content_type(props.content_type.into())
        .with_correlation_id(props.correlation_id.into())
        .with_reply_to(props.reply_to.into())
        .with_expiration(props.expiration_ms.to_string().into())
        .with_headers(headers);
    let header = AMQPContentHeader {
        class_id: BASIC_CLASS,
        body_size: body.len() as u64,
        properties,
    };
    encode(&AMQPFrame::Header(CHANNEL, header), &mut out).unwrap();
    put_body(&mut out, body, frame_max);
    out
}

#[test]
fn a_publish_is_written_byte_for_byte_as_lapins_codec_writes_it() {
    let body = vec![b'x'; 10_000];
    for (trace_id, expiration_ms, mandatory) in [
        (Some("t-1"), 1, true),
        (None, 30_000, true),
        (Some(""), u64::MAX, false),
    ] {
        let headers = [
            ("encrypted", Some("")),
            ("nuropb_protocol", Some("0.1.1")),
            ("nuropb_type", Some("request")),
            ("nuropb_version", Some("0.1.8")),
            ("trace_id", trace_id),
        ];
        let props = Properties {
            content_type: "application/json",
            correlation_id: "5f0c2e8d9a1b4c3d8e7f6a5b4c3d2e1f",
            reply_to: "nuropb-bff-abc-rq",
            expiration_ms,
            headers: &headers,
        };
        let inner = test_inner();
        let lane = Lane {
            inner: inner.clone(),
        };
        for body in [&body[..], b"", b"{}"] {
            lane.publish("nuropb-rpc-exchange", "orders", mandatory, &props, body)
                .unwrap();
            let ours = std::mem::take(&mut *lock(&inner.out));
            assert_eq!(
                ours,
                lapin_publish(mandatory, &props, body, inner.frame_max),
                "trace_id {trace_id:?}, expiration {expiration_ms}, body {} bytes",
                body.len()
            );
        }
    }
}

#[test]
fn a_publish_that_cannot_be_written_is_refused_and_queues_nothing() {
    let inner = test_inner();
    let lane = Lane {
        inner: inner.clone(),
    };
    let long = "n".repeat(256);
    let huge = "v".repeat(5000);
    let ok = Properties {
        content_type: "application/json",
        correlation_id: "c",
        reply_to: "rq",
        expiration_ms: 1,
        headers: &[],
    };
    let cases = [
        ("exchange", long.as_str(), "svc", Properties { ..ok }),
        ("routing key", "x", long.as_str(), Properties { ..ok }),
        (
            "content type",
            "x",
            "svc",
            Properties {
                content_type: &long,
                ..ok
            },
        ),
        (
            "correlation",
            "x",
            "svc",
            Properties {
                correlation_id: &long,
                ..ok
            },
        ),
        (
            "reply",
            "x",
            "svc",
            Properties {
                reply_to: &long,
                ..ok
            },
        ),
        (
            "header name",
            "x",
            "svc",
            Properties {
                headers: &[(long.as_str(), None)],
                ..ok
            },
        ),
        (
            "frame size",
            "x",
            "svc",
            Properties {
                headers: &[("trace_id", Some(huge.as_str()))],
                ..ok
            },
        ),
    ];
    for (what, exchange, routing_key, props) in cases {
        let e = lane
            .publish(exchange, routing_key, true, &props, b"{}")
            .expect_err(what);
        assert!(
            e.to_string().contains("over"),
            "{what}: the error says why: {e}"
        );
        assert!(lock(&inner.out).is_empty(), "{what}: nothing was queued");
    }
}

/// Publishes that write the socket themselves and the writer task,
/// mixed as a peer that stops reading makes them: every byte arrives,
/// in the order it was queued.
#[tokio::test]
async fn direct_and_queued_writes_reach_the_socket_in_order() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ours = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut peer, _) = listener.accept().await.unwrap();
    let (_read, write) = ours.into_split();
    let write = Arc::new(write);
    let inner = Arc::new(Inner {
        direct: Some(write.clone()),
        ..Arc::into_inner(test_inner()).unwrap()
    });

    // While the writer holds frames it has not written all of, a
    // publish waits behind them, even with nothing queued.
    inner.writing.store(true, Ordering::Relaxed);
    inner.queue(|out| out.extend_from_slice(b"held")).unwrap();
    assert_eq!(lock(&inner.out).as_slice(), b"held");
    lock(&inner.out).clear();
    inner.writing.store(false, Ordering::Relaxed);
    // Nothing queued, nothing being written: written at once.
    inner.queue(|out| out.extend_from_slice(b"first")).unwrap();
    assert!(lock(&inner.out).is_empty());
    let mut sent = b"first".to_vec();
    // The peer does not read: the socket fills, and what it cannot
    // take waits for the writer, with everything queued after it.
    let mut chunks = 0u32;
    while lock(&inner.out).is_empty() {
        chunks += 1;
        assert!(chunks < 2000, "the socket never filled");
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i as u32 ^ chunks) as u8).collect();
        inner.queue(|out| out.extend_from_slice(&chunk)).unwrap();
        sent.extend_from_slice(&chunk);
    }
    for tail in [&b"after"[..], b"the", b"fill"] {
        inner.queue(|out| out.extend_from_slice(tail)).unwrap();
        sent.extend_from_slice(tail);
    }
    let writer = {
        let inner = inner.clone();
        tokio::spawn(async move {
            let mut writer: Writer = Box::pin(SharedWrite(write));
            write_loop(&inner, &mut writer, None).await
        })
    };
    let mut received = vec![0u8; sent.len()];
    tokio::time::timeout(Duration::from_secs(20), peer.read_exact(&mut received))
        .await
        .expect("everything arrives")
        .unwrap();
    assert!(received == sent, "the bytes arrived out of order");
    // Once the writer is idle, a publish writes directly again.
    tokio::time::timeout(Duration::from_secs(5), async {
        while inner.writing.load(Ordering::Relaxed) || !lock(&inner.out).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    inner.queue(|out| out.extend_from_slice(b"last")).unwrap();
    assert!(lock(&inner.out).is_empty());
    let mut last = [0u8; 4];
    peer.read_exact(&mut last).await.unwrap();
    assert_eq!(&last, b"last");

    // Publishes while the writer has a batch in flight and the peer
    // reads slowly: still in order.
    let mut sent = Vec::new();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_millis(500), peer.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return got,
            }
            tokio::task::yield_now().await;
        }
    });
    for i in 0..400u32 {
        let chunk: Vec<u8> = (0..16 * 1024).map(|j| (j as u32 ^ i) as u8).collect();
        inner.queue(|out| out.extend_from_slice(&chunk)).unwrap();
        sent.extend_from_slice(&chunk);
        if i % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let got = reader.await.unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the bytes arrived out of order");
    writer.abort();
}

fn test_inner() -> Arc<Inner> {
    Arc::new(Inner {
        out: Mutex::new(Vec::new()),
        writing: AtomicBool::new(false),
        direct: None,
        wake: Notify::new(),
        open: AtomicBool::new(true),
        blocked: Mutex::new(None),
        frame_max: 4096,
    })
}

pub(super) fn method(channel: u16, class: AMQPClass) -> Vec<u8> {
    method_frame(channel, class).unwrap()
}

pub(super) fn deliver(tag: u64) -> Vec<u8> {
    deliver_to(RESPONSES_TAG, tag)
}

pub(super) fn deliver_to(consumer: &str, tag: u64) -> Vec<u8> {
    method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: consumer.into(),
            delivery_tag: tag,
            redelivered: false,
            exchange: "".into(),
            routing_key: "rq".into(),
        })),
    )
}

pub(super) fn header(size: u64, correlation_id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let props = BasicProperties::default().with_correlation_id(correlation_id.into());
    let h = AMQPContentHeader {
        class_id: BASIC_CLASS,
        body_size: size,
        properties: props,
    };
    encode(&AMQPFrame::Header(CHANNEL, h), &mut out).unwrap();
    out
}

pub(super) fn body(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_body(&mut out, bytes, 4096);
    out
}

/// What the read loop dispatched from `bytes` (then the socket closes),
/// and why it ended.
async fn read_all(bytes: Vec<u8>, prefetch: u16) -> (Vec<(String, Vec<u8>)>, LaneError, Vec<u8>) {
    let mut frames = reader_of(bytes);
    frames.buf.set_frame_max(4096);
    read_frames(frames, prefetch).await
}

/// What the read loop dispatched from `frames` (then the socket closes),
/// and why it ended.
async fn read_frames(
    mut frames: FrameReader,
    prefetch: u16,
) -> (Vec<(String, Vec<u8>)>, LaneError, Vec<u8>) {
    let inner = test_inner();
    let mut got = Vec::new();
    let mut on = |m: Incoming<'_>| match m {
        Incoming::Delivery {
            properties,
            body,
            event,
            ..
        } => got.push((
            format!(
                "{}{}",
                if event { "event " } else { "" },
                properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            ),
            body.to_vec(),
        )),
        Incoming::TooLarge { event, size } => {
            got.push((format!("too large {event} {size}"), Vec::new()))
        }
        Incoming::Returned { properties } => got.push((
            format!(
                "returned {}",
                properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            ),
            Vec::new(),
        )),
    };
    let reading = Reading {
        heartbeat: None,
        prefetch,
        max_body: 1 << 16,
        ack_by_caller: false,
    };
    let why = read_loop(&inner, &mut frames, reading, &mut on).await;
    let queued = std::mem::take(&mut *lock(&inner.out));
    (got, why, queued)
}

#[tokio::test]
async fn deliveries_in_one_or_many_body_frames_are_dispatched_whole_and_acked() {
    let big = vec![b'x'; 10_000];
    let mut bytes = Vec::new();
    bytes.extend(deliver_to(EVENTS_TAG, 1));
    bytes.extend(header(2, "e"));
    bytes.extend(body(b"{}"));
    bytes.extend(deliver_to(EVENTS_TAG, 2));
    bytes.extend(header(2, "f"));
    bytes.extend(body(b"[]"));
    bytes.extend(deliver(3));
    bytes.extend(header(2, "a"));
    bytes.extend(body(b"{}"));
    bytes.extend(deliver(4));
    bytes.extend(header(big.len() as u64, "b"));
    bytes.extend(body(&big));
    bytes.extend(deliver(5));
    bytes.extend(header(0, "c"));
    let (got, why, queued) = read_all(bytes, 4).await;
    assert_eq!(got.len(), 5, "{got:?}");
    // The event queue's consumer tag marks an event.
    assert_eq!(got[0], ("event e".into(), b"{}".to_vec()));
    assert_eq!(got[1], ("event f".into(), b"[]".to_vec()));
    assert_eq!(got[2], ("a".into(), b"{}".to_vec()));
    assert_eq!(got[3].0, "b");
    assert_eq!(got[3].1, big);
    assert_eq!(got[4], ("c".into(), Vec::new()));
    assert!(why.to_string().contains("closed the connection"), "{why}");
    // Half the prefetch of events taken: one ack for all so far, at the
    // last event's tag. Responses are consumed without acks: an ack at a
    // response's tag would name a delivery the broker does not hold, and
    // it closes the channel for that.
    assert_eq!(acks(queued).await, vec![(2, true)]);
}

#[tokio::test]
async fn deliveries_that_came_during_the_handshake_are_read_first_not_lost() {
    // The response queue's consumer (no acks) receives while the event
    // consumer is asked for: its deliveries come before the consume-ok.
    let consume_ok = method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: EVENTS_TAG.into(),
        })),
    );
    let mut bytes = Vec::new();
    bytes.extend(deliver(1));
    bytes.extend(header(7, "early-1"));
    bytes.extend(body(b"control"));
    bytes.extend(deliver(2));
    bytes.extend(header(0, "early-2"));
    bytes.extend(consume_ok);
    bytes.extend(deliver_to(EVENTS_TAG, 3));
    bytes.extend(header(2, "after"));
    bytes.extend(body(b"{}"));
    let mut frames = reader_of(bytes);
    frames.buf.set_frame_max(4096);
    let (_, answer) = frames.method().await.unwrap();
    assert!(
        matches!(answer, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))),
        "the early deliveries are not the answer: {answer:?}"
    );
    let early = frames.early.take();
    assert!(early.let_go.is_empty());
    frames.buf.unread(early.frames);
    let (got, _, queued) = read_frames(frames, 2).await;
    assert_eq!(
        got,
        vec![
            ("early-1".to_owned(), b"control".to_vec()),
            ("early-2".to_owned(), Vec::new()),
            ("event after".to_owned(), b"{}".to_vec()),
        ]
    );
    // Only the event is acknowledged: the early ones came to a consumer
    // without acks (an ack or a nack at their tags closes the channel).
    assert_eq!(acks(queued).await, vec![(3, true)]);
}

/// The acks (delivery tag, multiple) in what the lane queued to write.
async fn acks(queued: Vec<u8>) -> Vec<(u64, bool)> {
    let mut r = reader_of(queued);
    let mut acks = Vec::new();
    if r.fill(None).await.is_err() {
        return acks;
    }
    while let Some(f) = r.buf.buffered().unwrap() {
        if let AMQPClass::Basic(basic::AMQPMethod::Ack(a)) =
            decode_method(r.buf.payload(f)).unwrap()
        {
            acks.push((a.delivery_tag, a.multiple));
        }
    }
    acks
}

#[tokio::test]
async fn a_returned_request_is_reported_by_its_correlation_id() {
    let mut bytes = method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            exchange: "x".into(),
            routing_key: "svc".into(),
        })),
    );
    bytes.extend(header(2, "r1"));
    bytes.extend(body(b"{}"));
    let (got, _, _) = read_all(bytes, 64).await;
    assert_eq!(got, vec![("returned r1".to_owned(), Vec::new())]);
}

#[tokio::test]
async fn a_message_over_the_limit_is_reported_acknowledged_and_the_lane_goes_on() {
    let big = vec![b'7'; (1 << 16) + 1];
    let mut bytes = Vec::new();
    for (consumer, tag) in [(EVENTS_TAG, 1), (RESPONSES_TAG, 3)] {
        bytes.extend(deliver_to(consumer, tag));
        bytes.extend(header(big.len() as u64, "big"));
        bytes.extend(body(&big));
        bytes.extend(deliver_to(consumer, tag + 1));
        bytes.extend(header(2, "small"));
        bytes.extend(body(b"{}"));
    }
    let (got, why, queued) = read_all(bytes, 4).await;
    assert_eq!(
        got,
        vec![
            (format!("too large true {}", big.len()), Vec::new()),
            ("event small".to_owned(), b"{}".to_vec()),
            (format!("too large false {}", big.len()), Vec::new()),
            ("small".to_owned(), b"{}".to_vec()),
        ]
    );
    assert!(why.to_string().contains("closed the connection"), "{why}");
    // The large event is acknowledged with the rest: the broker does not
    // hold it back to redeliver. The responses were never to be.
    assert_eq!(acks(queued).await, vec![(2, true)]);
}

#[tokio::test]
async fn a_hostile_or_broken_broker_ends_the_lane_with_the_reason() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("longer than its header", {
            let mut b = deliver(1);
            b.extend(header(1, "a"));
            b.extend(body(b"{}"));
            b
        }),
        ("without its method", header(2, "a")),
        ("without its header", {
            let mut b = deliver(1);
            b.extend(body(b"{}"));
            b
        }),
        ("inside a message's content", {
            let mut b = deliver(1);
            b.extend(deliver(2));
            b
        }),
        (
            "cancelled a consumer",
            method(
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: "c".into(),
                    nowait: true,
                })),
            ),
        ),
        (
            "404 NOT_FOUND",
            method(
                CHANNEL,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 404,
                    reply_text: "NOT_FOUND".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            ),
        ),
        ("on channel 7", {
            let mut b = deliver(1);
            b[1..3].copy_from_slice(&7u16.to_be_bytes());
            b
        }),
        ("unknown type", vec![9, 0, 1, 0, 0, 0, 0, FRAME_END]),
        (
            "undecodable method",
            vec![FRAME_METHOD, 0, 1, 0, 0, 0, 2, 0xff, 0xff, FRAME_END],
        ),
    ];
    for (want, bytes) in cases {
        let (got, why, _) = read_all(bytes, 64).await;
        assert!(got.is_empty(), "{want}: dispatched {got:?}");
        assert!(why.to_string().contains(want), "{want}: ended with: {why}");
    }
}

#[tokio::test]
async fn the_broker_closing_the_connection_is_answered_and_named() {
    let bytes = method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED".into(),
            class_id: 0,
            method_id: 0,
        })),
    );
    let (_, why, queued) = read_all(bytes, 64).await;
    assert!(why.to_string().contains("320 CONNECTION_FORCED"), "{why}");
    let mut r = reader_of(queued);
    r.fill(None).await.unwrap();
    let f = r.buf.buffered().unwrap().unwrap();
    assert!(matches!(
        decode_method(r.buf.payload(f)).unwrap(),
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
    ));
}
