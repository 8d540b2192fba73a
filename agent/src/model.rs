//! Typed values the agent's layers share: the states and kinds that the API spells as
//! strings, parsed once at the edge or the catalog and compared as enums everywhere else.
//! Each has its API spelling (`as_str`, `parse`, `Display`); the catalog stores that
//! spelling ([`crate::catalog`] has the SQL conversions).

use serde::{Deserialize, Serialize};

/// Declares a string-named enum: variants with their API spelling.
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant),+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Its name, as the API and the catalog spell it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The value spelled `s`.
            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum! {
    /// Where a job is in its life.
    #[derive(Default)]
    JobState {
        /// Started and not ended.
        #[default]
        Running = "Running",
        /// Ended with its work done.
        Succeeded = "Succeeded",
        /// Ended with an error.
        Failed = "Failed",
        /// Ended by CancelJob, a delete or shutdown.
        Cancelled = "Cancelled",
    }
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        self != JobState::Running
    }
}

impl Serialize for JobState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for JobState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        JobState::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a job state")))
    }
}

named_enum! {
    /// A volume's role in its VM.
    VolumeKind {
        /// The boot volume (device 0).
        Root = "Root",
        /// Any other volume.
        Data = "Data",
    }
}

named_enum! {
    /// Whether a volume backup can be restored from a storage.
    BackupStatus {
        /// Committed and, as far as the store's verify knows, whole.
        Ready = "Ready",
        /// The store's verify found a chunk it names missing or bad.
        Damaged = "Damaged",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_by_its_name() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(*s));
        }
        for k in VolumeKind::ALL {
            assert_eq!(VolumeKind::parse(&k.to_string()), Some(*k));
        }
        for b in BackupStatus::ALL {
            assert_eq!(BackupStatus::parse(b.as_str()), Some(*b));
        }
        assert_eq!(JobState::parse("Paused"), None);
        assert_eq!(VolumeKind::parse("root"), None, "names are case-sensitive, as ZStack writes them");
    }
}
