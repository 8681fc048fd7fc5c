//! The routing file, taken again while the BFF runs: on SIGHUP and when
//! the file changes on disk. A new table is read and checked exactly as at
//! start-up; a good one replaces the old one whole (calls already planned
//! finish under the table they started with), a bad one changes nothing.
//! No socket closes: subscriptions the new table no longer allows are
//! dropped with an `unsubscribed` frame, and the event queue's bindings
//! follow the new rules.
//!
//! The file is watched through its directory, not itself: an editor that
//! writes a new file and renames it over the old one, and a Kubernetes
//! ConfigMap update (a symlink swapped in the directory) both replace the
//! file's inode, which a watch on the file would lose. A directory event
//! only makes the watcher read the file; it reloads when the bytes differ
//! from the last ones it saw, so a bad file is reported once, not at every
//! event, and other files in the directory cost a read each. A slow poll
//! backs the watch up (a file system without inotify, a watch that could
//! not be set).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch;
use crate::error::RunError;
use crate::gateway::{Gateway, Joined, load_routes};
use crate::protocol::{NARROWED_BY_RELOAD, ServerFrame};
use crate::routing::TableChanges;

/// The longest a reload waits for the broker to bind the new event topics;
/// past it the table is in place and the bindings follow once the link
/// answers (or is rebuilt).
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// After a directory event, how long the directory must stay quiet before
/// the file is read: a writer's truncate-then-write is one change, not a
/// broken file and then a good one.
const SETTLE: Duration = Duration::from_millis(100);

/// The most a burst of events delays the read.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// How often the file is read without any event, to catch what no watch
/// reported.
const POLL: Duration = Duration::from_secs(5);

/// How often it is read when no watch could be set.
const POLL_UNWATCHED: Duration = Duration::from_secs(1);

/// Read the routing file again and, when it is valid, put it in place of
/// the table in use: what changed. An invalid file changes nothing and
/// its error (file, line, what was expected: the start-up message) is
/// returned. Either way `bff_routes_reload_total` counts it.
///
/// `run` calls this on SIGHUP and when the file changes; a BFF may call it
/// from anywhere else (an admin endpoint of its own).
pub async fn reload_routes(gateway: &Gateway) -> Result<TableChanges, RunError> {
    let hub = gateway.hub();
    let _one_at_a_time = hub.replacing_routes().await;
    let new = match load_routes(hub.settings()) {
        Ok(table) => table,
        Err(e) => {
            hub.metrics().routes_reloaded("error");
            return Err(e);
        }
    };
    let changes = hub.routes().changes_to(&new);
    let topics: Vec<String> = new.events().iter().map(|r| r.pattern.clone()).collect();
    // New topics are bound before the table that delivers them is in
    // place; old ones are unbound after.
    match gateway.joined() {
        Joined::Broker(amqp) => {
            match tokio::time::timeout(REBIND_TIMEOUT, amqp.set_event_bindings(topics)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    "the event bindings of the reloaded routing table could not be set; they are set when the broker link is rebuilt"
                ),
                Err(_) => tracing::warn!(
                    "the broker did not bind the reloaded routing table's events within {REBIND_TIMEOUT:?}; they follow once it answers"
                ),
            }
        }
        Joined::Memory { mesh, stubs } => {
            mesh.set_event_bindings(hub.service_name(), topics);
            if *stubs {
                mesh.add_echo_stubs(&new);
            }
        }
    }
    hub.replace_routes(new);
    let routes = hub.routes();
    let narrowed = hub.sessions().retain_subscriptions(|roles, topic| {
        dispatch::authorize_subscription(&routes, roles, topic).is_ok()
    });
    drop(routes);
    for (session_id, topics) in &narrowed {
        if let Some(session) = hub.sessions().info(session_id) {
            hub.lifecycle().unsubscribed(&session, topics);
        }
        let frame = ServerFrame::Unsubscribed {
            topics: topics.clone(),
            reason: NARROWED_BY_RELOAD.into(),
        };
        hub.sessions()
            .send_to_session(session_id, frame.to_json().into());
    }
    hub.metrics().routes_reloaded("ok");
    tracing::info!(
        file = %hub.settings().routes.display(),
        %changes,
        sessions_unsubscribed = narrowed.len(),
        "routing table reloaded"
    );
    Ok(changes)
}

/// Why the watcher reads the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// SIGHUP: reload whatever the file holds.
    Signal,
    /// A directory event or the poll: reload if the file's bytes changed.
    Look,
}

/// What watches the routing file: set up before the gateway serves, so a
/// change made as soon as it serves is seen.
pub(crate) struct Watch {
    gateway: Gateway,
    path: std::path::PathBuf,
    dirs: Dirs,
    events: mpsc::Receiver<()>,
    hangup: Option<tokio::signal::unix::Signal>,
    poll: Option<tokio::time::Interval>,
    seen: Result<Vec<u8>, std::io::ErrorKind>,
}

