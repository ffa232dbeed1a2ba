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
    #[error("window {window} reaches back {reach}, further than the {kept} the rankings keep (--bucket-ttl-secs {kept_secs}): ask for a shorter window, or keep buckets longer")]
    TooLong {
        /// The window asked for.
        window: Window,
        /// How far back it reads (twice the window for rising terms).
        reach: Window,
        /// The retention, as a window.
        kept: Window,
        /// The retention in seconds.
        kept_secs: u64,
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
    /// kept under `bucket_ttl_secs`.
    pub fn check(self, times: u32, bucket_ttl_secs: u64) -> Result<Self, WindowError> {
        let Some(minutes) = self.minutes() else {
            return Ok(self);
        };
        let kept = u32::try_from(bucket_ttl_secs / 60).unwrap_or(u32::MAX);
        let reach = minutes.saturating_mul(times);
        if reach > kept {
            return Err(WindowError::TooLong {
                window: self,
                reach: Self::Last { minutes: reach },
                kept: Self::Last { minutes: kept },
                kept_secs: bucket_ttl_secs,
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
                 (--bucket-ttl-secs 172800): ask for a shorter window, or keep buckets longer"
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
    fn the_current_minute_counts_as_far_as_it_has_run() {
        // 30 s into the current minute of a 2-minute window: 1.5 of 2.
        assert!((last(2).elapsed_share(NOW) - 0.75).abs() < 1e-9);
        assert_eq!(last(15).start_ms(NOW), Some(NOW - 30_000 - 14 * 60_000));
    }
}
