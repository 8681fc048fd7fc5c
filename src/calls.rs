//! What a client call becomes, decided in one place: a BFF-local route, a
//! composed route or one mesh call. Every routed call (a plain one, each
//! part of a composed one, the `hello_call`) goes through the same four
//! steps, [`Caller::prepare`]: authorize (`dispatch`), render the session's
//! context, build the mesh call, let the handler's `on_request` change it.
//! Then [`Plan::run`] carries the plan out on the mesh and the handler.
//!
//! `ws` asks for a plan, queues the future it gets and writes the answer:
//! the socket loop knows frames, not routes (as mini-redis's connection
//! knows no command).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use serde_json::{Map, Value};

use crate::compose;
use crate::dispatch::{self, Failure, Rates, Refusal, SessionContext};
use crate::hooks::{LocalCall, MeshClient, WsHandler};
use crate::hub::Hub;
use crate::mesh::{self, BoxFuture, Call, Mesh, MeshError};
use crate::metrics::RouteLatency;
use crate::protocol::{ClientCall, ErrorBody, Params, RawJson, SessionInfo};
use crate::routing::{DEFAULT_TIMEOUT, Part, RouteTable};
use crate::spans::{self, Ended, Spans};
use crate::trace::TraceContext;

/// Who calls, with what: the session and the shared state its calls are
/// planned against.
pub(crate) struct Caller<'a> {
    pub(crate) hub: &'a Hub,
    pub(crate) mesh: &'a Arc<dyn Mesh>,
    pub(crate) session: &'a Arc<SessionInfo>,
    pub(crate) context: &'a SessionContext,
}

/// A call the planner let through, ready to run.
pub(crate) enum Plan {
    /// A BFF-local route, answered by the handler.
    Local(BoxFuture<'static, Result<Value, ErrorBody>>),
    /// A composed route: its parts, and for each the call it makes or why
    /// that part was refused (a refused part fails alone, like a failed
    /// one), and its span under the call's.
    Composed {
        parts: Vec<Part>,
        calls: Vec<Result<Call, ErrorBody>>,
        traces: Vec<TraceContext>,
    },
    /// One routed request.
    Request(Call),
    /// One routed command: acknowledged once the broker has it.
    Command(Call),
}

/// A call's answer: its result, and for a composed route the parts that
/// failed, by key, when any did.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) result: RawJson,
    pub(crate) failed: Option<Map<String, Value>>,
}

impl From<RawJson> for Answer {
    fn from(result: RawJson) -> Self {
        Self {
            result,
            failed: None,
        }
    }
}

