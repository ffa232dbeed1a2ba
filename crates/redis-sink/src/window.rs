//! Which buckets make up a reader's window (pure).
//!
//! A window of W minutes is the last W UTC minutes, the current one
//! included (so it holds between W − 1 and W minutes of events): at 10:02:30
//! a 15-minute window is 09:48:00–10:02:30. It is read as the union of
//! whole hours inside it plus minute buckets for the ragged ends, so a
//! 24-hour window reads at most 59 + 23 + 60 keys, not 1,440. The current
//! hour is always read by minutes: its hour bucket may already hold events
//! stamped a few minutes ahead (`--max-future-skew-secs`), which belong to
//! no window yet.

use std::fmt;
use std::str::FromStr;

use crate::keys::{Bucket, MS_PER_MINUTE};

/// A span of rankings a reader asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// The all-time ranking.
    AllTime,
    /// The last `minutes` minutes, the current one included.
    Last {
        /// At least 1.
        minutes: u32,
    },
}

/// What a window needs that the rankings do not keep.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Not `all`, `<n>m`, `<n>h` or `<n>d`.
    #[error("window {0:?} is not a duration: give `all` or a number of minutes, hours or days, such as 5m, 15m, 1h, 24h or 2d")]
    Unreadable(String),
    /// Reaches past the buckets' retention.
    #[error("window {window} reaches back {reach}, further than the {kept} the rankings keep (redis-sink --bucket-ttl-secs): ask for a shorter window, or keep buckets longer")]
    TooLong {
        /// The window asked for.
        window: Window,
        /// How far back it reads (twice the window for rising terms).
        reach: Window,
        /// The retention, as a window.
        kept: Window,
    },
}

impl Window {
    /// How far back reading this window goes, in minutes (`None`: all time).
    fn minutes(self) -> Option<u32> {
        match self {
            Self::AllTime => None,
            Self::Last { minutes } => Some(minutes),
        }
    }

    /// Refuses a window whose oldest minute (`times` windows back: 2 for
    /// rising terms, which compare with the window before) is no longer
    /// kept: buckets are kept `kept_secs` ([`Recorded::kept_secs`]).
    pub fn check(self, times: u32, kept_secs: u64) -> Result<Self, WindowError> {
        let Some(minutes) = self.minutes() else {
            return Ok(self);
        };
        let kept = u32::try_from(kept_secs / 60).unwrap_or(u32::MAX);
        let reach = minutes.saturating_mul(times);
        if reach > kept {
            return Err(WindowError::TooLong {
                window: self,
                reach: Self::Last { minutes: reach },
                kept: Self::Last { minutes: kept },
            });
        }
        Ok(self)
    }

    /// The buckets holding this window's events at `now_ms` (`None`: all
    /// time, which is one key). `back` windows earlier: 0 for the window
    /// itself, 1 for the one before it.
    pub fn buckets(self, now_ms: i64, back: u32) -> Option<Vec<Bucket>> {
        let minutes = i64::from(self.minutes()?);
        let current = now_ms.div_euclid(MS_PER_MINUTE);
        let last = current - minutes * i64::from(back);
        Some(cover(last - minutes + 1, last))
    }

    /// The share of the window's span that has elapsed at `now_ms`: the
    /// current minute counts only as far as it has run.
    pub fn elapsed_share(self, now_ms: i64) -> f64 {
        let Some(minutes) = self.minutes() else {
            return 1.0;
        };
        let into_minute = now_ms.rem_euclid(MS_PER_MINUTE) as f64 / MS_PER_MINUTE as f64;
        (f64::from(minutes) - 1.0 + into_minute) / f64::from(minutes)
    }

    /// When the window starts at `now_ms`, ms since the epoch (`None`: all
    /// time).
    pub fn start_ms(self, now_ms: i64) -> Option<i64> {
        let minutes = i64::from(self.minutes()?);
        Some((now_ms.div_euclid(MS_PER_MINUTE) - minutes + 1) * MS_PER_MINUTE)
    }
}

/// Minutes `first..=last` as whole hours where they cover one, minutes
/// elsewhere.
fn cover(first: i64, last: i64) -> Vec<Bucket> {
    let mut buckets = Vec::new();
    let mut minute = first;
    while minute <= last {
        // `+ 60 <= last`, not `+ 59`: the hour holding `last` (the current
        // one for the window itself) is read by minutes.
        if minute.rem_euclid(60) == 0 && minute + 60 <= last {
            buckets.push(Bucket::Hour(minute.div_euclid(60)));
            minute += 60;
        } else {
            buckets.push(Bucket::Minute(minute));
            minute += 1;
        }
    }
    buckets
}

