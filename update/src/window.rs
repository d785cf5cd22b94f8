//! An update's window: the hours of the day (UTC) in which a box may reboot into it,
//! `HH:MM-HH:MM`, e.g. `02:00-04:00`; one that ends before it starts runs over midnight
//! (`22:00-02:00`). The box's clock decides, so a box whose clock is wrong reboots at
//! the wrong hour: the window is about disruption, not about trust.

use std::fmt;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight (UTC) of the start and the end.
    start: u32,
    end: u32,
}

fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl Window {
    pub fn parse(text: &str) -> Result<Window, Error> {
        let refuse = |why| Error::Window {
            text: text.to_owned(),
            why,
        };
        let bad = || refuse("is not HH:MM-HH:MM (UTC), e.g. 02:00-04:00");
        let (a, b) = text.trim().split_once('-').ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == end {
            return Err(refuse("is empty (it starts where it ends)"));
        }
        Ok(Window { start, end })
    }

    /// Whether the time `unix_secs` (seconds since the epoch) falls in the window.
    pub fn contains(&self, unix_secs: u64) -> bool {
        let now = ((unix_secs / 60) % (24 * 60)) as u32;
        if self.start < self.end {
            (self.start..self.end).contains(&now)
        } else {
            now >= self.start || now < self.end
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 20_000 * 86_400;

    fn at(h: u64, m: u64) -> u64 {
        DAY + h * 3600 + m * 60
    }

    #[test]
    fn a_window_holds_its_start_not_its_end_and_may_run_over_midnight() {
        let w = Window::parse("02:00-04:00").unwrap();
        assert_eq!(w.to_string(), "02:00-04:00");
        assert!(!w.contains(at(1, 59)));
        assert!(w.contains(at(2, 0)) && w.contains(at(3, 59)));
        assert!(!w.contains(at(4, 0)));
        let night = Window::parse("22:30-01:00").unwrap();
        assert!(night.contains(at(23, 0)) && night.contains(at(0, 30)));
        assert!(!night.contains(at(1, 0)) && !night.contains(at(12, 0)));
    }

    #[test]
    fn a_bad_window_is_refused_saying_what_a_window_is() {
        for bad in [
            "2:00-04:00",
            "02:00",
            "24:00-01:00",
            "02:60-03:00",
            "ab:cd-01:00",
            "",
        ] {
            let e = Window::parse(bad).unwrap_err().to_string();
            assert!(e.contains("HH:MM-HH:MM"), "{bad}: {e}");
        }
        let e = Window::parse("03:00-03:00").unwrap_err();
        assert!(matches!(e, Error::Window { .. }), "{e:?}");
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
