//! Values that many connections or clients hold equal copies of, kept once: a connection's
//! config, the TCP options it read back, its peer's settings, a `Client`'s config. A process with
//! 10 000 idle connections held 10 000 equal copies of each (issue 22: a few hundred bytes per
//! connection on each side).

use std::sync::{Arc, Mutex, Weak};

/// The most distinct values one interner keeps track of: past it, a new value is simply not
/// shared, so the look when a connection opens stays short whatever the process does.
const MAX_DISTINCT: usize = 64;

/// A table of the distinct values in use, each once. A value is shared while anything holds it;
/// once nothing does, it is forgotten.
#[derive(Debug)]
pub struct Interner<T> {
    values: Mutex<Vec<Weak<T>>>,
}

impl<T: PartialEq> Interner<T> {
    /// An empty table (usable in a `static`).
    pub const fn new() -> Self {
        Interner {
            values: Mutex::new(Vec::new()),
        }
    }

    /// `value`, or an equal one already in use.
    pub fn get(&self, value: T) -> Arc<T> {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.retain(|v| v.strong_count() > 0);
        if let Some(same) = values.iter().filter_map(Weak::upgrade).find(|v| **v == value) {
            return same;
        }
        let value = Arc::new(value);
        if values.len() < MAX_DISTINCT {
            values.push(Arc::downgrade(&value));
        }
        value
    }
}

impl<T: PartialEq> Default for Interner<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_are_shared_different_ones_kept_apart_and_the_table_stays_bounded() {
        let table = Interner::new();
        let a = table.get(vec![1u8, 2]);
        let b = table.get(vec![1u8, 2]);
        assert!(Arc::ptr_eq(&a, &b));
        let c = table.get(vec![3u8]);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(*c, vec![3u8]);
        // A value nothing holds is forgotten: an equal one later is made afresh.
        drop(c);
        let c2 = table.get(vec![3u8]);
        assert_eq!(*c2, vec![3u8]);
        assert_eq!(table.values.lock().unwrap().len(), 2);
        // Past the bound, values are still given, just not shared.
        let held: Vec<_> = (0..200u8).map(|i| table.get(vec![i, i, i])).collect();
        assert!(table.values.lock().unwrap().len() <= MAX_DISTINCT);
        assert!(held.iter().enumerate().all(|(i, v)| **v == vec![i as u8; 3]));
        let again = table.get(vec![199u8, 199, 199]);
        assert_eq!(*again, vec![199u8; 3]);
    }
}
