//! The supervisor: owns the link's consumers, hands what arrives on the
//! lane to its waiters and queues, and when anything below the connection
//! fails, fails the calls in flight and rebuilds the whole link with
//! jittered backoff.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::super::lane::Incoming;
use super::drops::DropReason;
use super::headers::decode_message;
use super::service::take_request;
use super::topology::{Consumers, LinkEvents, establish};
use super::{LogItem, Shared, lock, log};
use crate::mesh::{BoxFuture, CONTROL_TOPIC, MeshError, MeshHandler, redact_url};
use crate::protocol::{MeshMessage, ResponseBody};

/// Own the consumers; on loss, fail what is in flight and reconnect.
///
/// Any failure below the connection (a consumer cancelled because its queue
/// was deleted, a channel closed by an error, a publish channel that can no
/// longer publish) is treated like a lost connection: the whole connection
/// is closed and rebuilt, topology and bindings declared again. Keeping the
/// old connection would keep its exclusive response-queue consumer, and
/// every new attempt would be refused.
pub(super) async fn supervise(shared: Arc<Shared>, mut consumers: Consumers) {
    loop {
        let mut dispatch = |incoming: Incoming<'_>| take_from_lane(&shared, incoming);
        let service_lane = consumers.service_lane.clone();
        let mut serve = |incoming: Incoming<'_>| take_request(&shared, &service_lane, incoming);
        let why = tokio::select! {
            _ = shared.shutdown.cancelled() => None,
            e = consumers.lane.run(&mut dispatch) => Some(format!("the request lane ended: {e}")),
            e = consumers.service.run(&mut serve) => Some(format!("the service lane ended: {e}")),
            why = link_failed(&mut consumers.link_events) => Some(why),
            _ = shared.relink.notified() => Some("the publish channel failed".into()),
        };
        let Some(why) = why else {
            consumers.lane.close(LANE_GOODBYE).await;
            // Requests being served are acknowledged on the service lane:
            // it runs (taking nothing new) until they are done.
            shared.tasks.close();
            let mut hold = |_: Incoming<'_>| {};
            tokio::select! {
                _ = consumers.service.run(&mut hold) => {}
                _ = shared.tasks.wait() => {}
            }
            consumers.service.close(LANE_GOODBYE).await;
            return;
        };
        shared.ready.store(false, Ordering::SeqCst);
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        let waiting: Vec<_> = lock(&shared.pending).drain().collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(MeshError::Unavailable("broker connection lost".into())));
        }
        tracing::warn!(url = %redact_url(&shared.config.url), %why, "lost the broker link; rebuilding the connection");
        // The old lanes go first: the exclusive consumer of the response
        // queue would refuse the new one.
        consumers.lane.close(LANE_GOODBYE).await;
        consumers.service.close(LANE_GOODBYE).await;
        drop(consumers);
        let old = shared
            .link
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(old) = old {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                old.connection.close(320, "rebuilding the link".into()),
            )
            .await;
        }
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        consumers = loop {
            let attempt = tokio::time::timeout(shared.config.connect_timeout, establish(&shared));
            let attempt = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                attempt = attempt => attempt,
            };
            match attempt {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) => tracing::debug!(error = %e, "reconnect failed"),
                Err(_) => tracing::debug!("reconnect timed out"),
            }
            // Full jitter: instances that lost the broker together do not
            // come back in step.
            let pause = backoff.mul_f64(0.5 + jitter() * 0.5);
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            backoff = (backoff * 2).min(shared.config.max_backoff);
        };
        tracing::info!(after = ?started.elapsed(), "the broker link is back");
    }
}

