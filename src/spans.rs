//! Spans out: what a BFF did for one call, one composed part, one
//! `hello_call` and one socket, sent to an OpenTelemetry collector over
//! OTLP/HTTP, so a slow frontend call can be followed from the browser
//! through the gateway to the service that answered it.
//!
//! A span is made once, when it ends, from what the caller kept (its
//! [`TraceContext`], the wall-clock start): nothing is held per call or per
//! socket while export is off, and the ids the mesh message already carries
//! are the ids the span gets, so a service's span continues exactly this
//! one. Sampling is parent-based: a client's `traceparent` decides by its
//! flag, a fresh trace by its id against `otlp_sample_ratio` (the same rule
//! as OpenTelemetry's `TraceIdRatioBased`, so every instance agrees).
//!
//! Off the socket's path: a finished span is queued without waiting for
//! one task that batches and exports them. The queue holds [`QUEUE`] spans
//! whose every string is cut to [`MAX_VALUE`] bytes, so it is bounded in
//! bytes too. A collector that is down or slow costs counted drops
//! (`bff_spans_dropped_total{reason}`), never a slower call.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::trace::TraceContext;
#[cfg(test)]
use crate::trace::sampled_at;

/// Finished spans waiting for export, at most.
const QUEUE: usize = 4096;
/// Spans per export request, at most.
const BATCH: usize = 512;
/// How long a batch waits to fill once its first span is in.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// The longest one export request may take before its spans are dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// After shutdown begins, how long what is queued still gets to go out.
const DRAIN: Duration = Duration::from_secs(2);
/// Bytes of one attribute's value (or a span's name), at most.
pub(crate) const MAX_VALUE: usize = 256;
/// Attributes of one span, at most.
const MAX_ATTRIBUTES: usize = 16;

/// The traces URL an `otlp_endpoint` names: a collector's base URL gets
/// `/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT` does); a URL with a path
/// is used as it is.
pub(crate) fn traces_url(endpoint: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "otlp_endpoint (BFF_OTLP_ENDPOINT) must be an http:// or https:// URL such as \
             http://collector:4318, found `{endpoint}`"
        )
    };
    let mut url = reqwest::Url::parse(endpoint.trim()).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad());
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/v1/traces");
    }
    Ok(url.to_string())
}

/// A span the BFF made, ended: where it is in its trace, what it was.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) at: TraceContext,
    pub(crate) kind: SpanKind,
    pub(crate) name: String,
    pub(crate) started: SystemTime,
    pub(crate) ended: SystemTime,
    pub(crate) attributes: Vec<KeyValue>,
    /// Why it failed, if it did (the span's status).
    pub(crate) error: Option<String>,
    /// A span of another trace this one belongs with (a call's socket).
    pub(crate) link: Option<TraceContext>,
}

/// A string attribute, cut to [`MAX_VALUE`] bytes.
pub(crate) fn text(key: &'static str, value: &str) -> KeyValue {
    KeyValue::new(key, cut(value).into_owned())
}

/// What a span says of the mesh method it called: `rpc.system`,
/// `rpc.service`, `rpc.method`.
pub(crate) fn rpc(service: &str, method: &str) -> [KeyValue; 3] {
    [
        KeyValue::new("rpc.system", "nuropb"),
        text("rpc.service", service),
        text("rpc.method", method),
    ]
}

fn cut(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_VALUE {
        return Cow::Borrowed(value);
    }
    let mut end = MAX_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Borrowed(&value[..end])
}

fn span_context(at: &TraceContext, remote: bool) -> SpanContext {
    let flags = if at.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(
        TraceId::from_bytes(at.trace_id),
        SpanId::from_bytes(at.span_id),
        flags,
        remote,
        TraceState::NONE,
    )
}

