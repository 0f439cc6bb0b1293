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
    /// The room a read wants (what [`ReadSize::reserve`] reserves when little is spare).
    #[cfg(test)]
    pub(crate) fn want(self) -> usize {
        self.next
    }

    /// How much to reserve before a read with `spare` bytes of room left: the room wanted when
    /// less than a quarter of it is spare, else nothing (the read goes into what is spare). A
    /// buffer whose frames were split off as payloads still in use cannot be reclaimed in place,
    /// so every reserve allocates: reserving whenever less than the whole room was spare made
    /// each read of a busy connection allocate and copy (half the throughput at 16 KiB payloads).
    pub(crate) fn reserve(self, spare: usize) -> Option<usize> {
        (spare < self.next / 4).then_some(self.next)
    }

    /// A read of `n` bytes into `room` bytes of spare capacity: one that filled it, or brought at
    /// least the room wanted (into a larger spare), means more was waiting, so the next read gets
    /// twice the room.
    pub(crate) fn on_read(&mut self, n: usize, room: usize) {
        if n >= room.min(self.next) {
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

    #[test]
    fn a_read_goes_into_what_is_spare_until_less_than_a_quarter_of_the_room_is() {
        let mut r = ReadSize::default();
        for _ in 0..20 {
            let room = r.want();
            r.on_read(room, room);
        }
        assert_eq!(r.reserve(MAX_READ / 2), None, "half the room spare: no new allocation");
        assert_eq!(r.reserve(MAX_READ / 4), None);
        assert_eq!(r.reserve(MAX_READ / 4 - 1), Some(MAX_READ));
        assert_eq!(
            ReadSize::default().reserve(0),
            Some(MIN_READ),
            "an empty buffer gets its room"
        );
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
