//! The KV block allocator: which fixed-size blocks of the backend's pool each sequence
//! owns. Blocks are handed out one at a time as sequences grow, so memory follows the
//! tokens actually held, not the maximum a request might reach.

/// Free-list over `n` blocks of `block_size` tokens.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    /// All `total` blocks free.
    pub fn new(block_size: usize, total: usize) -> BlockAllocator {
        // Hand out low ids first (reverse so `pop` yields 0, 1, ...).
        BlockAllocator {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
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

    /// Blocks not owned by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` to cover `tokens` positions; `false` (and no change) when the pool
    /// cannot.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            table.push(self.free.pop().expect("checked above"));
        }
        true
    }

    /// Returns a sequence's blocks to the pool.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_whole_blocks_refuses_past_the_budget_and_recycles() {
        let mut a = BlockAllocator::new(16, 4);
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
}
