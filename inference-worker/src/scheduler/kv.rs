//! The KV block allocator, with automatic prefix caching as vLLM does it: which
//! fixed-size blocks of the backend's pool each sequence holds, and which full blocks
//! are worth keeping after their sequence ends.
//!
//! Blocks are handed out one at a time as sequences grow, so memory follows the tokens
//! actually held. A full block is identified by a hash chained over its tokens and every
//! token before it (seeded with the model), so two sequences whose prompts begin with
//! the same tokens can hold the same blocks. A block is shared by reference count; when
//! the last holder releases a cached block it stays in the pool, idle, until the pool
//! needs the space, the least recently released first. Every lookup checks the block's
//! tokens and parent too, so a hash collision costs a recomputation, never a wrong
//! answer.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// What a cached block holds: the hash of the blocks before it and its own tokens.
#[derive(Debug)]
struct Content {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

/// A pool of `total` blocks of `block_size` tokens.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    /// Blocks that hold nothing worth keeping.
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Each cached block's content.
    content: Vec<Option<Content>>,
    /// Cached blocks by hash.
    cached: HashMap<u64, u32>,
    /// Cached blocks no sequence holds, by when the last holder let go (oldest first).
    idle: BTreeMap<u64, u32>,
    /// Each idle block's key in `idle`.
    idle_since: Vec<u64>,
    clock: u64,
    caching: bool,
}

/// The hash of a block of `tokens` that follows blocks hashing to `parent`.
pub fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The root of every chain: a hash of the model, so no block is reused across models.
pub fn root(model: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut h);
    h.finish()
}

