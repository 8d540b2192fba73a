//! Retention policies: which backups a `keep-*` policy keeps, decided from their times
//! alone (pure: no clock, no I/O; the caller passes the candidates).
//!
//! The rules are restic's and borg's, applied to each VM's backups on one storage (its
//! series, named by the root volume) from the newest down, in UTC:
//!
//! | rule | keeps |
//! |---|---|
//! | `keep_last N` | the N newest backups |
//! | `keep_hourly N` | the newest backup of each of the N newest hours that have one |
//! | `keep_daily N` | the same per day |
//! | `keep_weekly N` | per ISO week (Monday to Sunday) |
//! | `keep_monthly N` | per calendar month |
//! | `keep_yearly N` | per calendar year |
//!
//! Each rule looks at every backup on its own; a backup any rule keeps is kept, with every
//! reason that kept it. A backup under a retention lock is always kept. A policy with no
//! rule is refused: it would delete everything.
//!
//! Example (one VM, backups at these times, `keep_last 1, keep_daily 2, keep_monthly 2`):
//!
//! | backup | time (UTC) | kept by |
//! |---|---|---|
//! | e | 2026-12-02 09:00 | last 1, daily 2026-12-02, monthly 2026-12 |
//! | d | 2026-12-02 01:00 | (removed: same day as e) |
//! | c | 2026-12-01 23:00 | daily 2026-12-01 |
//! | b | 2026-11-30 12:00 | monthly 2026-11 |
//! | a | 2026-11-15 12:00 | (removed) |

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// How many backups each rule keeps; 0 turns a rule off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// The newest N.
    pub last: u32,
    /// One per hour, for the newest N hours that have backups.
    pub hourly: u32,
    /// One per day.
    pub daily: u32,
    /// One per ISO week.
    pub weekly: u32,
    /// One per month.
    pub monthly: u32,
    /// One per year.
    pub yearly: u32,
}

impl Policy {
    /// Whether no rule keeps anything.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// A backup the policy decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id (the group uuid).
    pub id: String,
    /// The series it belongs to (its VM's root volume).
    pub series: String,
    /// When it was taken, Unix milliseconds.
    pub time: i64,
    /// Unix milliseconds until which it is locked against deletion, if it is.
    pub locked_until: Option<i64>,
}

/// What the policy says of one candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The candidate's id.
    pub id: String,
    /// The series.
    pub series: String,
    /// Its time.
    pub time: i64,
    /// Kept, or to be removed.
    pub keep: bool,
    /// Why it is kept (`last 1`, `daily 2026-12-02`, `locked until ...`); empty when removed.
    pub reasons: Vec<String>,
}

type Bucket = fn(&DateTime<Utc>) -> String;