impl Caller<'_> {
    /// The mesh sees a call's W3C trace: its id as NuroPb's `trace_id`,
    /// its span as the context's `traceparent`. The id, and the session's
    /// context for it.
    fn traced_context(&self, trace: &TraceContext) -> (String, Params) {
        let trace_id = trace.trace_id_hex();
        let context = self
            .context
            .render(self.session, &trace_id, Some(&trace.traceparent()));
        (trace_id, context)
    }

    /// The one sequence of every routed call: may the session call
    /// `service.method` now (routes, roles, rate), under which context,
    /// as which mesh call; then the handler's `on_request`.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        routes: &RouteTable,
        rates: &mut Rates,
        now: Instant,
        service: &str,
        method: &str,
        params: impl FnOnce() -> Params,
        trace: &TraceContext,
    ) -> Result<(Call, Option<RouteLatency>), Refusal> {
        let allowed = dispatch::authorize(routes, self.session, rates, now, service, method)?;
        let latency = routes.latency(allowed.route_index).cloned();
        let (trace_id, context) = self.traced_context(trace);
        let mut call = allowed.call(params(), context, &trace_id);
        self.hub.handler().on_request(self.session, &mut call);
        Ok((call, latency))
    }

    /// What `call` becomes: offered to the handler as a BFF-local route
    /// first (requests only), then a composed route, then one routed call;
    /// with the route's latency series. A refusal is the answer; nothing
    /// was started for it.
    pub(crate) fn plan(
        &self,
        rates: &mut Rates,
        call: ClientCall,
        command: bool,
        trace: &TraceContext,
    ) -> Result<(Plan, Option<RouteLatency>), Refusal> {
        let handler = self.hub.handler();
        if !command && handler.is_local(&call) {
            let (trace_id, context) = self.traced_context(trace);
            let local = LocalCall {
                session: SessionInfo::clone(self.session),
                call: call.clone(),
                mesh: MeshClient::new(self.mesh.clone(), context, trace_id, DEFAULT_TIMEOUT),
            };
            if let Some(answer) = handler.local_request(local) {
                return Ok((Plan::Local(answer), None));
            }
        }
        let now = Instant::now();
        // One table for the whole plan, however many calls it makes.
        let routes = self.hub.routes();
        if !command && let Some((index, composed)) = routes.composed(&call.service, &call.method) {
            dispatch::authorize_composed(&routes, composed, index, self.session, rates, now)?;
            // Each part a span of its own under the call's.
            let traces: Vec<TraceContext> = composed.parts.iter().map(|_| trace.child()).collect();
            // Each part under the rules of the call it makes.
            let calls = composed
                .parts
                .iter()
                .zip(&traces)
                .map(|(part, part_trace)| {
                    let params = || compose::part_params(part, self.session, &call.params).into();
                    self.prepare(
                        &routes,
                        rates,
                        now,
                        &part.service,
                        &part.method,
                        params,
                        part_trace,
                    )
                    .map(|(call, _)| call)
                    .map_err(|refusal| Failure::from(refusal).to_client())
                })
                .collect();
            let latency = routes.composed_latency(index).cloned();
            return Ok((
                Plan::Composed {
                    parts: composed.parts.clone(),
                    calls,
                    traces,
                },
                latency,
            ));
        }
        let ClientCall {
            service,
            method,
            params,
            ..
        } = call;
        let (call, latency) =
            self.prepare(&routes, rates, now, &service, &method, || params, trace)?;
        let plan = if command {
            Plan::Command(call)
        } else {
            Plan::Request(call)
        };
        Ok((plan, latency))
    }

    /// The `hello_call` made on the user's behalf when a socket opens,
    /// under its route's rules and timeout, in a span under the socket's
    /// (`socket`, when it has one): its result, or the error that says why
    /// there is none.
    pub(crate) async fn hello_data(
        &self,
        hello_call: &str,
        socket: Option<&TraceContext>,
    ) -> Result<Value, ErrorBody> {
        let (service, method) = hello_call.split_once('.').unwrap_or((hello_call, ""));
        let spans = self.hub.spans();
        let trace = socket.map_or_else(|| spans.root(), TraceContext::child);
        let started = spans.on().then(SystemTime::now);
        let outcome = self.hello_call(service, method, &trace).await;
        if let Some(started) = started {
            let mut span = mesh_call_span(trace, service, method, started, outcome.as_ref());
            span.attributes.push(KeyValue::new("bff.hello_call", true));
            spans.end(span);
        }
        outcome
    }

    async fn hello_call(
        &self,
        service: &str,
        method: &str,
        trace: &TraceContext,
    ) -> Result<Value, ErrorBody> {
        let call = self
            .prepare(
                &self.hub.routes(),
                &mut Rates::default(),
                Instant::now(),
                service,
                method,
                Params::default,
                trace,
            )
            .map(|(call, _)| call)
            .map_err(|refusal| Failure::from(refusal).to_client())?;
        let handler = self.hub.handler();
        request_parsed(self.mesh.as_ref(), handler.as_ref(), self.session, call)
            .await
            .map_err(|e| e.to_client())
    }
}

