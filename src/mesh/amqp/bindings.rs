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

use super::Shared;
use super::topology::fail;
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
        b.bound.push(topic);
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
        b.bound.retain(|t| *t != topic);
    }
    Ok(())
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
