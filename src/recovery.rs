//! A client that comes back resumes where it left off: `subscribe` with
//! `since` (the last position it saw) gets every event it would have
//! received meanwhile, in order, then the live ones, with no gap and none
//! twice, on any instance of the BFF.
//!
//! How the switch from replay to live is exact: under the window's lock
//! (which the fan-out holds while it delivers), the session's subscriptions
//! are registered, its live events start being held back, and the log's
//! tail is taken. The replay covers the positions after `since` through
//! that tail; every live event after the tail is held, and follows the
//! replay. Events the client has (at or before `since`, when it comes from
//! an instance that was ahead of this one) are never sent again.
//!
//! What is replayed comes from the window in memory when it holds all of
//! it, else from the broker's log (a few such reads at once per instance,
//! so a reconnect storm waits its turn instead of starving live delivery).
//! More than `events.recover_max` events, or a position the log no longer
//! keeps, answers `recovered: false` and replays nothing: the client
//! refetches. The replay is queued at the reader's pace, as live events are.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::history::{Entry, Source};
use crate::hub::Hub;
use crate::mesh::{IncomingEvent, LogRead, Mesh};
use crate::protocol::{ServerFrame, SessionInfo};
use crate::routing::{Delivery, EventRule, RouteTable};
use crate::topic;

/// How long a resume waits for the log to be read up to this instance's
/// start (just after it starts) before it gives up.
const LIVE_WAIT: Duration = Duration::from_secs(10);

/// How long a resume waits for its turn to read the broker's log.
const TURN_WAIT: Duration = Duration::from_secs(30);

/// How long a replay waits on a client that reads nothing.
const PATIENCE: Duration = Duration::from_secs(10);

/// The frame a session gets for an event, and who gets it: what the
/// fan-out sends and keeps, and what a replay read from the log rebuilds;
/// with the rule that delivers it. `None` when no rule does (or the
/// handler drops it).
pub(crate) fn entry_of<'r>(
    hub: &Hub,
    routes: &'r RouteTable,
    event: IncomingEvent,
) -> Option<(&'r EventRule, Entry)> {
    let rule = routes.event_rule(&event.topic)?;
    let payload = hub.handler().on_event(&event.topic, event.event)?;
    let frame = ServerFrame::Event {
        topic: event.topic.clone(),
        event: payload,
        position: event.position,
    }
    .to_json()
    .into();
    let entry = Entry {
        position: event.position.unwrap_or(0),
        topic: event.topic.into(),
        target: event
            .target
            .filter(|t| !t.is_empty())
            .map(Vec::into_boxed_slice),
        frame,
    };
    Some((rule, entry))
}

/// Whether a session (who it is, what it subscribes to) would have been
/// sent `entry`, which `rule` delivers, live: the same roles, target and
/// subscription checks.
fn receives(rule: &EventRule, info: &SessionInfo, topics: &[String], entry: &Entry) -> bool {
    if !rule.allows(&info.roles) {
        return false;
    }
    match &entry.target {
        Some(users) if !users.contains(&info.user_id) => return false,
        None if rule.delivery == Delivery::Target => return false,
        _ => {}
    }
    rule.delivery != Delivery::Subscribers || topics.iter().any(|p| topic::matches(p, &entry.topic))
}

/// Why a resume replays nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotRecovered {
    TooMany,
    TooOld,
    Unavailable,
}

