//! The event queue's bindings follow the routing table while the link is
//! up: a reloaded table's new topics are bound before the old ones are
//! unbound, and a topic in both tables is never touched, so no event of a
//! rule that stayed is missed.
//!
//! What is wanted and what the live queue has are kept apart: a rebuilt
//! link declares what is wanted, and whichever of a rebuild and a reload
//! comes second brings the queue in line (both under one lock), so a
//! reload during a reconnect is not lost.

use std::sync::Arc;

use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;

use super::topology::fail;
use super::{AmqpConfig, Shared};
use crate::mesh::MeshError;

/// The event topics this instance binds.
#[derive(Debug, Default)]
pub(super) struct EventBindings {
    /// What the routing table in use asks for.
    pub(super) wanted: Vec<String>,
    /// What the live link's event queue is bound to.
    pub(super) bound: Vec<String>,
}

/// What must change to go from `bound` to `wanted`: topics to bind, then
/// topics to unbind, each once, in the order given.
pub(super) fn changes(bound: &[String], wanted: &[String]) -> (Vec<String>, Vec<String>) {
    let mut add: Vec<String> = Vec::new();
    for t in wanted {
        if !bound.contains(t) && !add.contains(t) {
            add.push(t.clone());
        }
    }
    let mut remove: Vec<String> = Vec::new();
    for t in bound {
        if !wanted.contains(t) && !remove.contains(t) {
            remove.push(t.clone());
        }
    }
    (add, remove)
}

/// Ask for `wanted` and bring the live queue in line, if there is one
/// (without a link, the next one is declared with `wanted`).
pub(super) async fn set(shared: &Arc<Shared>, wanted: Vec<String>) -> Result<(), MeshError> {
    shared.bindings.lock().await.wanted = wanted;
    reconcile(shared).await
}

/// The ledger of a shared event log: a one-message queue beside it that
/// holds the topics last bound (the broker cannot be asked for a queue's
/// bindings over AMQP), so bindings no routing table wants any more are
/// found and removed. Read without taking the message away.
pub(super) async fn ledger(ch: &lapin::Channel, c: &AmqpConfig) -> Result<Vec<String>, MeshError> {
    let queue = ledger_queue(c);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| fail(c, "cannot declare the event log's ledger", e))?;
    let got = ch
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(|e| fail(c, "cannot read the event log's ledger", e))?;
    let Some(message) = got else {
        return Ok(Vec::new());
    };
    let topics: Vec<String> = serde_json::from_slice::<Vec<String>>(&message.delivery.data)
        .unwrap_or_default()
        .into_iter()
        // What a peer could have written is only ever unbound, and only
        // when no rule wants it: a name, not a payload.
        .filter(|t| t.len() <= 255)
        .take(10_000)
        .collect();
    message
        .delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: true })
        .await
        .map_err(|e| fail(c, "cannot read the event log's ledger", e))?;
    Ok(topics)
}

/// Write the topics bound now into the ledger (the one message it keeps).
pub(super) async fn write_ledger(
    ch: &lapin::Channel,
    c: &AmqpConfig,
    bound: &[String],
) -> Result<(), MeshError> {
    if c.event_log.is_none() {
        return Ok(());
    }
    let body = serde_json::to_vec(bound).unwrap_or_default();
    ch.basic_publish(
        "".into(),
        ledger_queue(c).as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        &body,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .map_err(|e| fail(c, "cannot write the event log's ledger", e))?
    .await
    .map_err(|e| fail(c, "cannot write the event log's ledger", e))
    .and_then(super::taken)
}

fn ledger_queue(c: &AmqpConfig) -> String {
    format!("{}-bindings", c.event_queue_name())
}

/// Bind the event queue to `add` (each added to `bound` once bound), then
/// unbind it from `remove` (each taken out of `bound`).
pub(super) async fn apply(
    ch: &lapin::Channel,
    c: &AmqpConfig,
    bound: &mut Vec<String>,
    add: Vec<String>,
    remove: Vec<String>,
) -> Result<(), MeshError> {
    let queue = c.event_queue_name();
    for topic in add {
        ch.queue_bind(
            queue.as_str().into(),
            c.events_exchange.as_str().into(),
            topic.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| fail(c, &format!("cannot bind events `{topic}`"), e))?;
        if !bound.contains(&topic) {
            bound.push(topic);
        }
    }
    for topic in remove {
        ch.queue_unbind(
            queue.as_str().into(),
            c.events_exchange.as_str().into(),
            topic.as_str().into(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| fail(c, &format!("cannot unbind events `{topic}`"), e))?;
        bound.retain(|t| *t != topic);
    }
    Ok(())
}

/// Bind what is wanted and not bound, then unbind what is bound and no
/// longer wanted, on the live link's channel.
pub(super) async fn reconcile(shared: &Arc<Shared>) -> Result<(), MeshError> {
    let c = &shared.config;
    if !c.has_event_queue() {
        return Ok(());
    }
    let mut b = shared.bindings.lock().await;
    let channel = shared
        .link
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|l| l.publish.clone());
    let Some(ch) = channel else {
        return Ok(());
    };
    let (add, remove) = changes(&b.bound, &b.wanted);
    apply(&ch, c, &mut b.bound, add, remove).await?;
    write_ledger(&ch, c, &b.bound).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn a_topic_in_both_is_left_alone() {
        let (add, remove) = changes(&v(&["a.#", "b.*"]), &v(&["b.*", "c.x", "c.x"]));
        assert_eq!(add, v(&["c.x"]));
        assert_eq!(remove, v(&["a.#"]));
        assert_eq!(changes(&v(&["a"]), &v(&["a"])), (vec![], vec![]));
    }

    proptest! {
        /// Applying the changes to what is bound gives exactly what is
        /// wanted, and nothing wanted is ever unbound.
        #[test]
        fn the_changes_lead_to_what_is_wanted(
            bound in proptest::collection::vec("[a-d]", 0..6),
            wanted in proptest::collection::vec("[a-d]", 0..6),
        ) {
            let (add, remove) = changes(&bound, &wanted);
            prop_assert!(remove.iter().all(|t| !wanted.contains(t)));
            prop_assert!(add.iter().all(|t| !bound.contains(t)));
            let mut after: Vec<String> = bound.iter().filter(|t| !remove.contains(t)).cloned().collect();
            after.extend(add);
            after.sort();
            after.dedup();
            let mut expected = wanted.clone();
            expected.sort();
            expected.dedup();
            prop_assert_eq!(after, expected);
        }
    }
}