impl Watch {
    /// Listen for SIGHUP, watch the file's directories (with
    /// `watch_routes`), and read the file as it is now.
    pub(crate) fn start(gateway: Gateway) -> Self {
        let path = gateway.settings().routes.clone();
        let on_change = gateway.settings().watch_routes;
        let (tx, events) = mpsc::channel::<()>(1);
        let mut dirs = Dirs::new(tx, on_change);
        dirs.follow(&path);
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the routing file is reloaded when it changes only");
                None
            }
        };
        let every = if dirs.watching() {
            POLL
        } else {
            POLL_UNWATCHED
        };
        let poll = on_change.then(|| {
            let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            poll
        });
        // What the table in use was read from (near enough: the bytes as
        // the gateway starts serving).
        let seen = std::fs::read(&path).map_err(|e| e.kind());
        Self {
            gateway,
            path,
            dirs,
            events,
            hangup,
            poll,
            seen,
        }
    }

    /// Reload on SIGHUP and (with `watch_routes`) whenever the routing
    /// file's bytes change, until `stop`. Every error is logged and
    /// counted, none ends the watch.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        loop {
            let cause = tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = recv_signal(&mut self.hangup) => Cause::Signal,
                Some(()) = self.events.recv() => {
                    settle(&mut self.events).await;
                    Cause::Look
                }
                _ = tick(&mut self.poll) => Cause::Look,
            };
            // A symlink swapped: the file now lives elsewhere.
            self.dirs.follow(&self.path);
            let now = read(&self.path).await;
            if cause == Cause::Look && now == self.seen {
                continue;
            }
            self.seen = now;
            let why = match cause {
                Cause::Signal => "SIGHUP",
                Cause::Look => "the file changed",
            };
            if let Err(e) = reload_routes(&self.gateway).await {
                tracing::error!(
                    error = %e,
                    cause = why,
                    "the routing file was not reloaded; the table in use keeps serving"
                );
            }
        }
    }
}

async fn tick(poll: &mut Option<tokio::time::Interval>) {
    match poll {
        Some(p) => {
            p.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Wait until no directory event came for [`SETTLE`] (at most
/// [`SETTLE_MAX`]).
async fn settle(events: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        let quiet = tokio::time::sleep(SETTLE);
        tokio::select! {
            _ = quiet => return,
            _ = tokio::time::sleep_until(deadline) => return,
            got = events.recv() => if got.is_none() { return },
        }
    }
}

/// The file's bytes, or why there are none (compared, so a file that
/// stays missing is reported once).
async fn read(path: &Path) -> Result<Vec<u8>, std::io::ErrorKind> {
    tokio::fs::read(path).await.map_err(|e| e.kind())
}

/// The directories watched for the file: the one its path names, and the
/// one it resolves to through symlinks, as that changes.
struct Dirs {
    watcher: Option<notify::RecommendedWatcher>,
    watched: BTreeSet<PathBuf>,
}

impl Dirs {
    /// Directories watched when `on` (else none: SIGHUP only).
    fn new(events: mpsc::Sender<()>, on: bool) -> Self {
        if !on {
            return Self {
                watcher: None,
                watched: BTreeSet::new(),
            };
        }
        // Called on notify's thread: a full channel already says "look".
        let handler = move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = events.try_send(());
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the routing file; it is read every {POLL_UNWATCHED:?} instead");
                None
            }
        };
        Self {
            watcher,
            watched: BTreeSet::new(),
        }
    }

    fn watching(&self) -> bool {
        self.watcher.is_some() && !self.watched.is_empty()
    }

    /// Watch the directories `path` lives in now; let go of the others.
    fn follow(&mut self, path: &Path) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let wanted = dirs_of(path);
        for gone in self.watched.difference(&wanted) {
            let _ = watcher.unwatch(gone);
        }
        self.watched.retain(|d| wanted.contains(d));
        for dir in wanted {
            if self.watched.contains(&dir) {
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir);
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch a directory of the routing file")
                }
            }
        }
    }
}

/// The directory a path names its file in, and the one the file is really
/// in once symlinks are resolved (when it exists and differs).
fn dirs_of(path: &Path) -> BTreeSet<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let named = parent(path);
    let mut dirs = BTreeSet::from([std::fs::canonicalize(&named).unwrap_or(named)]);
    if let Ok(real) = std::fs::canonicalize(path) {
        dirs.insert(parent(&real));
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directories_of_a_file_and_of_its_symlink_target() {
        let base = std::env::temp_dir().join(format!("bff-dirs-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("routes.toml"), "").unwrap();
        std::os::unix::fs::symlink(b.join("routes.toml"), a.join("routes.toml")).unwrap();
        let dirs = dirs_of(&a.join("routes.toml"));
        let (real_a, real_b) = (
            std::fs::canonicalize(&a).unwrap(),
            std::fs::canonicalize(&b).unwrap(),
        );
        assert_eq!(dirs, BTreeSet::from([real_a.clone(), real_b]));
        // A plain file: its one directory, however the path names it.
        std::fs::write(a.join("plain.toml"), "").unwrap();
        assert_eq!(dirs_of(&a.join("plain.toml")), BTreeSet::from([real_a]));
        let cwd = std::fs::canonicalize(".").unwrap();
        assert_eq!(
            dirs_of(Path::new("no-such-file.toml")),
            BTreeSet::from([cwd])
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
