//! What the registry says about one service, and which endpoints the holder should have, as pure
//! logic: the watcher feeds it listings and watch batches, and applies its decisions.
//!
//! The one rule that is not a plain mirror of etcd is empty-push protection: an update that would
//! leave the client with no endpoint is held back (the endpoints it had are kept, and the holder's
//! own liveness keeps judging them) unless every one of them deregistered gracefully (announced
//! `leaving` before its key went). A lease that expired, a key deleted by hand, or a listing that
//! comes back empty after etcd lost its data do not empty the client.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use rpc_core::registry::{Instance, InstanceState};

/// One change seen in a watch batch (or a listing entry, as a `Put`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// `key` now holds `instance` (`None`: a value that is not an instance record, ignored).
    Put {
        /// The etcd key.
        key: String,
        /// Its decoded value.
        instance: Option<Instance>,
    },
    /// `key` was deleted (lease expired or revoked, or deleted by hand).
    Delete {
        /// The etcd key.
        key: String,
    },
}

/// What the holder should do after an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changed for the holder.
    Unchanged,
    /// Replace the endpoint set with these (sorted).
    Set(Vec<SocketAddr>),
    /// The update would leave no endpoint and not every endpoint left gracefully: keep these (the
    /// endpoints the holder had, but those that left gracefully), as the endpoint set.
    HeldBack(Vec<SocketAddr>),
}

/// The registry's view of one service.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    /// Every key under the service's prefix with a readable record, serving or leaving.
    instances: BTreeMap<String, Instance>,
    /// What the holder was last told to have.
    applied: BTreeSet<SocketAddr>,
    /// Endpoints that announced `leaving` and have not registered as serving since.
    left: BTreeSet<SocketAddr>,
    held_back: bool,
}

impl Directory {
    /// An empty directory (the holder has no endpoints yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoints the holder was told to have.
    pub fn applied(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.applied.iter().copied()
    }

    /// Registered instances (serving or leaving).
    pub fn instances(&self) -> usize {
        self.instances.len()
    }

    /// Whether the last decision held an emptying update back.
    pub fn held_back(&self) -> bool {
        self.held_back
    }

    /// A full listing (first, or after the watch was lost): replaces what was known. A key that
    /// disappeared while unwatched counts as gone without leaving, unless it had announced it.
    pub fn reset(&mut self, listing: impl IntoIterator<Item = (String, Option<Instance>)>) -> Decision {
        let old = std::mem::take(&mut self.instances);
        for (key, instance) in listing {
            self.record(key, instance);
        }
        for (key, gone) in old {
            if !self.instances.contains_key(&key) {
                self.forget(gone);
            }
        }
        self.decide()
    }

    /// One watch batch (one etcd revision; a transaction's changes arrive together and are
    /// decided on together).
    pub fn apply(&mut self, batch: impl IntoIterator<Item = Update>) -> Decision {
        for update in batch {
            match update {
                Update::Put { key, instance } => {
                    if let Some(old) = self.instances.remove(&key) {
                        if instance.as_ref().map(|i| i.addr) != Some(old.addr) {
                            self.forget(old);
                        }
                    }
                    self.record(key, instance);
                }
                Update::Delete { key } => {
                    if let Some(gone) = self.instances.remove(&key) {
                        self.forget(gone);
                    }
                }
            }
        }
        self.decide()
    }

    fn record(&mut self, key: String, instance: Option<Instance>) {
        let Some(instance) = instance else { return };
        match instance.state {
            InstanceState::Leaving => self.left.insert(instance.addr),
            InstanceState::Serving => self.left.remove(&instance.addr),
        };
        self.instances.insert(key, instance);
    }

    /// `gone`'s key went: a leaving instance stays marked as having left; any other did not leave
    /// gracefully.
    fn forget(&mut self, gone: Instance) {
        if gone.state == InstanceState::Serving {
            self.left.remove(&gone.addr);
        }
    }

