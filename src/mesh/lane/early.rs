//! Deliveries that come while the lane is still setting up: a consumer
//! already started receives while the next one is asked for. They cannot
//! always be handed back: a consumer without acknowledgements (the response
//! queue's) has nothing to hand back, and a stream refuses `basic.nack`
//! and closes the channel. So they are kept as their frames came, whole,
//! and the read loop takes them first, before anything read after the
//! handshake: nothing that came early is lost or acknowledged unhandled.
//!
//! Bounded by construction: past the limit in bytes a delivery is let go
//! whole (none of its frames kept) and named in [`Kept::let_go`], for the
//! handshake to hand back (a consumer with acknowledgements) or count as
//! lost (one without). A frame of a delivery is never kept alone.

use super::codec::{FRAME_BODY, FRAME_HEADER};

/// Early deliveries kept, at most, in bytes of their frames.
pub(super) const EARLY_MAX: usize = 4 << 20;

/// The delivery whose frames are coming.
#[derive(Debug)]
enum Current {
    /// None yet, or the last one is complete.
    None,
    /// Kept: its frames start at `start` in the buffer; its delivery and
    /// consumer tags, in case it has to be let go after all.
    Keeping {
        start: usize,
        tag: u64,
        consumer: String,
    },
    /// Let go for want of room: its frames pass.
    LettingGo,
}

/// The early deliveries of one handshake.
#[derive(Debug)]
pub(super) struct Early {
    kept: Vec<u8>,
    let_go: Vec<(u64, String)>,
    current: Current,
    limit: usize,
}

/// What a handshake ends with: the frames to read first, and the
/// deliveries let go (delivery tag, consumer tag), in order.
#[derive(Debug, Default)]
pub(super) struct Kept {
    pub(super) frames: Vec<u8>,
    pub(super) let_go: Vec<(u64, String)>,
}

impl Early {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            kept: Vec::new(),
            let_go: Vec::new(),
            current: Current::None,
            limit,
        }
    }

    /// A `basic.deliver` came (its whole frame `raw`): a delivery starts.
    pub(super) fn deliver(&mut self, raw: &[u8], tag: u64, consumer: &str) {
        if self.kept.len() + raw.len() <= self.limit {
            self.current = Current::Keeping {
                start: self.kept.len(),
                tag,
                consumer: consumer.to_owned(),
            };
            self.kept.extend_from_slice(raw);
        } else {
            self.let_go.push((tag, consumer.to_owned()));
            self.current = Current::LettingGo;
        }
    }

    /// A frame that is not a method came (`kind`, whole frame `raw`):
    /// whether it was a content frame of an early delivery (taken);
    /// otherwise the caller refuses it.
    pub(super) fn content(&mut self, kind: u8, raw: &[u8]) -> bool {
        if kind != FRAME_HEADER && kind != FRAME_BODY {
            return false;
        }
        match &mut self.current {
            Current::None => false,
            Current::LettingGo => true,
            Current::Keeping { .. } if self.kept.len() + raw.len() <= self.limit => {
                self.kept.extend_from_slice(raw);
                true
            }
            Current::Keeping {
                start,
                tag,
                consumer,
            } => {
                // The delivery no longer fits: let it go whole.
                self.kept.truncate(*start);
                self.let_go.push((*tag, std::mem::take(consumer)));
                self.current = Current::LettingGo;
                true
            }
        }
    }

    /// Any other method came: the delivery before it is complete.
    pub(super) fn method(&mut self) {
        self.current = Current::None;
    }

    /// What was kept and let go; the next handshake starts empty.
    pub(super) fn take(&mut self) -> Kept {
        self.current = Current::None;
        Kept {
            frames: std::mem::take(&mut self.kept),
            let_go: std::mem::take(&mut self.let_go),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::FRAME_HEARTBEAT;
    use super::super::tests::{body, deliver_to, header};
    use super::*;

    fn message(consumer: &str, tag: u64, bytes: &[u8]) -> Vec<Vec<u8>> {
        let frames = [
            deliver_to(consumer, tag),
            header(bytes.len() as u64, &format!("c{tag}")),
            body(bytes),
        ];
        frames.into_iter().filter(|f| !f.is_empty()).collect()
    }

    fn feed(early: &mut Early, tag: u64, consumer: &str, frames: &[Vec<u8>]) {
        early.deliver(&frames[0], tag, consumer);
        for f in &frames[1..] {
            assert!(early.content(f[0], f));
        }
    }

    #[test]
    fn content_without_a_delivery_and_other_frames_are_not_taken() {
        let mut early = Early::new(EARLY_MAX);
        let h = header(3, "x");
        assert!(!early.content(FRAME_HEADER, &h));
        feed(&mut early, 1, "responses", &message("responses", 1, b"abc"));
        assert!(!early.content(FRAME_HEARTBEAT, &[8, 0, 0, 0, 0, 0, 0, 0xCE]));
        early.method();
        assert!(!early.content(FRAME_BODY, &body(b"abc")));
    }

    #[test]
    fn a_delivery_that_does_not_fit_is_let_go_whole_and_the_next_that_fits_is_kept() {
        let small = message("responses", 1, b"small");
        let large = message("responses", 2, &[7u8; 300]);
        let after = message("events", 3, b"after");
        let size = |m: &[Vec<u8>]| m.iter().map(Vec::len).sum::<usize>();
        let mut early = Early::new(size(&small) + size(&after) + 100);
        feed(&mut early, 1, "responses", &small);
        feed(&mut early, 2, "responses", &large);
        feed(&mut early, 3, "events", &after);
        let kept = early.take();
        assert_eq!(kept.frames, [small.concat(), after.concat()].concat());
        assert_eq!(kept.let_go, vec![(2, "responses".to_owned())]);
        assert!(early.take().frames.is_empty(), "taken once");
    }

    proptest::proptest! {
        /// Whatever the sizes and the limit: what is kept is the kept
        /// deliveries' frames, whole and in order, within the limit, and
        /// every delivery is either kept or named as let go, once.
        #[test]
        fn every_delivery_is_kept_whole_or_let_go(
            sizes in proptest::collection::vec(0usize..3000, 0..24),
            limit in 0usize..20_000,
        ) {
            let mut early = Early::new(limit);
            let mut expected = Vec::new();
            let mut let_go = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                let tag = i as u64 + 1;
                let consumer = if i % 2 == 0 { "responses" } else { "events" };
                let m = message(consumer, tag, &vec![1u8; *size]);
                feed(&mut early, tag, consumer, &m);
                early.method();
                let whole = m.concat();
                if expected.len() + whole.len() <= limit {
                    expected.extend_from_slice(&whole);
                } else {
                    let_go.push((tag, consumer.to_owned()));
                }
            }
            let kept = early.take();
            proptest::prop_assert!(kept.frames.len() <= limit);
            proptest::prop_assert_eq!(kept.frames, expected);
            proptest::prop_assert_eq!(kept.let_go, let_go);
        }
    }
}