/// The span of one mesh call made for a client (a composed part, the
/// `hello_call`), ended now with `outcome`.
fn mesh_call_span<T>(
    at: TraceContext,
    service: &str,
    method: &str,
    started: SystemTime,
    outcome: Result<T, &ErrorBody>,
) -> Ended {
    let mut attributes = spans::rpc(service, method).to_vec();
    let error = outcome.err().map(|e| {
        attributes.push(spans::text("error.type", &e.error));
        e.description.clone().unwrap_or_else(|| e.error.clone())
    });
    let label = if error.is_some() { "error" } else { "ok" };
    attributes.push(KeyValue::new("bff.outcome", label));
    Ended {
        at,
        kind: SpanKind::Client,
        name: format!("{service}.{method}"),
        started,
        ended: SystemTime::now(),
        attributes,
        error,
        link: None,
    }
}

impl Plan {
    /// The mesh method a plan of one call calls.
    pub(crate) fn target(&self) -> Option<(&str, &str)> {
        match self {
            Plan::Request(call) | Plan::Command(call) => Some((&call.service, &call.method)),
            Plan::Local(_) | Plan::Composed { .. } => None,
        }
    }

    /// Carry the plan out: the answer, or why there is none. A composed
    /// route's parts end their spans in `spans`.
    pub(crate) async fn run(
        self,
        mesh: Arc<dyn Mesh>,
        handler: Arc<dyn WsHandler>,
        session: Arc<SessionInfo>,
        spans: Spans,
    ) -> Result<Answer, Failure> {
        match self {
            Plan::Request(call) => request_as(mesh.as_ref(), handler.as_ref(), &session, &call)
                .await
                .map(Answer::from)
                .map_err(Failure::Mesh),
            Plan::Command(call) => mesh
                .command(call)
                .await
                .map(|()| RawJson::null().into())
                .map_err(Failure::Mesh),
            Plan::Local(answer) => answer
                .await
                .map(|value| RawJson::from(value).into())
                .map_err(Failure::Local),
            Plan::Composed {
                parts,
                calls,
                traces,
            } => {
                let started = spans.on().then(SystemTime::now);
                let calls =
                    calls
                        .into_iter()
                        .zip(traces)
                        .zip(&parts)
                        .map(|((call, trace), part)| {
                            let span = started.map(|started| (&spans, trace, started));
                            run_part(&mesh, &handler, &session, part, call, span)
                        });
                let outcomes = futures_util::future::join_all(calls).await;
                compose::combine(&parts, outcomes)
                    .map(|(result, failed)| Answer {
                        result: result.into(),
                        failed,
                    })
                    .map_err(Failure::Local)
            }
        }
    }
}

/// One part of a composed route: its call (or why it was refused), and
/// its span ended in `span`'s spans when they are exported.
async fn run_part(
    mesh: &Arc<dyn Mesh>,
    handler: &Arc<dyn WsHandler>,
    session: &SessionInfo,
    part: &Part,
    call: Result<Call, ErrorBody>,
    span: Option<(&Spans, TraceContext, SystemTime)>,
) -> Result<Value, ErrorBody> {
    let outcome = match call {
        Ok(call) => request_parsed(mesh.as_ref(), handler.as_ref(), session, call)
            .await
            .map_err(|e| e.to_client()),
        Err(refused) => Err(refused),
    };
    if let Some((spans, trace, started)) = span {
        let mut ended = mesh_call_span(
            trace,
            &part.service,
            &part.method,
            started,
            outcome.as_ref(),
        );
        ended.attributes.push(spans::text("bff.part", &part.key));
        spans.end(ended);
    }
    outcome
}

/// Make a mesh request for a client and pass its result through the
/// handler's `on_response`: the JSON the service sent, unparsed.
async fn request_as(
    mesh: &dyn Mesh,
    handler: &dyn WsHandler,
    session: &SessionInfo,
    call: &Call,
) -> Result<RawJson, MeshError> {
    let result = mesh.request_raw(call).await?;
    Ok(handler.on_response(session, call, result))
}

/// [`request_as`], the result parsed: for what the gateway puts together
/// itself (a composed route, the `hello` event).
async fn request_parsed(
    mesh: &dyn Mesh,
    handler: &dyn WsHandler,
    session: &SessionInfo,
    call: Call,
) -> Result<Value, MeshError> {
    request_as(mesh, handler, session, &call)
        .await?
        .to_value()
        .map_err(|e| mesh::unreadable(&call, &e))
}
