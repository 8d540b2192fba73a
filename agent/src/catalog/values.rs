//! SQL conversions of the typed values the catalog stores: each is written as its API
//! spelling, and a stored text that names no value is an error naming the text, never a
//! silent default.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::model::{BackupStatus, JobState, VolumeKind};
use crate::volume::VolumeFormat;

macro_rules! text_value {
    ($($t:ty),+) => {$(
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                <$t>::parse(text).ok_or_else(|| {
                    FromSqlError::Other(format!("{text:?} is not a {}", stringify!($t)).into())
                })
            }
        }
    )+};
}

text_value!(JobState, VolumeKind, BackupStatus, VolumeFormat);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_sqlite_and_unknown_text_is_an_error() {
        let c = rusqlite::Connection::open_in_memory().expect("db");
        let back: JobState = c.query_row("SELECT ?1", [JobState::Cancelled], |r| r.get(0)).expect("state");
        assert_eq!(back, JobState::Cancelled);
        let back: VolumeFormat = c.query_row("SELECT ?1", [VolumeFormat::Qcow2], |r| r.get(0)).expect("format");
        assert_eq!(back, VolumeFormat::Qcow2);
        let bad = c.query_row("SELECT 'Paused'", [], |r| r.get::<_, JobState>(0)).expect_err("unknown");
        assert!(bad.to_string().contains("\"Paused\" is not a JobState"), "{bad}");
    }
}
