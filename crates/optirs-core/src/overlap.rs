//! The overlap check: no memory a step writes may be touched by any other array of the step,
//! so that the slices built from raw addresses never alias. It also remembers what the last
//! step that passed it wrote, to check the usual step (same parameters and state, new
//! gradients) faster.

use std::sync::{Mutex, PoisonError};

use crate::error::{CoreError, Location};
use crate::value_err;

/// Which array of a parameter a span is.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Param,
    Grad,
    State(&'static str),
}

/// One array's bytes, `[start, end)`, for the overlap check.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub writes: bool,
    pub role: Role,
    pub at: Location,
}

impl Span {
    fn label(&self) -> String {
        match self.role {
            Role::Param => self.at.param(),
            Role::Grad => self.at.grad(),
            Role::State(k) => self.at.state(k),
        }
    }

    fn arg(&self) -> String {
        match self.role {
            Role::Param => "param".to_owned(),
            Role::Grad => "grad".to_owned(),
            Role::State(k) => format!("state['{k}']"),
        }
    }
}

/// Refuses any overlap between an array the step writes and any other array it touches.
/// Gradients may share memory with each other: they are only read.
///
/// # Errors
/// `ValueError` naming both arrays, located at the second.
pub fn check_overlaps(spans: &[Span]) -> Result<(), CoreError> {
    // Sorting (start, index) pairs moves far less memory than sorting the spans themselves.
    let mut order: Vec<(usize, u32)> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.start, i as u32))
        .collect();
    order.sort_unstable();
    let mut furthest_any: Option<&Span> = None;
    let mut furthest_written: Option<&Span> = None;
    for &(_, i) in &order {
        let s = &spans[i as usize];
        let clash = if s.writes {
            furthest_any
        } else {
            furthest_written
        };
        if let Some(other) = clash.filter(|o| o.end > s.start) {
            let e: Result<(), CoreError> = value_err!(
                "{} and {} share memory (aliasing); every parameter and state buffer must \
                 be a separate array, and a gradient must not alias any of them",
                other.label(),
                s.label()
            );
            return e.map_err(|e| e.at(s.at).arg(&s.arg()));
        }
        if furthest_any.is_none_or(|o| s.end > o.end) {
            furthest_any = Some(s);
        }
        if s.writes && furthest_written.is_none_or(|o| s.end > o.end) {
            furthest_written = Some(s);
        }
    }
    Ok(())
}

/// What the last step that passed [`check_overlaps`] wrote: its written spans in the order it
/// listed them, and sorted by start.
struct Written {
    listed: Vec<(usize, usize)>,
    sorted: Vec<(usize, usize)>,
}

/// The overlap cache: process-wide, as steps of different optimizers alternate rarely.
static LAST_WRITTEN: Mutex<Option<Written>> = Mutex::new(None);

/// Whether `[start, end)` overlaps any of `sorted`: byte ranges sorted by start and disjoint.
#[must_use]
pub fn touches(sorted: &[(usize, usize)], start: usize, end: usize) -> bool {
    // Disjoint ranges sorted by start have their ends sorted too: the first one ending after
    // `start` is the only one that can overlap.
    let i = sorted.partition_point(|&(_, e)| e <= start);
    sorted.get(i).is_some_and(|&(s, _)| s < end)
}

/// [`check_overlaps`], sped up for the usual step: the same parameters and state as the step
/// before (so their spans are already known to be disjoint) and new gradients, each looked up
/// among the sorted written spans. Any other case, and any overlap found, goes through the
/// full check, which also words the error.
///
/// # Errors
/// As [`check_overlaps`].
pub fn check_overlaps_reusing(spans: &[Span]) -> Result<(), CoreError> {
    let listed: Vec<(usize, usize)> = spans
        .iter()
        .filter(|s| s.writes)
        .map(|s| (s.start, s.end))
        .collect();
    let mut last = LAST_WRITTEN.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(w) = last.as_ref().filter(|w| w.listed == listed) {
        let clear = spans
            .iter()
            .filter(|s| !s.writes)
            .all(|s| !touches(&w.sorted, s.start, s.end));
        if clear {
            return Ok(());
        }
    }
    check_overlaps(spans)?;
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    *last = Some(Written { listed, sorted });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, end: usize, writes: bool, flat: usize) -> Span {
        Span {
            start,
            end,
            writes,
            role: if writes { Role::Param } else { Role::Grad },
            at: Location {
                flat,
                group: 0,
                index: flat,
            },
        }
    }

    #[test]
    fn written_memory_touched_by_another_array_is_refused_and_located() {
        // Two gradients may share memory; a gradient inside a parameter may not.
        assert!(check_overlaps(&[
            span(0, 8, true, 0),
            span(8, 16, false, 0),
            span(8, 16, false, 1)
        ])
        .is_ok());
        let e = check_overlaps(&[span(0, 8, true, 0), span(4, 12, false, 1)]).unwrap_err();
        assert_eq!(e.at.map(|a| a.flat), Some(1));
        assert_eq!(e.arg.as_deref(), Some("grad"));
        assert!(e.message.contains("share memory"), "{}", e.message);
        assert!(touches(&[(0, 8), (16, 24)], 7, 9));
        assert!(!touches(&[(0, 8), (16, 24)], 8, 16));
    }
}