fn rules(p: &Policy) -> [(&'static str, u32, Bucket); 5] {
    [
        ("hourly", p.hourly, |t| t.format("%Y-%m-%d %H:00").to_string()),
        ("daily", p.daily, |t| t.format("%Y-%m-%d").to_string()),
        ("weekly", p.weekly, |t| t.format("%G-W%V").to_string()),
        ("monthly", p.monthly, |t| t.format("%Y-%m").to_string()),
        ("yearly", p.yearly, |t| t.format("%Y").to_string()),
    ]
}

/// Decides on every candidate at `now` (Unix milliseconds, for locks); the result is
/// grouped by series and newest first within each.
pub fn decide(policy: &Policy, candidates: &[Candidate], now: i64) -> Vec<Decision> {
    let mut series: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
    for c in candidates {
        series.entry(c.series.as_str()).or_default().push(c);
    }
    let mut out = Vec::with_capacity(candidates.len());
    for (_, mut list) in series {
        list.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); list.len()];
        for (i, r) in reasons.iter_mut().enumerate().take(policy.last as usize) {
            r.push(format!("last {}", i + 1));
        }
        for (name, n, bucket) in rules(policy) {
            let mut seen = 0u32;
            let mut previous: Option<String> = None;
            for (i, c) in list.iter().enumerate() {
                if seen >= n {
                    break;
                }
                let Some(t) = DateTime::<Utc>::from_timestamp_millis(c.time) else { continue };
                let b = bucket(&t);
                if previous.as_deref() != Some(b.as_str()) {
                    reasons[i].push(format!("{name} {b}"));
                    seen += 1;
                    previous = Some(b);
                }
            }
        }
        for (c, mut why) in list.into_iter().zip(reasons) {
            if let Some(until) = c.locked_until.filter(|u| *u > now) {
                let at = DateTime::<Utc>::from_timestamp_millis(until).map(|t| t.to_rfc3339()).unwrap_or_default();
                why.push(format!("locked until {at}"));
            }
            out.push(Decision {
                id: c.id.clone(),
                series: c.series.clone(),
                time: c.time,
                keep: !why.is_empty(),
                reasons: why,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).expect("time").timestamp_millis()
    }

    fn c(id: &str, time: &str) -> Candidate {
        Candidate { id: id.into(), series: "vm".into(), time: at(time), locked_until: None }
    }

    fn kept(policy: &Policy, cs: &[Candidate]) -> Vec<String> {
        decide(policy, cs, at("2026-12-02T12:00:00Z")).into_iter().filter(|d| d.keep).map(|d| d.id).collect()
    }

    #[test]
    fn the_documented_example() {
        let cs = [
            c("a", "2026-11-15T12:00:00Z"),
            c("b", "2026-11-30T12:00:00Z"),
            c("c", "2026-12-01T23:00:00Z"),
            c("d", "2026-12-02T01:00:00Z"),
            c("e", "2026-12-02T09:00:00Z"),
        ];
        let p = Policy { last: 1, daily: 2, monthly: 2, ..Default::default() };
        let d = decide(&p, &cs, at("2026-12-02T12:00:00Z"));
        let reasons: Vec<(&str, Vec<&str>)> =
            d.iter().map(|d| (d.id.as_str(), d.reasons.iter().map(String::as_str).collect())).collect();
        assert_eq!(
            reasons,
            [
                ("e", vec!["last 1", "daily 2026-12-02", "monthly 2026-12"]),
                ("d", vec![]),
                ("c", vec!["daily 2026-12-01"]),
                ("b", vec!["monthly 2026-11"]),
                ("a", vec![]),
            ]
        );
    }

    #[test]
    fn a_month_of_dailies_under_a_grandfather_policy() {
        // One backup a day at 02:00 from 2026-10-01 to 2026-12-01 (62 days).
        let start = at("2026-10-01T02:00:00Z");
        let cs: Vec<Candidate> = (0..62)
            .map(|i| Candidate {
                id: format!("g{i:02}"),
                series: "vm".into(),
                time: start + i * 86_400_000,
                locked_until: None,
            })
            .collect();
        let p = Policy { daily: 7, weekly: 4, monthly: 3, ..Default::default() };
        let k = kept(&p, &cs);
        // 7 dailies: Nov 25 .. Dec 1 (g55..g61); weeklies: the newest of the ISO weeks
        // 2026-W49 (Dec 1, a Tuesday: g61), W48 (Sun Nov 29: g59), W47 (g52), W46 (g45);
        // monthlies: Dec 1 (g61), Nov 30 (g60), Oct 31 (g30).
        let mut want: Vec<String> = (55..62).map(|i| format!("g{i:02}")).collect();
        want.extend(["g52", "g45", "g30"].map(String::from));
        want.sort();
        want.reverse();
        assert_eq!(k, want);
    }

    #[test]
    fn series_are_separate_and_locks_keep() {
        let mut cs = vec![c("a1", "2026-12-01T00:00:00Z"), c("a2", "2026-12-02T00:00:00Z")];
        cs.push(Candidate {
            id: "b1".into(),
            series: "other".into(),
            time: at("2026-11-01T00:00:00Z"),
            locked_until: None,
        });
        cs.push(Candidate {
            id: "a0".into(),
            series: "vm".into(),
            time: at("2026-11-01T00:00:00Z"),
            locked_until: Some(at("2027-01-01T00:00:00Z")),
        });
        let p = Policy { last: 1, ..Default::default() };
        let d = decide(&p, &cs, at("2026-12-02T12:00:00Z"));
        let keep: Vec<(&str, bool)> = d.iter().map(|d| (d.id.as_str(), d.keep)).collect();
        assert_eq!(keep, [("b1", true), ("a2", true), ("a1", false), ("a0", true)]);
        assert!(d[3].reasons[0].starts_with("locked until 2027-01-01"), "{:?}", d[3]);
        // An expired lock keeps nothing.
        let later = decide(&p, &cs, at("2027-02-01T00:00:00Z"));
        assert!(!later.iter().find(|d| d.id == "a0").expect("a0").keep);
    }

    #[test]
    fn hourly_and_yearly_buckets() {
        let cs = [
            c("x1", "2025-06-01T10:05:00Z"),
            c("x2", "2026-12-02T10:10:00Z"),
            c("x3", "2026-12-02T10:50:00Z"),
            c("x4", "2026-12-02T11:00:00Z"),
        ];
        assert_eq!(kept(&Policy { hourly: 2, ..Default::default() }, &cs), ["x4", "x3"]);
        assert_eq!(kept(&Policy { yearly: 5, ..Default::default() }, &cs), ["x4", "x1"]);
        assert!(Policy::default().is_empty());
    }
}
