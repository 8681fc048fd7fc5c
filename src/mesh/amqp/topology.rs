//! The link's topology, declared each time it is built: the exchanges,
//! the service queue (dead-lettered) bound to the RPC exchange, the
//! instance's response queue (bound to the control exchange), its event
//! queue bound to each event rule's topic; then the request lane and the
//! service-queue consumer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use super::super::lane::{EventsSpec, Lane, LaneIo, LaneSpec};
use super::{AmqpConfig, Link, Shared, bindings, log};
use crate::mesh::{MeshError, redact_url};

/// lapin's connection events, for the supervisor to watch.
pub(super) type LinkEvents =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = lapin::Event> + Send>>;

pub(super) struct Consumers {
    /// The request lane's reading half: responses, control messages and
    /// returned requests, and mesh events from a queue of their own (a
    /// consumer with a small prefetch of its own, so a burst of events
    /// never has more than that in front of a response).
    pub(super) lane: LaneIo,
    /// The service lane's reading half: requests to the BFF's own service,
    /// and its sending half, which acknowledges them once served.
    pub(super) service: LaneIo,
    pub(super) service_lane: Lane,
    /// lapin's connection-level events: its errors end the link.
    pub(super) link_events: LinkEvents,
}

/// Why a step of the link's set-up failed, naming the broker.
pub(super) fn fail(c: &AmqpConfig, what: &str, e: lapin::Error) -> MeshError {
    MeshError::Unavailable(format!("{what} on {}: {e}", redact_url(&c.url)))
}

/// Build the link: connect, declare the topology, open the lane, consume
/// the service queue; then the mesh is ready.
pub(super) async fn establish(shared: &Arc<Shared>) -> Result<Consumers, MeshError> {
    let c = &shared.config;
    let properties =
        ConnectionProperties::default().with_connection_name(c.connection_name().into());
    let connection = Connection::connect(c.url.as_str(), properties)
        .await
        .map_err(|e| fail(c, "cannot connect", e))?;
    let link_events: LinkEvents = Box::pin(connection.events_listener());
    let mut ch = open_channel(&connection, c).await?;
    declare_exchanges(&ch, c).await?;
    declare_service_queue(&ch, c).await?;
    declare_response_queue(&ch, c, &shared.response_queue).await?;
    if let Some(log) = &c.event_log
        && let Some(replaced) = log::declare(&connection, &ch, c, log).await?
    {
        ch = replaced;
    }
    declare_event_queue(&ch, shared).await?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| fail(c, "cannot enable publisher confirms", e))?;
    // Responses and control messages, on the lane, without
    // acknowledgements: the response queue goes with the connection, so
    // nothing in it could be delivered again (`LaneSpec::ack_by_caller`).
    // The lane reads one message at a time; what it has not read waits in
    // the socket and, past that, in the queue.
    let lane_name = format!("{} requests", c.connection_name());
    let event_queue = c.event_queue_name();
    let from = match (&c.event_log, &shared.log) {
        (Some(log), Some(state)) => Some(state.start(log.prefill)),
        _ => None,
    };
    let (lane, lane_io) = Lane::connect(LaneSpec {
        url: &c.url,
        name: &lane_name,
        queue: Some(&shared.response_queue),
        // Unused: no acknowledgements, no prefetch.
        prefetch: 0,
        max_body: c.max_message_bytes as u64,
        ack_by_caller: false,
        events: c.has_event_queue().then_some(EventsSpec {
            queue: &event_queue,
            prefetch: c.event_prefetch,
            from,
        }),
    })
    .await
    .map_err(|e| {
        MeshError::Unavailable(format!("the request lane on {}: {e}", redact_url(&c.url)))
    })?;
    // Requests to the BFF's own service, on a lane of their own: each is
    // acknowledged once it is handled (the prefetch bounds those being
    // handled), and one over the size limit is let go as it comes, as on
    // the other lane. Not exclusive: the instances share the queue.
    let service_queue = c.service_queue();
    let service_name = format!("{} service", c.connection_name());
    let (service, service_io) = Lane::connect(LaneSpec {
        url: &c.url,
        name: &service_name,
        queue: Some(&service_queue),
        prefetch: c.prefetch,
        max_body: c.max_message_bytes as u64,
        ack_by_caller: true,
        events: None,
    })
    .await
    .map_err(|e| {
        MeshError::Unavailable(format!("the service lane on {}: {e}", redact_url(&c.url)))
    })?;
    *shared.link.write().unwrap_or_else(|p| p.into_inner()) = Some(Link {
        connection,
        publish: ch.clone(),
        lane,
        service: service.clone(),
    });
    // A reload that came while the link was being built.
    bindings::reconcile(shared).await?;
    // The first time the log is read: where news begins.
    log::write_marker(shared, &ch).await?;
    shared.ready.store(true, Ordering::SeqCst);
    tracing::info!(
        url = %redact_url(&c.url),
        service_queue = %service_queue,
        response_queue = %shared.response_queue,
        "joined the mesh"
    );
    Ok(Consumers {
        lane: lane_io,
        service: service_io,
        service_lane: service,
        link_events,
    })
}