    fn decide(&mut self) -> Decision {
        let serving: BTreeSet<SocketAddr> = self
            .instances
            .values()
            .filter(|i| i.state == InstanceState::Serving)
            .map(|i| i.addr)
            .collect();
        if serving.is_empty() && !self.applied.is_empty() && !self.applied.iter().all(|a| self.left.contains(a)) {
            // Those that did leave gracefully go; the rest are kept.
            let left = &self.left;
            self.applied.retain(|a| !left.contains(a));
            self.held_back = true;
            return Decision::HeldBack(self.applied.iter().copied().collect());
        }
        self.held_back = false;
        if serving == self.applied {
            return Decision::Unchanged;
        }
        self.applied = serving;
        Decision::Set(self.applied.iter().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 7000))
    }

    fn key(i: u8) -> String {
        format!("/t/s/{}", addr(i))
    }

    fn put(i: u8, state: InstanceState) -> Update {
        let mut instance = Instance::new(addr(i));
        instance.state = state;
        Update::Put {
            key: key(i),
            instance: Some(instance),
        }
    }

    fn del(i: u8) -> Update {
        Update::Delete { key: key(i) }
    }

    #[test]
    fn instances_come_and_go_with_their_keys() {
        let mut d = Directory::new();
        assert_eq!(
            d.apply([put(1, InstanceState::Serving), put(2, InstanceState::Serving)]),
            Decision::Set(vec![addr(1), addr(2)])
        );
        assert_eq!(d.apply([put(2, InstanceState::Serving)]), Decision::Unchanged);
        assert_eq!(d.apply([del(1)]), Decision::Set(vec![addr(2)]));
        // Leaving drops it from the endpoints at once, before its key goes.
        assert_eq!(
            d.apply([put(3, InstanceState::Serving)]),
            Decision::Set(vec![addr(2), addr(3)])
        );
        assert_eq!(d.apply([put(3, InstanceState::Leaving)]), Decision::Set(vec![addr(2)]));
        assert_eq!(d.apply([del(3)]), Decision::Unchanged);
    }

    #[test]
    fn the_last_endpoint_vanishing_is_held_back_until_another_registers() {
        let mut d = Directory::new();
        d.apply([put(1, InstanceState::Serving)]);
        assert_eq!(d.apply([del(1)]), Decision::HeldBack(vec![addr(1)]));
        assert!(d.held_back());
        assert_eq!(d.applied().collect::<Vec<_>>(), vec![addr(1)]);
        // An empty listing after etcd lost its data: still held back.
        assert_eq!(d.reset([]), Decision::HeldBack(vec![addr(1)]));
        assert_eq!(d.apply([put(2, InstanceState::Serving)]), Decision::Set(vec![addr(2)]));
        assert!(!d.held_back());
    }

    #[test]
    fn held_back_keeps_only_those_that_did_not_leave() {
        let mut d = Directory::new();
        d.apply([put(1, InstanceState::Serving), put(2, InstanceState::Serving)]);
        assert_eq!(
            d.apply([put(1, InstanceState::Leaving), del(2)]),
            Decision::HeldBack(vec![addr(2)])
        );
    }

    #[test]
    fn every_instance_deregistering_gracefully_empties_the_service() {
        let mut d = Directory::new();
        d.apply([put(1, InstanceState::Serving), put(2, InstanceState::Serving)]);
        d.apply([put(1, InstanceState::Leaving)]);
        d.apply([del(1)]);
        assert_eq!(d.apply([put(2, InstanceState::Leaving), del(2)]), Decision::Set(vec![]));
        // But if the last one vanished without leaving, the service is not emptied.
        let mut d = Directory::new();
        d.apply([put(1, InstanceState::Serving), put(2, InstanceState::Serving)]);
        d.apply([put(1, InstanceState::Leaving), del(1)]);
        assert_eq!(d.apply([del(2)]), Decision::HeldBack(vec![addr(2)]));
    }

    #[test]
    fn an_unreadable_value_is_no_instance() {
        let mut d = Directory::new();
        d.apply([put(1, InstanceState::Serving)]);
        let garbage = Update::Put {
            key: key(2),
            instance: None,
        };
        assert_eq!(d.apply([garbage]), Decision::Unchanged);
        assert_eq!(d.instances(), 1);
    }

    #[test]
    fn an_instance_that_left_and_came_back_counts_as_serving_again() {
        let mut d = Directory::new();
        d.apply([put(1, InstanceState::Serving)]);
        d.apply([put(1, InstanceState::Leaving), del(1)]);
        assert_eq!(d.apply([put(1, InstanceState::Serving)]), Decision::Set(vec![addr(1)]));
        // Its key vanishing this time is not a graceful leave.
        assert_eq!(d.apply([del(1)]), Decision::HeldBack(vec![addr(1)]));
    }

    fn update() -> impl Strategy<Value = Update> {
        (0u8..4, 0u8..4).prop_map(|(i, op)| match op {
            0 => put(i, InstanceState::Serving),
            1 => put(i, InstanceState::Leaving),
            2 => del(i),
            _ => Update::Put {
                key: key(i),
                instance: None,
            },
        })
    }

    /// What an observer of the registry can know, kept independently of `Directory`: the keys it
    /// has seen, and which addresses were last seen leaving (announced, or gone while leaving).
    #[derive(Default)]
    struct Observer {
        seen: BTreeMap<String, (SocketAddr, InstanceState)>,
        left: BTreeSet<SocketAddr>,
    }

    impl Observer {
        fn put(&mut self, key: &str, addr: SocketAddr, state: InstanceState) {
            if let Some((old, s)) = self.seen.insert(key.to_string(), (addr, state)) {
                if old != addr && s == InstanceState::Serving {
                    self.left.remove(&old);
                }
            }
            match state {
                InstanceState::Leaving => self.left.insert(addr),
                InstanceState::Serving => self.left.remove(&addr),
            };
        }

        fn gone(&mut self, key: &str) {
            if let Some((addr, InstanceState::Serving)) = self.seen.remove(key) {
                self.left.remove(&addr);
            }
        }

        fn serving(&self) -> BTreeSet<SocketAddr> {
            self.seen
                .values()
                .filter(|(_, s)| *s == InstanceState::Serving)
                .map(|(a, _)| *a)
                .collect()
        }
    }

    /// The registry after `updates`: key -> (addr, state); an unreadable value is no instance.
    fn evolve(truth: &mut BTreeMap<String, (SocketAddr, InstanceState)>, updates: &[Update]) {
        for u in updates {
            match u {
                Update::Put { key, instance: Some(i) } => {
                    truth.insert(key.clone(), (i.addr, i.state));
                }
                Update::Put { key, instance: None } | Update::Delete { key } => {
                    truth.remove(key);
                }
            }
        }
    }

    fn listing(truth: &BTreeMap<String, (SocketAddr, InstanceState)>) -> Vec<(String, Option<Instance>)> {
        truth
            .iter()
            .map(|(k, (a, s))| {
                let mut i = Instance::new(*a);
                i.state = *s;
                (k.clone(), Some(i))
            })
            .collect()
    }

    proptest! {
        /// Whatever the registry does, seen batch by batch or missed and relisted (a watch lost,
        /// a compaction): unless held back, the holder has exactly the serving instances; the
        /// holder is emptied only when every endpoint it had was last seen leaving; held back, it
        /// keeps those it had that did not leave; and a relisting of the same keys decides
        /// nothing new.
        #[test]
        fn the_holder_mirrors_serving_instances_and_is_never_emptied_by_a_vanishing(
            steps in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec(update(), 1..4)), 1..30)
        ) {
            let mut d = Directory::new();
            let mut truth: BTreeMap<String, (SocketAddr, InstanceState)> = BTreeMap::new();
            let mut observer = Observer::default();
            for (missed, batch) in steps {
                let before: BTreeSet<SocketAddr> = d.applied().collect();
                evolve(&mut truth, &batch);
                let decision = if missed {
                    // Unseen: the watcher lists again.
                    let gone: Vec<String> = observer.seen.keys().filter(|k| !truth.contains_key(*k)).cloned().collect();
                    for k in gone {
                        observer.gone(&k);
                    }
                    for (k, (a, s)) in &truth {
                        observer.put(k, *a, *s);
                    }
                    d.reset(listing(&truth))
                } else {
                    for u in &batch {
                        match u {
                            Update::Put { key, instance: Some(i) } => observer.put(key, i.addr, i.state),
                            Update::Put { key, instance: None } | Update::Delete { key } => observer.gone(key),
                        }
                    }
                    d.apply(batch)
                };
                let serving = observer.serving();
                let after: BTreeSet<SocketAddr> = d.applied().collect();
                if d.held_back() {
                    prop_assert!(serving.is_empty());
                    let kept: BTreeSet<SocketAddr> = before.difference(&observer.left).copied().collect();
                    prop_assert_eq!(&after, &kept);
                    prop_assert!(!after.is_empty());
                    prop_assert_eq!(decision, Decision::HeldBack(after.iter().copied().collect()));
                } else {
                    prop_assert_eq!(&after, &serving);
                    if after.is_empty() && !before.is_empty() {
                        prop_assert!(before.iter().all(|a| observer.left.contains(a)), "emptied, but not all left: {:?}", before);
                    }
                    match decision {
                        Decision::Unchanged => prop_assert_eq!(&before, &after),
                        Decision::Set(s) => prop_assert_eq!(s, after.iter().copied().collect::<Vec<_>>()),
                        Decision::HeldBack(_) => prop_assert!(false, "held back but not marked"),
                    }
                }
                let mut relisted = d.clone();
                let again = relisted.reset(listing(&truth));
                prop_assert!(matches!(again, Decision::Unchanged | Decision::HeldBack(_)), "{:?}", again);
                prop_assert_eq!(relisted.applied().collect::<Vec<_>>(), d.applied().collect::<Vec<_>>());
            }
        }
    }
}