/// The first half of a resume, under the window's lock: subscribe, hold
/// live events back, take the tail and what the window has. The session's
/// `topics` are already checked against the routing table. `Err` with the
/// frame to answer when the subscription itself fails.
pub(crate) fn begin(
    hub: &Hub,
    session: &SessionInfo,
    topics: &[String],
    since: u64,
) -> Result<Resume, Box<ServerFrame>> {
    let sessions = hub.sessions();
    let limit = hub.limits().max_subscriptions;
    let log = hub.log();
    let source = log.source(since);
    // What the replay covers: nothing live at or before it is sent again,
    // everything live after it is held until the replay is queued. (Before
    // the log is live nothing has been sent: the replay then stops where
    // news began.)
    let through = match &source {
        Source::Window { tail } => since.max(tail.unwrap_or(since)),
        Source::Log { tail } => since.max(*tail),
        Source::NotLive => since,
    };
    if !sessions.hold(&session.session_id, through) {
        return Err(Box::new(ServerFrame::error(
            crate::protocol::ErrorName::RateLimited,
            "a resume is already in progress on this connection",
            None,
        )));
    }
    let now = match sessions.subscribe(&session.session_id, topics, limit) {
        Ok(now) => now,
        Err(crate::session::SubscribeError::TooMany(limit)) => {
            drop(log);
            sessions.release(&session.session_id);
            return Err(Box::new(ServerFrame::error(
                crate::protocol::ErrorName::RateLimited,
                format!("at most {limit} subscriptions per connection"),
                None,
            )));
        }
    };
    let from_window = match &source {
        Source::Window { .. } => {
            let routes = hub.routes();
            let recover_max = hub.settings().events.recover_max;
            let frames: Vec<Utf8Bytes> = log
                .after(since)
                .filter(|e| {
                    routes
                        .event_rule(&e.topic)
                        .is_some_and(|rule| receives(rule, session, &now, e))
                })
                .take(recover_max + 1)
                .map(|e| e.frame.clone())
                .collect();
            Some(frames)
        }
        _ => None,
    };
    drop(log);
    Ok(Resume {
        session_id: session.session_id.clone(),
        topics: now,
        since,
        source,
        from_window,
    })
}

/// A resume begun: the rest runs beside the socket ([`Resume::finish`]).
#[derive(Debug)]
pub(crate) struct Resume {
    session_id: String,
    topics: Vec<String>,
    since: u64,
    source: Source,
    from_window: Option<Vec<Utf8Bytes>>,
}

impl Resume {
    /// Gather what is missed (from the window, or the broker's log), answer
    /// `subscribed` with whether it is recovered, queue the replay at the
    /// reader's pace, then let the held live events follow.
    pub(crate) async fn finish(mut self, hub: Hub, mesh: Arc<dyn Mesh>, session: Arc<SessionInfo>) {
        let sessions = hub.sessions().clone();
        let max = hub.settings().events.recover_max;
        let gathered = match (self.from_window.take(), &self.source) {
            (Some(frames), _) if frames.len() > max => Err(NotRecovered::TooMany),
            (Some(frames), _) => Ok(frames),
            (None, Source::Log { tail }) => {
                from_log(
                    &hub,
                    mesh.as_ref(),
                    &session,
                    &self.topics,
                    self.since,
                    *tail,
                )
                .await
            }
            (None, _) => self.after_live(&hub, mesh.as_ref(), &session).await,
        };
        let recovered = gathered.is_ok();
        if let Err(why) = &gathered {
            tracing::debug!(session_id = %self.session_id, since = self.since, ?why, "resume not recovered");
        }
        hub.metrics()
            .resumed(if recovered { "recovered" } else { "refetch" });
        let answer = ServerFrame::Subscribed {
            topics: std::mem::take(&mut self.topics),
            recovered: Some(recovered),
        };
        let mut open = sessions
            .push_paced(&self.session_id, answer.to_json().into(), PATIENCE)
            .await;
        for frame in gathered.unwrap_or_default() {
            if !open {
                break;
            }
            open = sessions.push_paced(&self.session_id, frame, PATIENCE).await;
        }
        // The live events held meanwhile, at the same pace, until few are
        // left; the last ones go as the hold ends (under the session's
        // lock, so a live event that comes now follows them).
        while open {
            let held = sessions.take_held(&self.session_id);
            if held.is_empty() {
                break;
            }
            for frame in held {
                open = open && sessions.push_paced(&self.session_id, frame, PATIENCE).await;
            }
        }
        sessions.release(&self.session_id);
    }