/// What the broker sent on the lane: responses complete their calls,
/// control messages and events go to their queues, and a request nobody
/// could take (AMQP NO_ROUTE) fails its call with `NotDelivered` at once.
pub(super) fn take_from_lane(shared: &Shared, incoming: Incoming<'_>) {
    let drop = |reason: DropReason, what: &str| shared.drops.drop_message(reason, what);
    match incoming {
        Incoming::Delivery {
            properties,
            body,
            event: true,
            ..
        } => {
            let (position, live) = match &shared.log {
                None => (None, true),
                Some(state) => match log::on_delivery(state, &properties) {
                    log::Live::Marker(p) => {
                        shared.hand_off(LogItem::Live(p), Some(p));
                        return;
                    }
                    log::Live::Skip => return,
                    log::Live::Event { position, live } => (position, live),
                },
            };
            match decode_message(&properties, body) {
                Ok(MeshMessage::Event(ev)) => shared.hand_off_event(ev, position, live),
                other => out_of_place(shared, "event", other),
            }
        }
        Incoming::Delivery {
            properties, body, ..
        } => match decode_message(&properties, body) {
            Ok(MeshMessage::Response(resp)) => complete(shared, resp),
            Ok(MeshMessage::Event(ev)) if ev.topic == CONTROL_TOPIC => {
                let Ok(control) = ev.event.to_value() else {
                    drop(
                        DropReason::Undecodable,
                        "a control message that is not JSON a map can hold",
                    );
                    return;
                };
                if shared.control.try_send(control).is_err() {
                    shared.events_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("control message dropped: the control queue is full");
                }
            }
            Ok(MeshMessage::Event(ev)) => shared.hand_off_event(ev, None, true),
            other => out_of_place(shared, "response", other),
        },
        Incoming::TooLarge { event, size } => {
            let queue = if event { "event" } else { "response" };
            drop(
                DropReason::TooLarge,
                &format!(
                    "a {size}-byte message on the {queue} queue, over limits.max_mesh_message_bytes ({})",
                    shared.config.max_message_bytes
                ),
            );
        }
        Incoming::Returned { properties } => {
            let waiter = properties
                .correlation_id()
                .and_then(|id| lock(&shared.pending).remove(id));
            if let Some(tx) = waiter {
                // The caller fills in the names.
                let _ = tx.send(Err(MeshError::NotDelivered {
                    service: String::new(),
                    method: String::new(),
                }));
            }
        }
    }
}

/// Why lapin's connection (publishing) failed, once it does: nothing else
/// reads from it, so its events are what tells.
async fn link_failed(events: &mut LinkEvents) -> String {
    while let Some(event) = events.next().await {
        if let lapin::Event::Error(e) = event {
            return format!("the broker connection failed: {e}");
        }
    }
    "the broker connection ended".into()
}

/// A message that does not belong on `queue` (or is no NuroPb message):
/// dropped and counted.
fn out_of_place(shared: &Shared, queue: &str, decoded: Result<MeshMessage, String>) {
    let (reason, what) = match decoded {
        Ok(other) => (
            DropReason::Unexpected,
            format!("a {} on the {queue} queue", other.message_type().as_str()),
        ),
        Err(why) => (
            DropReason::Undecodable,
            format!("on the {queue} queue: {why}"),
        ),
    };
    shared.drops.drop_message(reason, &what);
}

/// How long a closing lane waits for the broker's answer to its goodbye.
pub(super) const LANE_GOODBYE: Duration = Duration::from_secs(1);

/// A number in [0, 1) that differs between calls and processes.
pub(super) fn jitter() -> f64 {
    let n = uuid::Uuid::new_v4().as_u128() as u64;
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// Hand queued items (events, control messages) to the handler with
/// `handle`, one at a time, until shutdown.
pub(super) async fn deliver<T>(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<T>,
    handle: for<'a> fn(&'a dyn MeshHandler, T) -> BoxFuture<'a, ()>,
) {
    loop {
        let item = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            item = queue.recv() => item,
        };
        let Some(item) = item else { return };
        handle(shared.handler.as_ref(), item).await;
    }
}

pub(super) fn complete(shared: &Shared, resp: ResponseBody) {
    let waiter = lock(&shared.pending).remove(&resp.correlation_id);
    match waiter {
        Some(tx) => {
            let outcome = match resp.error {
                Some(err) => Err(MeshError::Remote(err)),
                None => Ok(resp.result),
            };
            let _ = tx.send(outcome);
        }
        None => tracing::debug!(
            correlation_id = %resp.correlation_id,
            "response nobody waits for (timed out or cancelled), dropped"
        ),
    }
}