async fn open_channel(connection: &Connection, c: &AmqpConfig) -> Result<Channel, MeshError> {
    connection
        .create_channel()
        .await
        .map_err(|e| fail(c, "cannot open a channel", e))
}

const DURABLE: ExchangeDeclareOptions = ExchangeDeclareOptions {
    passive: false,
    durable: true,
    auto_delete: false,
    internal: false,
    nowait: false,
};

/// NuroPb's exchanges: dead letters, events (topic), RPC (direct).
async fn declare_exchanges(ch: &Channel, c: &AmqpConfig) -> Result<(), MeshError> {
    for (name, kind) in [
        (&c.dl_exchange, ExchangeKind::Fanout),
        (&c.events_exchange, ExchangeKind::Topic),
        (&c.rpc_exchange, ExchangeKind::Direct),
    ] {
        ch.exchange_declare(name.as_str().into(), kind, DURABLE, FieldTable::default())
            .await
            .map_err(|e| fail(c, &format!("cannot declare exchange {name}"), e))?;
    }
    Ok(())
}

/// The BFF's service queue (dead-lettered), bound to the RPC exchange by
/// its service name: other services call the BFF through it.
async fn declare_service_queue(ch: &Channel, c: &AmqpConfig) -> Result<(), MeshError> {
    let service_queue = c.service_queue();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(c.dl_exchange.as_str().into()),
    );
    ch.queue_declare(
        service_queue.as_str().into(),
        QueueDeclareOptions {
            durable: !c.transient,
            auto_delete: c.transient,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .map_err(|e| fail(c, &format!("cannot declare queue {service_queue}"), e))?;
    ch.queue_bind(
        service_queue.as_str().into(),
        c.rpc_exchange.as_str().into(),
        c.service_name.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail(c, "cannot bind the service queue", e))
}

/// The instance's response queue, and with several instances the control
/// exchange bound to it.
async fn declare_response_queue(
    ch: &Channel,
    c: &AmqpConfig,
    response_queue: &str,
) -> Result<(), MeshError> {
    let rq: ShortString = response_queue.into();
    ch.queue_declare(
        rq.clone(),
        QueueDeclareOptions {
            durable: false,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail(c, "cannot declare the response queue", e))?;
    let Some(control) = &c.control_exchange else {
        return Ok(());
    };
    ch.exchange_declare(
        control.as_str().into(),
        ExchangeKind::Fanout,
        DURABLE,
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail(c, &format!("cannot declare exchange {control}"), e))?;
    ch.queue_bind(
        rq,
        control.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail(c, "cannot bind the control exchange", e))
}

/// The instance's event queue, bound to the events exchange with each
/// event rule's topic: what the routing table in use wants (a BFF declares
/// it without rules too, for a reload to bind; another peer only with).
async fn declare_event_queue(ch: &Channel, shared: &Arc<Shared>) -> Result<(), MeshError> {
    let c = &shared.config;
    if !c.has_event_queue() {
        return Ok(());
    }
    let mut bindings = shared.bindings.lock().await;
    let eq: ShortString = c.event_queue_name().as_str().into();
    // The broker keeps at most `event_queue` events for this instance and
    // drops the oldest past that: memory stays bounded on both sides under
    // a burst.
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::try_from(c.event_queue).unwrap_or(i64::MAX)),
    );
    // The event log is declared already, and shared: what the last
    // instance bound (its ledger) is what may be stale, at start-up (a
    // rebuilt link of an older instance must not undo a newer one's).
    let first = shared.log.as_ref().is_some_and(|s| s.first_establish());
    bindings.bound = if c.event_log.is_some() {
        let ledger = bindings::ledger(ch, c).await?;
        if first { ledger } else { Vec::new() }
    } else {
        ch.queue_declare(
            eq.clone(),
            QueueDeclareOptions {
                durable: false,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| fail(c, "cannot declare the event queue", e))?;
        Vec::new()
    };
    let stale: Vec<String> = bindings
        .bound
        .iter()
        .filter(|t| !bindings.wanted.contains(t))
        .cloned()
        .collect();
    bindings.bound.clear();
    let wanted = bindings.wanted.clone();
    bindings::apply(ch, c, &mut bindings.bound, wanted, stale).await?;
    bindings::write_ledger(ch, c, &bindings.bound).await
}