    /// Just after start, before the log is read up to this instance's
    /// marker: wait for it, then replay from the log up to where news
    /// began (what came after was held as it was sent).
    async fn after_live(
        &self,
        hub: &Hub,
        mesh: &dyn Mesh,
        session: &SessionInfo,
    ) -> Result<Vec<Utf8Bytes>, NotRecovered> {
        let deadline = tokio::time::Instant::now() + LIVE_WAIT;
        let tail = loop {
            let live = {
                let log = hub.log();
                log.is_live().then(|| log.live_from())
            };
            if let Some(tail) = live {
                break tail;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NotRecovered::Unavailable);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match tail {
            Some(tail) if tail > self.since => {
                from_log(hub, mesh, session, &self.topics, self.since, tail).await
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// Read the broker's log after `since` through `tail`, keeping what the
/// session would have received: at most `recover_max` events and
/// `recover_max_bytes`, else not recovered.
async fn from_log(
    hub: &Hub,
    mesh: &dyn Mesh,
    session: &SessionInfo,
    topics: &[String],
    since: u64,
    tail: u64,
) -> Result<Vec<Utf8Bytes>, NotRecovered> {
    let events = &hub.settings().events;
    let (max, max_bytes) = (events.recover_max, events.recover_max_bytes);
    let _turn = tokio::time::timeout(TURN_WAIT, hub.log_reads().acquire())
        .await
        .map_err(|_| NotRecovered::Unavailable)?
        .map_err(|_| NotRecovered::Unavailable)?;
    let routes = hub.routes_full();
    let from = since.saturating_add(1);
    let mut read = mesh.read_log(from, tail);
    let mut frames = Vec::new();
    let mut bytes = 0usize;
    let mut first = true;
    let mut last = since;
    while let Some(item) = tokio::time::timeout(PATIENCE, read.next())
        .await
        .map_err(|_| NotRecovered::Unavailable)?
    {
        let item = item.map_err(|_| NotRecovered::Unavailable)?;
        let position = match &item {
            LogRead::Event(e) => e.position.unwrap_or(0),
            LogRead::Skipped(p) => *p,
        };
        // The log starts later than asked: what was before is gone.
        if first && position != from {
            return Err(NotRecovered::TooOld);
        }
        first = false;
        if position > tail {
            break;
        }
        last = position;
        if let LogRead::Event(event) = item
            && let Some((rule, entry)) = entry_of(hub, &routes, event)
            && receives(rule, session, topics, &entry)
        {
            bytes += entry.frame.len();
            frames.push(entry.frame);
            if frames.len() > max || bytes > max_bytes {
                return Err(NotRecovered::TooMany);
            }
        }
        if position >= tail {
            break;
        }
    }
    if last < tail {
        return Err(NotRecovered::Unavailable);
    }
    Ok(frames)
}

/// An event payload as a replay keeps it (tests build entries with it).
#[cfg(test)]
fn entry(position: u64, topic: &str, target: Option<&[&str]>) -> Entry {
    Entry {
        position,
        topic: topic.into(),
        target: target.map(|t| t.iter().map(|u| u.to_string()).collect()),
        frame: crate::protocol::RawJson::null().get().to_owned().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"
[[event]]
topic = "news.#"

[[event]]
topic = "audit.#"
roles = ["auditor"]

[[event]]
topic = "system.*"
deliver = "all"

[[event]]
topic = "inbox.*"
deliver = "target"
"#;

    fn who(user: &str, roles: &[&str]) -> SessionInfo {
        SessionInfo {
            session_id: "s".into(),
            user_id: user.into(),
            username: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn a_replay_keeps_what_live_delivery_would_have_sent() {
        let routes = RouteTable::parse("routes.toml", ROUTES).unwrap();
        let alice = who("alice", &[]);
        let subs = vec!["news.sports.#".to_owned()];
        // As a replay asks: the rule that delivers the event, if any.
        let by = |info: &SessionInfo, topics: &[String], e: &Entry| {
            routes
                .event_rule(&e.topic)
                .is_some_and(|rule| receives(rule, info, topics, e))
        };
        let r = |e: &Entry| by(&alice, &subs, e);
        assert!(r(&entry(1, "news.sports.goal", None)));
        assert!(!r(&entry(2, "news.politics", None)), "not subscribed");
        assert!(r(&entry(3, "system.restart", None)), "all");
        assert!(!r(&entry(4, "inbox.new", None)), "target without a target");
        assert!(r(&entry(5, "inbox.new", Some(&["bob", "alice"]))));
        assert!(!r(&entry(6, "inbox.new", Some(&["bob"]))), "another user's");
        assert!(
            !r(&entry(7, "system.restart", Some(&["bob"]))),
            "narrowed by target"
        );
        assert!(!r(&entry(8, "audit.login", None)), "a role it lacks");
        assert!(!r(&entry(9, "unrouted.x", None)));
        let auditor = who("carol", &["auditor"]);
        let audit = vec!["audit.#".to_owned()];
        assert!(by(&auditor, &audit, &entry(10, "audit.login", None)));
    }
}
