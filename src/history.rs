//! The window of recent events an instance keeps in memory, so that a
//! client who was away for seconds resumes without a read of the broker's
//! log. Each event is kept as the frame it was sent as (serialised once),
//! with what decides who gets it (topic, target), under its log position.
//!
//! The window says whether it can answer a resume: only when every event
//! after the client's position has passed through it. It cannot when the
//! events were before its start (evicted, or raised before this instance
//! read the log) or when one of them was lost on its way in (a gap: the
//! queue in front of the fan-out was full). Bounded in events and bytes by
//! construction: the oldest go first.

use std::collections::VecDeque;

use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One event, as it was sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) position: u64,
    pub(crate) topic: Box<str>,
    pub(crate) target: Option<Box<[String]>>,
    pub(crate) frame: Utf8Bytes,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.frame.len() + self.topic.len() + std::mem::size_of::<Self>()
    }
}

/// The window and where this instance is in the log.
#[derive(Debug)]
pub(crate) struct Window {
    entries: VecDeque<Entry>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Every event at or after this position, up to `tail`, went through
    /// the window (those still in it are the ones not evicted).
    start: Option<u64>,
    /// The last position read (an event or this instance's marker).
    tail: Option<u64>,
    /// No resume may reach back before this: an event before it was lost.
    floor: u64,
    /// Whether the log is read up to where this instance's news begins.
    live: bool,
    /// Where news began (this instance's marker): what came before was
    /// kept, not sent.
    live_from: Option<u64>,
}

/// Where a resume after a position gets its events from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// All of them are in the window, through `tail`.
    Window { tail: Option<u64> },
    /// Some are older than the window (or lost on the way in): the log
    /// must be read from the position after the client's through `tail`.
    Log { tail: u64 },
    /// Nothing is known of the log yet.
    NotLive,
}

impl Window {
    pub(crate) fn new(max_events: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_events: max_events.max(1),
            max_bytes: max_bytes.max(1),
            start: None,
            tail: None,
            floor: 0,
            live: false,
            live_from: None,
        }
    }

    /// An event read from the log, in order. A position not after the
    /// tail (read again after a reconnect) is ignored: false.
    pub(crate) fn push(&mut self, entry: Entry) -> bool {
        if self.tail.is_some_and(|t| entry.position <= t) {
            return false;
        }
        self.start.get_or_insert(entry.position);
        self.tail = Some(entry.position);
        self.bytes += entry.bytes();
        self.entries.push_back(entry);
        while self.entries.len() > self.max_events || self.bytes > self.max_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.bytes();
            self.start = Some(old.position + 1);
        }
        true
    }

    /// The log is read up to `position` (this instance's marker): news
    /// from here on.
    pub(crate) fn go_live(&mut self, position: u64) {
        self.live = true;
        self.live_from.get_or_insert(position);
        if self.tail.is_none_or(|t| t < position) {
            self.tail = Some(position);
        }
        self.start.get_or_insert(position);
    }

    /// Start live with nothing read (a log that begins with this instance).
    pub(crate) fn live_from_empty(&mut self, next: u64) {
        self.live = true;
        if let Some(last) = next.checked_sub(1) {
            self.go_live(last);
        } else {
            self.start.get_or_insert(0);
        }
    }

    /// An event at `position` was lost on its way in.
    pub(crate) fn gap(&mut self, position: u64) {
        self.floor = self.floor.max(position.saturating_add(1));
    }

    pub(crate) fn is_live(&self) -> bool {
        self.live
    }

    /// Where news began: events at or before it were not sent live.
    pub(crate) fn live_from(&self) -> Option<u64> {
        self.live_from
    }

    /// Where the events after `since` come from. A lost event counts as
    /// read (it was, and is in the broker's log): a resume before it reads
    /// the log through it.
    pub(crate) fn source(&self, since: u64) -> Source {
        if !self.live {
            return Source::NotLive;
        }
        let lost = self.floor.checked_sub(1);
        let known = match (self.tail, lost) {
            (Some(t), Some(l)) => t.max(l),
            (t, l) => match t.or(l) {
                Some(k) => k,
                None => return Source::Window { tail: None },
            },
        };
        let next = since.saturating_add(1);
        let whole = self.start.is_some_and(|s| next >= s) && next >= self.floor;
        if whole || since >= known {
            Source::Window { tail: self.tail }
        } else {
            Source::Log { tail: known }
        }
    }

    /// The events after `since`, in order.
    pub(crate) fn after(&self, since: u64) -> impl Iterator<Item = &Entry> {
        let from = self.entries.partition_point(|e| e.position <= since);
        self.entries.range(from..)
    }

    /// The position of the oldest event held.
    #[cfg(test)]
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|e| e.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(position: u64) -> Entry {
        Entry {
            position,
            topic: "t".into(),
            target: None,
            frame: format!("{{\"p\":{position}}}").into(),
        }
    }

    #[test]
    fn a_resume_inside_the_window_is_answered_from_it() {
        let mut w = Window::new(100, 1 << 20);
        assert_eq!(w.source(0), Source::NotLive);
        for p in [10, 11, 13] {
            assert!(w.push(entry(p)));
        }
        w.go_live(14);
        assert_eq!(w.source(11), Source::Window { tail: Some(14) });
        let after: Vec<u64> = w.after(11).map(|e| e.position).collect();
        assert_eq!(after, [13]);
        // Before the first event read: the log must be read.
        assert_eq!(w.source(5), Source::Log { tail: 14 });
        // At or past the tail: nothing missed.
        assert_eq!(w.source(14), Source::Window { tail: Some(14) });
        assert_eq!(w.source(99), Source::Window { tail: Some(14) });
        // Read again after a reconnect: ignored.
        assert!(!w.push(entry(13)));
    }

    #[test]
    fn a_lost_event_sends_resumes_before_it_to_the_log() {
        let mut w = Window::new(100, 1 << 20);
        w.live_from_empty(0);
        for p in 0..5 {
            w.push(entry(p));
        }
        w.gap(5);
        w.push(entry(6));
        assert_eq!(w.source(3), Source::Log { tail: 6 });
        assert_eq!(w.source(5), Source::Window { tail: Some(6) });
    }

    proptest! {
        /// However events come and go, the window holds at most its
        /// bounds, in order, and when it says it can answer a resume it
        /// holds every event after it.
        #[test]
        fn bounded_ordered_and_honest(
            steps in proptest::collection::vec((1u64..4, any::<bool>()), 1..200),
            max_events in 1usize..20,
            since in 0u64..400,
        ) {
            let mut w = Window::new(max_events, 400);
            w.live_from_empty(0);
            let mut p = 0;
            let mut pushed = Vec::new();
            let mut lost = Vec::new();
            for (step, lose) in steps {
                p += step;
                if lose {
                    w.gap(p);
                    lost.push(p);
                } else {
                    w.push(entry(p));
                    pushed.push(p);
                }
            }
            prop_assert!(w.entries.len() <= max_events);
            prop_assert!(w.bytes <= 400 || w.entries.len() <= 1);
            let held: Vec<u64> = w.entries.iter().map(|e| e.position).collect();
            prop_assert!(held.windows(2).all(|x| x[0] < x[1]));
            if let Source::Window { .. } = w.source(since) {
                let want: Vec<u64> = pushed.iter().copied().filter(|&x| x > since).collect();
                let got: Vec<u64> = w.after(since).map(|e| e.position).collect();
                prop_assert_eq!(got, want);
                prop_assert!(lost.iter().all(|&x| x <= since));
            }
            let _ = w.first();
        }
    }
}