impl Ended {
    /// The span as the exporter takes it, every string bounded.
    fn into_data(self, scope: &InstrumentationScope) -> SpanData {
        let mut attributes = self.attributes;
        attributes.truncate(MAX_ATTRIBUTES);
        for kv in &mut attributes {
            if let Value::String(s) = &kv.value
                && s.as_str().len() > MAX_VALUE
            {
                kv.value = Value::from(cut(s.as_str()).into_owned());
            }
        }
        let mut links = SpanLinks::default();
        if let Some(link) = self.link {
            links
                .links
                .push(Link::with_context(span_context(&link, false)));
        }
        let status = match self.error {
            Some(e) => Status::error(cut(&e).into_owned()),
            None => Status::Unset,
        };
        SpanData {
            span_context: span_context(&self.at, false),
            parent_span_id: self.at.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: self.at.remote_parent,
            span_kind: self.kind,
            name: cut(&self.name).into_owned().into(),
            start_time: self.started,
            end_time: self.ended.max(self.started),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links,
            status,
            instrumentation_scope: scope.clone(),
        }
    }
}

/// Where a BFF's spans go, if it exports them, and how it samples.
#[derive(Debug, Clone)]
pub(crate) struct Spans {
    out: Option<Arc<Out>>,
    ratio: f64,
}

#[derive(Debug)]
struct Out {
    queue: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
    metrics: Metrics,
}

/// The other end of the span queue and the exporter, for [`export`].
#[derive(Debug)]
pub(crate) struct Exporting<E> {
    queue: mpsc::Receiver<SpanData>,
    exporter: E,
}

/// The OTLP/HTTP exporter a BFF uses.
pub(crate) type OtlpExporting = Exporting<opentelemetry_otlp::SpanExporter>;

impl Spans {
    /// No export; fresh traces sampled at `ratio` all the same (what the
    /// mesh message's `traceparent` says).
    pub(crate) fn off(ratio: f64) -> Self {
        Self { out: None, ratio }
    }

    /// Spans for the BFF `name`'s `instance`, exported to `endpoint` (see
    /// [`traces_url`]) when one is set.
    pub(crate) fn new(
        endpoint: Option<&str>,
        ratio: f64,
        name: &str,
        instance: &str,
        metrics: Metrics,
    ) -> Result<(Self, Option<OtlpExporting>), String> {
        let Some(endpoint) = endpoint.filter(|e| !e.trim().is_empty()) else {
            return Ok((Self::off(ratio), None));
        };
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let url = traces_url(endpoint)?;
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("otlp_endpoint: cannot make an HTTP client: {e}"))?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(client)
            .build()
            .map_err(|e| format!("otlp_endpoint `{url}`: {e}"))?;
        exporter.set_resource(
            &Resource::builder()
                .with_service_name(name.to_owned())
                .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
                .build(),
        );
        let (spans, exporting) = Self::exporting_to(exporter, ratio, metrics);
        Ok((spans, Some(exporting)))
    }

    /// Spans queued for `exporter`.
    pub(crate) fn exporting_to<E>(
        exporter: E,
        ratio: f64,
        metrics: Metrics,
    ) -> (Self, Exporting<E>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let scope = InstrumentationScope::builder("nuropb-bff")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let spans = Self {
            out: Some(Arc::new(Out {
                queue: tx,
                scope,
                metrics,
            })),
            ratio,
        };
        (
            spans,
            Exporting {
                queue: rx,
                exporter,
            },
        )
    }

    /// Whether spans are made at all: callers skip the work when not.
    pub(crate) fn on(&self) -> bool {
        self.out.is_some()
    }

    /// The context of something that starts here: a child of the client's
    /// `traceparent` when it parses (sampled as the client says), else a
    /// fresh trace sampled by its id.
    pub(crate) fn begin(&self, client: Option<&str>) -> TraceContext {
        match client.and_then(TraceContext::parse) {
            Some(parent) => parent.remote_child(),
            None => TraceContext::root(self.ratio),
        }
    }

    /// The context of a fresh trace.
    pub(crate) fn root(&self) -> TraceContext {
        TraceContext::root(self.ratio)
    }

    /// Queue `span` for export when it is sampled; a full queue drops it,
    /// counted.
    pub(crate) fn end(&self, span: Ended) {
        let Some(out) = &self.out else {
            return;
        };
        if !span.at.sampled {
            return;
        }
        match out.queue.try_send(span.into_data(&out.scope)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => out.metrics.spans_dropped("queue_full", 1),
            // The exporter has stopped: the gateway is shutting down.
            Err(mpsc::error::TrySendError::Closed(_)) => out.metrics.spans_dropped("shutdown", 1),
        }
    }
}

