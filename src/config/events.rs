//! `[events]`: the BFF's event log (a RabbitMQ stream every instance
//! reads), the window of it each instance keeps in memory, and what a
//! resuming client may ask of them. Defaults fit a phone that blinks or a
//! deploy that replaces an instance: minutes of history, seconds of window.

use serde::{Deserialize, Serialize};

use super::SettingsError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Events {
    /// The log lets events go after this many seconds.
    pub history_max_age_s: u64,
    /// The most the log keeps, in bytes.
    pub history_max_bytes: u64,
    /// A resume that would replay more events than this replays none
    /// (`recovered: false`): the client refetches.
    pub recover_max: usize,
    /// Events each instance keeps in memory (a resume inside them reads
    /// nothing from the broker).
    pub window_events: usize,
    /// The same window's bound in bytes.
    pub window_bytes: usize,
    /// Resumes reading the broker's log at once, per instance (a reconnect
    /// storm waits its turn rather than starve live delivery).
    pub max_log_reads: usize,
    /// Bytes a resume from the broker's log gathers at most before it
    /// answers; past it, `recovered: false`.
    pub recover_max_bytes: usize,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            history_max_age_s: 300,
            history_max_bytes: 1 << 30,
            recover_max: 10_000,
            window_events: 10_000,
            window_bytes: 32 << 20,
            max_log_reads: 8,
            recover_max_bytes: 16 << 20,
        }
    }
}

impl Events {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        for (name, value) in [
            ("history_max_age_s", self.history_max_age_s),
            ("history_max_bytes", self.history_max_bytes),
            ("recover_max", self.recover_max as u64),
            ("window_events", self.window_events as u64),
            ("window_bytes", self.window_bytes as u64),
            ("max_log_reads", self.max_log_reads as u64),
            ("recover_max_bytes", self.recover_max_bytes as u64),
        ] {
            if value == 0 {
                return Err(SettingsError::Invalid(format!(
                    "events.{name} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}