/// What the writers recorded of their bucket retention
/// ([`crate::keys::Keys::settings`]): the current `--bucket-ttl-secs`, and
/// since a change, what the buckets written before it are kept for.
/// Expiries are absolute, so after a change the longest readable window
/// moves from the old retention to the new one as the old buckets age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// `--bucket-ttl-secs` of the writers now.
    pub ttl_secs: u64,
    /// Before the last change: how long every bucket written until then is
    /// kept, at least (`None`: no change recorded).
    pub previous_secs: Option<u64>,
    /// When the last change was recorded, ms since the epoch.
    pub since_ms: Option<i64>,
}

impl Recorded {
    /// The longest window every bucket of which is still kept at `now_ms`:
    /// once the change is older than the new retention, the new retention;
    /// before, the buckets written since the change (all younger than it)
    /// and those from before it (kept `previous_secs`) cover the longer of
    /// the two.
    pub fn kept_secs(&self, now_ms: i64) -> u64 {
        let (Some(previous), Some(since)) = (self.previous_secs, self.since_ms) else {
            return self.ttl_secs;
        };
        let elapsed = u64::try_from(now_ms.saturating_sub(since) / 1000).unwrap_or(0);
        if elapsed > self.ttl_secs {
            self.ttl_secs
        } else {
            elapsed.max(previous)
        }
    }

    /// The record once a writer with `ttl_secs` starts at `now_ms`, after
    /// `before`. The buckets written until now are kept at least as long
    /// as both the window readable now and the retention they were written
    /// with.
    pub fn changed_to(before: Option<Self>, ttl_secs: u64, now_ms: i64) -> Self {
        match before {
            Some(before) if before.ttl_secs == ttl_secs => before,
            Some(before) => Self {
                ttl_secs,
                previous_secs: Some(before.kept_secs(now_ms).min(before.ttl_secs)),
                since_ms: Some(now_ms),
            },
            // The first record: the buckets before it (an older redis-sink)
            // are taken as kept as long.
            None => Self {
                ttl_secs,
                previous_secs: None,
                since_ms: None,
            },
        }
    }
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unreadable = || WindowError::Unreadable(text.to_owned());
        if text == "all" {
            return Ok(Self::AllTime);
        }
        // By suffix, not by byte index: a multi-byte last character
        // (`5분`) must be refused, not split inside.
        let (number, per_unit) = [('m', 1_u32), ('h', 60), ('d', 1_440)]
            .into_iter()
            .find_map(|(unit, minutes)| Some((text.strip_suffix(unit)?, minutes)))
            .ok_or_else(unreadable)?;
        // Digits only: `u32::from_str` would also take `+5`.
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(unreadable());
        }
        let count: u32 = number.parse().map_err(|_| unreadable())?;
        let minutes = count.checked_mul(per_unit).ok_or_else(unreadable)?;
        if minutes == 0 {
            return Err(unreadable());
        }
        Ok(Self::Last { minutes })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::AllTime => f.write_str("all"),
            Self::Last { minutes } if minutes % 1_440 == 0 => write!(f, "{}d", minutes / 1_440),
            Self::Last { minutes } if minutes % 60 == 0 => write!(f, "{}h", minutes / 60),
            Self::Last { minutes } => write!(f, "{minutes}m"),
        }
    }
}

