//! Bytes a socket may send before it has said who it is. The WebSocket
//! library buffers a frame whole before anyone sees it, up to its hard cap:
//! a socket that announces a large frame before authenticating, sends part
//! of it and waits, would hold that much until the auth timeout. A socket
//! that upgraded without a token gets a budget of bytes read (a
//! `authenticate` frame fits it many times over); each read is cut to what
//! is left, and once it is spent reads fail and the socket is closed.
//! Authenticating lifts it. The socket's own task holds it (`socket`): a
//! plain counter, nothing shared.

use std::io;

/// What a socket waiting to authenticate may send, in all: an
/// `authenticate` frame (16 KiB of token and its envelope), a read's
/// worth beyond it, and pings. A frame announced larger than the token
/// limit and held back costs at most this.
pub(crate) const BEFORE_AUTH: usize = 20 * 1024;

/// A socket's read budget: the bytes it may still send, `usize::MAX` for
/// no limit (one word: every socket's task holds one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadBudget(usize);

impl ReadBudget {
    pub(crate) const UNLIMITED: Self = Self(usize::MAX);

    /// At most `bytes` more may be read (`bytes` below `usize::MAX`).
    pub(crate) fn of(bytes: usize) -> Self {
        Self(bytes.min(usize::MAX - 1))
    }

    /// No limit any more (the socket authenticated).
    pub(crate) fn lift(&mut self) {
        *self = Self::UNLIMITED;
    }

    /// How much of a read of `want` bytes may be taken; an error once
    /// nothing is left (for a read of anything).
    pub(crate) fn allowed(&self, want: usize) -> io::Result<usize> {
        match self.0 {
            usize::MAX => Ok(want),
            0 if want > 0 => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "more sent before authenticating than a token needs",
            )),
            left => Ok(want.min(left)),
        }
    }

    /// Count `n` bytes read.
    pub(crate) fn spend(&mut self, n: usize) {
        if self.0 != usize::MAX {
            self.0 = self.0.saturating_sub(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_spent_budget_refuses_reads_and_a_lifted_one_does_not() {
        let mut budget = ReadBudget::of(150);
        assert_eq!(budget.allowed(100).unwrap(), 100);
        budget.spend(100);
        assert_eq!(budget.allowed(100).unwrap(), 50, "cut to what is left");
        budget.spend(50);
        let err = budget.allowed(1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        budget.lift();
        assert_eq!(budget.allowed(1 << 20).unwrap(), 1 << 20);
        assert_eq!(
            ReadBudget::UNLIMITED.allowed(usize::MAX).unwrap(),
            usize::MAX
        );
    }

    proptest! {
        /// However reads come, a budget never lets more through than it
        /// was given, and lets all of it through.
        #[test]
        fn reads_never_exceed_the_budget(
            bytes in 0usize..100_000,
            reads in proptest::collection::vec(0usize..9000, 0..64),
        ) {
            let mut budget = ReadBudget::of(bytes);
            let mut taken = 0;
            for want in reads {
                match budget.allowed(want) {
                    Ok(n) => {
                        prop_assert!(n <= want);
                        budget.spend(n);
                        taken += n;
                    }
                    Err(_) => prop_assert_eq!(taken, bytes),
                }
            }
            prop_assert!(taken <= bytes);
        }
    }
}
