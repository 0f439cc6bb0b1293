//! How much room the read buffer gets before a read: adaptive, so an idle connection's
//! heartbeat costs a small block and a busy one reads in large chunks.
//!
//! A fixed reservation (32 KiB whenever less than 8 KiB was spare) made every heartbeat on an
//! idle connection allocate 32 KiB, read 30 bytes into it and free it again once the connection
//! was quiet: 10,000 idle connections cycled a 32 KiB allocation each per interval, touching pages
//! all over the heap (a `Client` per connection held 19 KiB of resident memory for about 6 KiB
//! live). Instead the room starts at [`MIN_READ`], doubles after every read that fills it, up to
//! [`MAX_READ`], and returns to [`MIN_READ`] when a quiet connection gives its buffer back: a
//! heartbeat then takes a small block, which the allocator recycles from one to the next.
//! As hyper's adaptive read strategy, without shrinking on small reads: a busy connection's
//! buffer is reused in place, so its size only matters when it must be reallocated.

/// The room of a new or quiet connection's buffer: a heartbeat, a small answer.
pub(crate) const MIN_READ: usize = 512;
/// The most room one read asks for.
pub(crate) const MAX_READ: usize = 64 * 1024;

/// The room the next read needs (pure: the driver reserves it and reports each read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadSize {
    next: usize,
}

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize { next: MIN_READ }
    }
}

impl ReadSize {
    /// Spare capacity the buffer should have before the next read.
    pub(crate) fn want(self) -> usize {
        self.next
    }

    /// A read of `n` bytes into `room` bytes of spare capacity: one that filled it means more was
    /// waiting, so the next read gets twice the room.
    pub(crate) fn on_read(&mut self, n: usize, room: usize) {
        if n >= room {
            self.next = self.next.saturating_mul(2).min(MAX_READ);
        }
    }

    /// The connection gave its buffer back (quiet): start small again.
    pub(crate) fn reset(&mut self) {
        self.next = MIN_READ;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_reads_double_the_room_up_to_the_cap_and_a_reset_starts_small() {
        let mut r = ReadSize::default();
        assert_eq!(r.want(), MIN_READ);
        r.on_read(30, MIN_READ);
        assert_eq!(r.want(), MIN_READ, "a heartbeat does not grow the buffer");
        r.on_read(MIN_READ, MIN_READ);
        assert_eq!(r.want(), 2 * MIN_READ);
        for _ in 0..20 {
            let room = r.want();
            r.on_read(room, room);
        }
        assert_eq!(r.want(), MAX_READ);
        r.reset();
        assert_eq!(r.want(), MIN_READ);
    }

    proptest! {
        #[test]
        fn the_room_stays_within_its_bounds_and_never_shrinks_while_busy(
            reads in proptest::collection::vec((0usize..200_000, 1usize..200_000), 0..64)
        ) {
            let mut r = ReadSize::default();
            for (n, room) in reads {
                let before = r.want();
                r.on_read(n.min(room), room);
                prop_assert!(r.want() >= before);
                prop_assert!((MIN_READ..=MAX_READ).contains(&r.want()));
                prop_assert!(r.want().is_power_of_two());
            }
        }
    }
}