impl serde::Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-05-01T10:02:30Z
    const NOW: i64 = 1_714_557_750_000;
    const MINUTE_10_00: i64 = 1_714_557_600_000 / MS_PER_MINUTE;

    fn last(minutes: u32) -> Window {
        Window::Last { minutes }
    }

    #[test]
    fn a_short_window_is_its_minutes() {
        assert_eq!(
            last(3).buckets(NOW, 0),
            Some(vec![
                Bucket::Minute(MINUTE_10_00),
                Bucket::Minute(MINUTE_10_00 + 1),
                Bucket::Minute(MINUTE_10_00 + 2),
            ])
        );
        // The window before it: 09:57–09:59.
        assert_eq!(
            last(3).buckets(NOW, 1),
            Some(vec![
                Bucket::Minute(MINUTE_10_00 - 3),
                Bucket::Minute(MINUTE_10_00 - 2),
                Bucket::Minute(MINUTE_10_00 - 1),
            ])
        );
        assert_eq!(Window::AllTime.buckets(NOW, 0), None);
    }

    #[test]
    fn a_long_window_reads_whole_hours_and_ragged_minutes() {
        // 3 h at 10:02:30: 07:03–07:59 by minutes, hours 08 and 09, then
        // 10:00–10:02 by minutes (the current hour).
        let buckets = last(180).buckets(NOW, 0).unwrap_or_default();
        let hour_09 = MINUTE_10_00 / 60 - 1;
        let mut want: Vec<Bucket> = (MINUTE_10_00 - 177..MINUTE_10_00 - 120)
            .map(Bucket::Minute)
            .collect();
        want.extend([Bucket::Hour(hour_09 - 1), Bucket::Hour(hour_09)]);
        want.extend((MINUTE_10_00..=MINUTE_10_00 + 2).map(Bucket::Minute));
        assert_eq!(buckets, want);
        // Every minute of the window exactly once.
        let minutes: i64 = buckets
            .iter()
            .map(|b| match b {
                Bucket::Hour(_) => 60,
                Bucket::Minute(_) => 1,
            })
            .sum();
        assert_eq!(minutes, 180);
    }

    #[test]
    fn windows_are_checked_against_retention() {
        assert_eq!(last(2_880).check(1, 172_800), Ok(last(2_880)));
        assert_eq!(last(1_440).check(2, 172_800), Ok(last(1_440)));
        let err = last(1_441).check(2, 172_800).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "window 1441m reaches back 2882m, further than the 2d the rankings keep \
                 (redis-sink --bucket-ttl-secs): ask for a shorter window, or keep buckets longer"
            )
        );
        assert_eq!(Window::AllTime.check(2, 3_600), Ok(Window::AllTime));
    }

    #[test]
    fn windows_parse_and_print() {
        for (text, minutes) in [
            ("1m", 1),
            ("15m", 15),
            ("1h", 60),
            ("90m", 90),
            ("2d", 2_880),
        ] {
            assert_eq!(text.parse(), Ok(last(minutes)), "{text}");
            assert_eq!(last(minutes).to_string(), text);
        }
        assert_eq!("all".parse(), Ok(Window::AllTime));
        for bad in [
            "",
            "0m",
            "m",
            "15",
            "1w",
            "-1h",
            "+5m",
            "1.5h",
            "99999999d",
            "5분",
            "é",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_longer_retention_is_readable_as_the_old_buckets_age() {
        const H: u64 = 3_600;
        let ms = |secs: u64| i64::try_from(secs * 1000).unwrap_or(0);
        let two_hours = Recorded::changed_to(None, 2 * H, 0);
        assert_eq!(two_hours.kept_secs(ms(100 * H)), 2 * H);
        // Raised to 48 h at t: the buckets before t expire 2 h after their end.
        let t = ms(100 * H);
        let raised = Recorded::changed_to(Some(two_hours), 48 * H, t);
        assert_eq!(raised.kept_secs(t + ms(H)), 2 * H);
        assert_eq!(raised.kept_secs(t + ms(5 * H)), 5 * H);
        assert_eq!(raised.kept_secs(t + ms(49 * H)), 48 * H);
        // Lowered to 2 h: the old buckets still cover 48 h until the new
        // ones are older than 2 h.
        let lowered = Recorded::changed_to(Some(raised), 2 * H, t + ms(60 * H));
        assert_eq!(lowered.kept_secs(t + ms(61 * H)), 48 * H);
        assert_eq!(lowered.kept_secs(t + ms(63 * H)), 2 * H);
        // Raised again an hour after lowering: the buckets of that hour
        // are kept only 2 h, so only what was readable and at most 2 h.
        let again = Recorded::changed_to(Some(lowered), 24 * H, t + ms(61 * H));
        assert_eq!(again.kept_secs(t + ms(66 * H)), 5 * H);
        assert_eq!(again.kept_secs(t + ms(62 * H)), 2 * H);
    }

    #[test]
    fn the_current_minute_counts_as_far_as_it_has_run() {
        // 30 s into the current minute of a 2-minute window: 1.5 of 2.
        assert!((last(2).elapsed_share(NOW) - 0.75).abs() < 1e-9);
        assert_eq!(last(15).start_ms(NOW), Some(NOW - 30_000 - 14 * 60_000));
    }
}