impl BlockAllocator {
    /// All `total` blocks free; full blocks are kept for reuse when `caching`.
    pub fn new(block_size: usize, total: usize, caching: bool) -> BlockAllocator {
        // Hand out low ids first (reverse so `pop` yields 0, 1, ...).
        BlockAllocator {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            content: (0..total).map(|_| None).collect(),
            cached: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; total],
            clock: 0,
            caching,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks no sequence holds (idle cached blocks included: they are given up on
    /// demand).
    pub fn free(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks whose content is cached, held or idle.
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// A block for a sequence to write: a free one, else the idle cached block released
    /// longest ago, forgotten.
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                let c = self.content[b as usize]
                    .take()
                    .expect("idle blocks are cached");
                self.cached.remove(&c.hash);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Grows `table` to cover `tokens` positions; `false` (and no change) when the pool
    /// cannot.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free() {
            return false;
        }
        for _ in 0..need {
            table.push(self.take().expect("checked above"));
        }
        true
    }

    /// Returns a sequence's blocks: a block no one else holds becomes free, or idle
    /// when its content is cached.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..) {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if self.content[b as usize].is_some() {
                self.clock += 1;
                self.idle.insert(self.clock, b);
                self.idle_since[b as usize] = self.clock;
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached blocks that hold the leading `blocks` of a sequence (`blocks` are the
    /// chained hashes and the tokens of each), up to the first miss. Takes nothing.
    pub fn lookup<'a>(
        &self,
        root: u64,
        blocks: impl IntoIterator<Item = (u64, &'a [u32])>,
    ) -> Vec<u32> {
        let mut found = Vec::new();
        if !self.caching {
            return found;
        }
        let mut parent = root;
        for (hash, tokens) in blocks {
            let Some(&b) = self.cached.get(&hash) else {
                break;
            };
            let c = self.content[b as usize]
                .as_ref()
                .expect("cached blocks have content");
            if c.parent != parent || *c.tokens != *tokens {
                break;
            }
            found.push(b);
            parent = hash;
        }
        found
    }

    /// Of `blocks`, how many are idle (and so counted as free until taken).
    pub fn idle_among(&self, blocks: &[u32]) -> usize {
        blocks
            .iter()
            .filter(|&&b| self.refs[b as usize] == 0)
            .count()
    }

    /// Appends `blocks` (found by [`BlockAllocator::lookup`]) to `table`, shared.
    pub fn share(&mut self, blocks: &[u32], table: &mut Vec<u32>) {
        for &b in blocks {
            if self.refs[b as usize] == 0 {
                self.idle.remove(&self.idle_since[b as usize]);
            }
            self.refs[b as usize] += 1;
            table.push(b);
        }
    }

    /// Records that `block` now holds `tokens` (a full block) after blocks hashing to
    /// `parent`, so later sequences may share it. The first block with a given content
    /// is kept; a copy computed meanwhile stays private and is freed with its sequence.
    pub fn register(&mut self, block: u32, parent: u64, tokens: &[u32]) -> u64 {
        let hash = chain(parent, tokens);
        if self.caching
            && self.content[block as usize].is_none()
            && !self.cached.contains_key(&hash)
        {
            self.cached.insert(hash, block);
            self.content[block as usize] = Some(Content {
                hash,
                parent,
                tokens: tokens.into(),
            });
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_whole_blocks_refuses_past_the_budget_and_recycles() {
        let mut a = BlockAllocator::new(16, 4, false);
        let mut s1 = Vec::new();
        assert!(a.grow(&mut s1, 17));
        assert_eq!(s1, vec![0, 1]);
        assert!(a.grow(&mut s1, 32), "still within two blocks");
        assert_eq!(a.free(), 2);
        let mut s2 = Vec::new();
        assert!(!a.grow(&mut s2, 48), "needs 3, only 2 free");
        assert!(s2.is_empty() && a.free() == 2);
        a.release(&mut s1);
        assert!(s1.is_empty() && a.free() == 4);
        assert!(a.grow(&mut s2, 64));
        let mut all = s2.clone();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3], "no block handed out twice");
    }

    /// A sequence of `tokens` registered block by block; returns its table and hashes.
    fn fill(a: &mut BlockAllocator, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let mut table = Vec::new();
        assert!(a.grow(&mut table, tokens.len()));
        let mut parent = root("m");
        let mut hashes = Vec::new();
        for (i, block) in tokens.chunks_exact(a.block_size()).enumerate() {
            parent = a.register(table[i], parent, block);
            hashes.push(parent);
        }
        (table, hashes)
    }

    fn blocks(tokens: &[u32], hashes: &[u64]) -> Vec<(u64, Vec<u32>)> {
        hashes
            .iter()
            .zip(tokens.chunks_exact(4))
            .map(|(h, t)| (*h, t.to_vec()))
            .collect()
    }

    #[test]
    fn full_blocks_are_shared_kept_idle_and_evicted_least_recently_used() {
        let mut a = BlockAllocator::new(4, 6, true);
        let prompt: Vec<u32> = (0..8).collect();
        let (mut t1, hashes) = fill(&mut a, &prompt);
        assert_eq!(a.cached(), 2);
        // A second sequence with the same prefix shares both blocks.
        let keys = blocks(&prompt, &hashes);
        let found = a.lookup(root("m"), keys.iter().map(|(h, t)| (*h, t.as_slice())));
        assert_eq!(found, t1);
        let mut t2 = Vec::new();
        a.share(&found, &mut t2);
        assert_eq!(a.free(), 4, "shared, not copied");
        // Both let go: the blocks stay cached, idle, and count as free.
        a.release(&mut t1);
        a.release(&mut t2);
        assert_eq!((a.free(), a.cached()), (6, 2));
        // Another model, or other tokens, finds nothing.
        assert!(a
            .lookup(root("other"), keys.iter().map(|(h, t)| (*h, t.as_slice())))
            .is_empty());
        let wrong = [(hashes[0], vec![9, 9, 9, 9])];
        assert!(
            a.lookup(root("m"), wrong.iter().map(|(h, t)| (*h, t.as_slice())))
                .is_empty(),
            "a hash whose tokens differ is a miss"
        );
        // Five new blocks: the four free ones, then the idle block released first.
        let mut t3 = Vec::new();
        assert!(a.grow(&mut t3, 20));
        assert_eq!(a.cached(), 1);
        let left = a.lookup(root("m"), keys.iter().map(|(h, t)| (*h, t.as_slice())));
        assert!(
            left.is_empty(),
            "the chain's first block was evicted: {left:?}"
        );
        assert!(!a.grow(&mut t3, 28), "one block left, two needed");
    }

    #[test]
    fn without_caching_nothing_is_kept() {
        let mut a = BlockAllocator::new(4, 2, false);
        let prompt: Vec<u32> = (0..8).collect();
        let (mut t, hashes) = fill(&mut a, &prompt);
        a.release(&mut t);
        let keys = blocks(&prompt, &hashes);
        assert!(a
            .lookup(root("m"), keys.iter().map(|(h, t)| (*h, t.as_slice())))
            .is_empty());
        assert_eq!((a.free(), a.cached()), (2, 0));
    }
}
