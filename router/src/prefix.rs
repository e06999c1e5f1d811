//! Prefix affinity: which replica likely holds a prompt's leading blocks in its KV
//! cache.
//!
//! The router does not tokenize. As the Gateway API Inference Extension's prefix-cache
//! scorer does (the one llm-d's endpoint picker uses), it cuts the rendered prompt into
//! fixed-size blocks of bytes and hashes each block chained over the ones before it (and
//! the model), so a block hash stands for the whole prefix up to it. Each replica keeps
//! the hashes of the prompts the router sent it, least recently used dropped first; the
//! number of a request's leading blocks a replica holds is its prefix match. A replica's
//! real cache may have evicted them: the index is an estimate, kept honest by the load
//! bound in `pick`.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Bytes per block. About 16 tokens of English text: the granularity a prompt's cached
/// prefix is reused at in the worker's block pool.
pub const BLOCK_BYTES: usize = 64;
/// Leading blocks hashed per request (16 KiB of prompt), as GIE's `maxPrefixBlocksToMatch`:
/// a longer prompt's tail rarely decides where it goes.
pub const MAX_BLOCKS: usize = 256;
/// Block hashes remembered per replica.
pub const PER_REPLICA: usize = 32_768;

/// The chained hashes of `prompt`'s full leading blocks (a final partial block is not a
/// cacheable block and is left out).
pub fn blocks(model: &str, prompt: &str) -> Vec<u64> {
    let mut prev = {
        let mut h = DefaultHasher::new();
        model.hash(&mut h);
        h.finish()
    };
    prompt
        .as_bytes()
        .chunks_exact(BLOCK_BYTES)
        .take(MAX_BLOCKS)
        .map(|chunk| {
            let mut h = DefaultHasher::new();
            prev.hash(&mut h);
            chunk.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

/// The block hashes one replica was sent, least recently used dropped first.
#[derive(Debug, Default)]
struct Lru {
    /// Hash → the tick it was last used at.
    last: HashMap<u64, u64>,
    /// Uses in order; an entry whose tick is not `last`'s is stale.
    order: VecDeque<(u64, u64)>,
}

impl Lru {
    fn touch(&mut self, hash: u64, tick: u64, capacity: usize) {
        self.last.insert(hash, tick);
        self.order.push_back((hash, tick));
        while self.last.len() > capacity {
            let Some((h, t)) = self.order.pop_front() else {
                break;
            };
            if self.last.get(&h) == Some(&t) {
                self.last.remove(&h);
            }
        }
        // Stale entries are dropped as they reach the front; keep the queue bounded
        // when one hot prefix is touched over and over.
        if self.order.len() > 4 * capacity.max(1) {
            self.order.retain(|(h, t)| self.last.get(h) == Some(t));
        }
    }
}

/// Per replica, the prompt blocks the router sent it.
#[derive(Debug)]
pub struct Index {
    replicas: HashMap<String, Lru>,
    capacity: usize,
    tick: u64,
}

impl Default for Index {
    fn default() -> Self {
        Index::new(PER_REPLICA)
    }
}

impl Index {
    /// An index keeping `capacity` blocks per replica.
    pub fn new(capacity: usize) -> Index {
        Index {
            replicas: HashMap::new(),
            capacity,
            tick: 0,
        }
    }

    /// How many of `blocks`' leading blocks `replica` was sent.
    pub fn matched(&self, replica: &str, blocks: &[u64]) -> usize {
        let Some(lru) = self.replicas.get(replica) else {
            return 0;
        };
        blocks
            .iter()
            .take_while(|b| lru.last.contains_key(b))
            .count()
    }

    /// Records that `replica` was sent `blocks`.
    pub fn record(&mut self, replica: &str, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        self.tick += 1;
        let lru = self.replicas.entry(replica.to_string()).or_default();
        for &b in blocks {
            lru.touch(b, self.tick, self.capacity);
        }
    }

    /// Forgets replicas not in `live` (gone pods).
    pub fn retain(&mut self, live: &dyn Fn(&str) -> bool) {
        self.replicas.retain(|r, _| live(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_stands_for_the_whole_prefix_before_it() {
        let a = blocks("m", &"x".repeat(64 * 3));
        let b = blocks("m", &format!("{}{}", "y".repeat(64), "x".repeat(64 * 2)));
        assert_eq!(a.len(), 3);
        // Same second and third block text, different first block: no hash in common.
        assert!(a.iter().all(|h| !b.contains(h)));
        // Another model never shares a block.
        assert!(blocks("n", &"x".repeat(64 * 3))
            .iter()
            .all(|h| !a.contains(h)));
        // A partial block is not hashed.
        assert_eq!(blocks("m", &"x".repeat(64 * 3 + 63)), a);
    }

    #[test]
    fn the_match_is_the_leading_run_and_old_blocks_are_evicted() {
        let mut idx = Index::new(4);
        let sys = "s".repeat(64 * 2);
        let one = blocks("m", &format!("{sys}{}", "a".repeat(64)));
        let two = blocks("m", &format!("{sys}{}", "b".repeat(64)));
        idx.record("r1", &one);
        assert_eq!(idx.matched("r1", &two), 2, "the shared system prompt");
        assert_eq!(idx.matched("r1", &one), 3);
        assert_eq!(idx.matched("r2", &one), 0);
        // Two more blocks overflow the 4-block LRU: the oldest (used once, with `one`)
        // go first, so `one`'s last block is gone while the re-touched prefix stays.
        idx.record("r1", &two);
        let three = blocks("m", &format!("{sys}{}", "c".repeat(64)));
        idx.record("r1", &three);
        assert_eq!(idx.matched("r1", &three), 3);
        assert_eq!(idx.matched("r1", &one), 2);
        idx.retain(&|r| r != "r1");
        assert_eq!(idx.matched("r1", &three), 0);
    }
}
