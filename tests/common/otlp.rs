//! A test OpenTelemetry collector: OTLP over HTTP (protobuf) on
//! 127.0.0.1, each request decoded with the OpenTelemetry proto
//! definitions, the spans kept to look at. It runs on a thread of its own,
//! so sync and async tests alike can use it, and stops (refusing
//! connections from then on) when asked or dropped.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One span as the collector got it.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent: String,
    pub name: String,
    /// OTLP's span kind: 2 server, 3 client.
    pub kind: i32,
    pub attributes: HashMap<String, String>,
    /// The span contexts it links to, as (trace id, span id).
    pub links: Vec<(String, String)>,
    /// OTLP status code (2 = error) and message.
    pub status: (i32, String),
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The resource's `service.name`.
    pub service: String,
}

impl Span {
    pub fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> (String, String) {
    let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    };
    (kv.key.clone(), value)
}

/// Every span of an export request, flattened.
pub fn decode(body: &[u8]) -> Result<Vec<Span>, prost::DecodeError> {
    let request = ExportTraceServiceRequest::decode(body)?;
    let mut out = Vec::new();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter().map(text))
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v)
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for s in scope.spans {
                out.push(Span {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    attributes: s.attributes.iter().map(text).collect(),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    status: s.status.map(|st| (st.code, st.message)).unwrap_or_default(),
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    service: service.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// The receiver: `endpoint()` is what a BFF's `otlp_endpoint` names.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<u64>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    pub fn start() -> Self {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let requests: Arc<Mutex<u64>> = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (kept, counted) = (spans.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().route(
                    "/v1/traces",
                    post(move |body: Bytes| {
                        let (kept, counted) = (kept.clone(), counted.clone());
                        async move {
                            *counted.lock().unwrap() += 1;
                            match decode(&body) {
                                Ok(spans) => {
                                    kept.lock().unwrap().extend(spans);
                                    let ok = ExportTraceServiceResponse::default().encode_to_vec();
                                    (StatusCode::OK, ok)
                                }
                                Err(e) => (StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
                            }
                        }
                    }),
                );
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the OTLP receiver did not start");
        Self {
            addr,
            spans,
            requests,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Export requests taken so far.
    pub fn requests(&self) -> u64 {
        *self.requests.lock().unwrap()
    }

    /// The spans received, if `done` holds for them; a failed assertion
    /// once `deadline` has passed.
    fn awaited(&self, deadline: Instant, done: &impl Fn(&[Span]) -> bool) -> Option<Vec<Span>> {
        let spans = self.spans();
        if done(&spans) {
            return Some(spans);
        }
        assert!(
            Instant::now() < deadline,
            "the OTLP receiver has {} spans, not what was awaited: {spans:#?}",
            spans.len()
        );
        None
    }

    /// Wait until `done` holds for the spans received (failing after
    /// `within`), and return them.
    pub fn until(&self, within: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(spans) = self.awaited(deadline, &done) {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`OtlpReceiver::until`], for async tests (the exporter may share
    /// their runtime).
    pub async fn until_async(&self, within: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(spans) = self.awaited(deadline, &done) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop listening: exports are refused from now on.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}