/// Export queued spans in batches (up to [`BATCH`], or what came in
/// [`BATCH_DELAY`]) until `stop`, then what is still queued and what the
/// closing sockets still end (until `all_closed`), for [`DRAIN`] at most. One request at a time: while it is out the queue
/// fills, and what does not fit is dropped and counted. A failed or
/// timed-out request counts its spans dropped; the first failure after a
/// success is logged, and so is the recovery.
pub(crate) async fn export<E: SpanExporter>(
    work: Exporting<E>,
    metrics: Metrics,
    stop: CancellationToken,
    all_closed: impl Fn() -> bool,
) {
    let Exporting {
        mut queue,
        exporter,
    } = work;
    let mut failing = false;
    let send = async |batch: Vec<SpanData>, failing: &mut bool, limit: Duration| {
        let n = batch.len() as u64;
        match tokio::time::timeout(limit, exporter.export(batch)).await {
            Ok(Ok(())) => {
                metrics.spans_exported(n);
                if std::mem::take(failing) {
                    tracing::info!("span export works again");
                }
            }
            outcome => {
                metrics.spans_dropped("export_failed", n);
                if !std::mem::replace(failing, true) {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer in {limit:?}"),
                    };
                    tracing::warn!(spans = n, error = %why, "span export failed; dropping spans until it works");
                }
            }
        }
    };
    'serve: loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break 'serve,
            span = queue.recv() => match span {
                Some(span) => span,
                None => return,
            },
        };
        let mut batch = vec![first];
        let full = tokio::time::sleep(BATCH_DELAY);
        tokio::pin!(full);
        while batch.len() < BATCH {
            tokio::select! {
                _ = &mut full => break,
                _ = stop.cancelled() => break,
                span = queue.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
            }
        }
        send(batch, &mut failing, EXPORT_TIMEOUT).await;
    }
    let deadline = tokio::time::Instant::now() + DRAIN;
    loop {
        let last_look = all_closed();
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            let n = batch.len() as u64 + queue.len() as u64;
            if n > 0 {
                metrics.spans_dropped("shutdown", n);
            }
            return;
        }
        if batch.is_empty() {
            if last_look {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        send(batch, &mut failing, left).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
    use proptest::prelude::*;
    use std::sync::Mutex;

    /// An exporter that keeps what it is given, or fails.
    #[derive(Debug, Clone, Default)]
    struct Kept {
        spans: Arc<Mutex<Vec<SpanData>>>,
        fail: bool,
    }

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(OTelSdkError::InternalFailure("collector away".into()));
            }
            self.spans.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn ended(at: TraceContext) -> Ended {
        Ended {
            at,
            kind: SpanKind::Server,
            name: "svc.method".into(),
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            ended: SystemTime::UNIX_EPOCH + Duration::from_secs(11),
            attributes: vec![text("bff.outcome", "ok")],
            error: None,
            link: None,
        }
    }

    #[test]
    fn endpoints_get_the_traces_path_or_a_clear_error() {
        assert_eq!(
            traces_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/").unwrap(),
            "https://otel.example/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/custom/traces").unwrap(),
            "http://c:4318/custom/traces"
        );
        for bad in ["collector:4318", "ftp://c/", "", "http://"] {
            let e = traces_url(bad).unwrap_err();
            assert!(e.contains("BFF_OTLP_ENDPOINT") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_span_keeps_the_ids_the_mesh_saw_and_its_parent() {
        let client =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let call = client.remote_child();
        let scope = InstrumentationScope::builder("t").build();
        let data = ended(call).into_data(&scope);
        assert_eq!(
            data.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(data.span_context.span_id().to_bytes(), call.span_id);
        assert_eq!(data.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(data.parent_span_is_remote);
        let part = call.child();
        let data = ended(part).into_data(&scope);
        assert_eq!(data.parent_span_id.to_bytes(), call.span_id);
        assert!(!data.parent_span_is_remote);
        let root = TraceContext::root(1.0);
        assert_eq!(
            ended(root).into_data(&scope).parent_span_id,
            SpanId::INVALID
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_unsampled_spans_are_not_queued() {
        let metrics = Metrics::new();
        let (spans, work) = Spans::exporting_to(Kept::default(), 1.0, metrics.clone());
        for _ in 0..QUEUE + 7 {
            spans.end(ended(spans.root()));
        }
        let mut unsampled = spans.root();
        unsampled.sampled = false;
        spans.end(ended(unsampled));
        assert_eq!(work.queue.len(), QUEUE);
        assert!(
            metrics
                .encode()
                .contains(r#"bff_spans_dropped_total{reason="queue_full"} 7"#),
            "{}",
            metrics.encode()
        );
        let off = Spans::off(1.0);
        assert!(!off.on());
        off.end(ended(off.root()));
    }

    /// `n` spans ended into `exporter`'s queue, then the export task
    /// stopped and awaited: its metrics.
    async fn export_then_stop(exporter: Kept, n: usize) -> Metrics {
        let metrics = Metrics::new();
        let (spans, work) = Spans::exporting_to(exporter, 1.0, metrics.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(export(work, metrics.clone(), stop.clone(), || true));
        for _ in 0..n {
            spans.end(ended(spans.root()));
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        metrics
    }

    #[tokio::test]
    async fn exported_and_failed_batches_are_counted_and_the_queue_drains_at_stop() {
        let kept = Kept::default();
        let metrics = export_then_stop(kept.clone(), 1200).await;
        assert_eq!(kept.spans.lock().unwrap().len(), 1200);
        assert!(metrics.encode().contains("bff_spans_exported_total 1200"));

        let failing = Kept {
            fail: true,
            ..Kept::default()
        };
        let metrics = export_then_stop(failing, 10).await;
        assert!(
            metrics
                .encode()
                .contains(r#"bff_spans_dropped_total{reason="export_failed"} 10"#),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_VALUE);
        let kv = text("k", &long);
        let Value::String(s) = &kv.value else {
            panic!("a string")
        };
        assert!(s.as_str().len() <= MAX_VALUE && s.as_str().len() >= MAX_VALUE - 1);
        let mut span = ended(TraceContext::root(1.0));
        span.name = long.clone();
        span.error = Some(long.clone());
        span.attributes = (0..40).map(|_| KeyValue::new("k", long.clone())).collect();
        let data = span.into_data(&InstrumentationScope::builder("t").build());
        assert!(data.name.len() <= MAX_VALUE);
        assert_eq!(data.attributes.len(), MAX_ATTRIBUTES);
        assert!(
            data.attributes
                .iter()
                .all(|kv| kv.value.as_str().len() <= MAX_VALUE)
        );
    }

    proptest! {
        #[test]
        fn sampling_is_monotonic_in_the_ratio_and_exact_at_the_ends(
            id in proptest::array::uniform16(any::<u8>()),
            a in 0.0f64..=1.0,
            b in 0.0f64..=1.0,
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            if sampled_at(&id, lo) {
                prop_assert!(sampled_at(&id, hi));
            }
            prop_assert!(sampled_at(&id, 1.0));
            prop_assert!(!sampled_at(&id, 0.0));
        }
    }

    #[test]
    fn a_ratio_samples_about_that_share_of_fresh_traces() {
        let n = 20_000;
        let kept = (0..n).filter(|_| TraceContext::root(0.25).sampled).count();
        let share = kept as f64 / n as f64;
        assert!((0.22..0.28).contains(&share), "{share}");
    }
}
