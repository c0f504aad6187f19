//! Ranks as threads: a rendezvous where each of `world` threads hands in a vector and gets
//! everyone's, in rank order (an all-gather), and the sum built on it (an all-reduce).

#![allow(dead_code)] // each test file uses a different subset

use std::sync::{Condvar, Mutex};

/// The meeting point of `world` rank threads; every rank calls it the same number of times.
pub struct Ranks<T> {
    world: usize,
    round: Mutex<Round<T>>,
    done: Condvar,
}

struct Round<T> {
    slots: Vec<Option<Vec<T>>>,
    generation: u64,
    all: Vec<Vec<T>>,
}

impl<T: Clone + Send> Ranks<T> {
    pub fn new(world: usize) -> Ranks<T> {
        let round = Round { slots: (0..world).map(|_| None).collect(), generation: 0, all: Vec::new() };
        Ranks { world, round: Mutex::new(round), done: Condvar::new() }
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Every rank's `mine`, in rank order, once all have arrived.
    pub fn all_gather(&self, rank: usize, mine: Vec<T>) -> Vec<Vec<T>> {
        let mut r = self.round.lock().unwrap();
        let generation = r.generation;
        assert!(r.slots[rank].is_none(), "rank {rank} arrived twice in one round");
        r.slots[rank] = Some(mine);
        if r.slots.iter().all(Option::is_some) {
            r.all = r.slots.iter_mut().map(|s| s.take().expect("every rank arrived")).collect();
            r.generation += 1;
            self.done.notify_all();
        } else {
            while r.generation == generation {
                r = self.done.wait(r).unwrap();
            }
        }
        r.all.clone()
    }
}

impl Ranks<f64> {
    /// Replaces `values` with their sums over the ranks (added in rank order).
    pub fn all_reduce(&self, rank: usize, values: &mut [f64]) {
        let all = self.all_gather(rank, values.to_vec());
        for (k, v) in values.iter_mut().enumerate() {
            *v = all
                .iter()
                .map(|r| {
                    assert_eq!(r.len(), all[0].len(), "ranks disagree on the length of a sum");
                    r[k]
                })
                .fold(0.0, |a, x| a + x);
        }
    }
}
