//! One encoding's tables: what they hold, how they are built from a
//! vocabulary, and their one-file form (the blob).
//!
//! This file is compiled twice. `build.rs` includes it to build the tables of
//! every embedded encoding at compile time and write each as a blob; the
//! library includes it to read an embedded blob in place. So the running
//! gateway neither builds tables nor copies them: they are read-only pages of
//! the binary, shared by every process that runs it and resident only once
//! touched.
//!
//! # The blob
//! Eight bytes of magic, then four `u64`s (token count `n`, token bytes,
//! trie cells, merge slots), then the sections below in this order, each
//! starting 8-aligned, all numbers in the target's byte order:
//! `starts` (`n + 1` × u32), `next_prefix` (`n` × u32), `split` (`n` ×
//! [u32; 2]), `cells` ([u32; 3] each), `merges` (u64 each), the token bytes.

use bytemuck::Pod;

/// "No token" (and "no cell") in the `u32` tables.
pub(crate) const NONE: u32 = u32::MAX;

const MAGIC: &[u8; 8] = b"ai4fbpe1";
const HEADER: usize = MAGIC.len() + 4 * 8;

/// A merge-table entry packs `left`, `right` and the merged rank in 21 bits
/// each; `EMPTY` (all ones) is no entry, since no rank is all ones.
const RANK_BITS: u32 = 21;
const RANK_MASK: u64 = (1 << RANK_BITS) - 1;
const EMPTY: u64 = u64::MAX;
/// Ranks run below this (o200k_base has 199,998).
pub(crate) const MAX_TOKENS: usize = (1 << RANK_BITS) - 1;

/// Fields of a trie cell.
const BASE: usize = 0;
const CHECK: usize = 1;
const TOKEN: usize = 2;
const FREE: [u32; 3] = [NONE, NONE, NONE];

/// Why a vocabulary or a blob could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the vocabulary file is truncated or malformed")]
    Malformed,
    #[error("token {0} is empty")]
    EmptyToken(u32),
    #[error("token {0} repeats an earlier token")]
    Duplicate(u32),
    #[error("byte {0:#04x} is not a token")]
    MissingByte(u8),
    #[error("{0} tokens is more than the tables can rank")]
    TooManyTokens(usize),
    #[error("the tables blob is damaged: {0}")]
    BadBlob(&'static str),
}

/// One encoding's tables, borrowed from a blob (or from a [`Builder`]).
#[derive(Clone, Copy)]
pub struct Tables<'t> {
    /// Every token's bytes, concatenated in rank order.
    bytes: &'t [u8],
    /// Token `r` is `bytes[starts[r]..starts[r + 1]]`.
    starts: &'t [u32],
    /// A byte trie of every token as a double array: the child of the node in
    /// cell `s` along byte `c` is cell `t = cells[s][BASE] + c`, if
    /// `cells[t][CHECK] == s`; `cells[t][TOKEN]` is the token the node spells.
    /// One array access per byte, with no search among siblings.
    cells: &'t [[u32; 3]],
    /// The longest token that is a proper prefix of token `r`, or `NONE`.
    next_prefix: &'t [u32],
    /// The two tokens whose merge made token `r` (`[r, r]` for the tokens no
    /// merge made: single bytes).
    split: &'t [[u32; 2]],
    /// The token that merging a pair makes: open addressing with linear
    /// probing, at most half full, home slot by Fibonacci hashing.
    merges: &'t [u64],
    /// 64 − log2(merge slots).
    shift: u32,
}

impl<'t> Tables<'t> {
    /// Reads a blob in place. Checks the header and every section's size and
    /// alignment, so every read stays in bounds; the tables' contents are
    /// trusted to be what `build.rs` wrote, since they are compiled into the
    /// binary (the tests rebuild the embedded tables and compare).
    pub fn from_blob(blob: &'t [u8]) -> Result<Tables<'t>, TableError> {
        if blob.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(TableError::BadBlob("not a tables blob"));
        }
        let mut counts = [0usize; 4];
        for (i, count) in counts.iter_mut().enumerate() {
            let at = MAGIC.len() + 8 * i;
            let word = blob
                .get(at..at + 8)
                .and_then(|w| <[u8; 8]>::try_from(w).ok())
                .ok_or(TableError::BadBlob("truncated header"))?;
            *count = usize::try_from(u64::from_ne_bytes(word))
                .map_err(|_| TableError::BadBlob("count out of range"))?;
        }
        let [n, bytes_len, cells_len, slots] = counts;
        if n > MAX_TOKENS {
            return Err(TableError::TooManyTokens(n));
        }
        if !slots.is_power_of_two() || slots < 2 {
            return Err(TableError::BadBlob("merge slots are not a power of two"));
        }
        let mut at = HEADER;
        let tables = Tables {
            starts: section(blob, &mut at, n + 1)?,
            next_prefix: section(blob, &mut at, n)?,
            split: section(blob, &mut at, n)?,
            cells: section(blob, &mut at, cells_len)?,
            merges: section(blob, &mut at, slots)?,
            bytes: section(blob, &mut at, bytes_len)?,
            shift: 64 - slots.trailing_zeros(),
        };
        if at != blob.len() {
            return Err(TableError::BadBlob("trailing bytes"));
        }
        if tables.starts.last().map(|&end| end as usize) != Some(bytes_len) {
            return Err(TableError::BadBlob(
                "token offsets do not end with the bytes",
            ));
        }
        Ok(tables)
    }

    /// Number of ordinary tokens (ranks `0..num_tokens()`).
    pub fn num_tokens(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// The bytes of token `rank` (empty for a rank out of range).
    pub fn token(&self, rank: u32) -> &'t [u8] {
        let i = rank as usize;
        match (self.starts.get(i), self.starts.get(i + 1)) {
            (Some(&start), Some(&end)) => self.bytes.get(start as usize..end as usize),
            _ => None,
        }
        .unwrap_or(&[])
    }

    pub(crate) fn token_len(&self, rank: u32) -> usize {
        self.token(rank).len()
    }

    /// The rank of the token whose bytes are exactly `bytes`, if there is one.
    pub fn rank_of(&self, bytes: &[u8]) -> Option<u32> {
        self.longest_prefix(bytes)
            .filter(|&rank| self.token_len(rank) == bytes.len())
    }

    /// The longest token that is a proper prefix of token `rank`.
    pub(crate) fn shorter(&self, rank: u32) -> Option<u32> {
        self.next_prefix
            .get(rank as usize)
            .copied()
            .filter(|&r| r != NONE)
    }

    pub(crate) fn split_of(&self, rank: u32) -> [u32; 2] {
        self.split
            .get(rank as usize)
            .copied()
            .unwrap_or([rank, rank])
    }

    /// The token that merging `left` and `right` makes, if BPE has that merge.
    pub(crate) fn merged(&self, left: u32, right: u32) -> Option<u32> {
        let key = (u64::from(left) << RANK_BITS) | u64::from(right);
        for slot in probe(self.merges.len(), left, right, self.shift) {
            let entry = *self.merges.get(slot)?;
            if entry == EMPTY {
                return None;
            }
            if entry >> RANK_BITS == key {
                return Some((entry & RANK_MASK) as u32);
            }
        }
        None
    }

    /// Whether BPE, run on the bytes of `left` followed by those of `right`,
    /// yields exactly the two tokens `[left, right]`. It does unless some
    /// merge across their boundary comes before the merges that complete
    /// them: undo the two tokens' merges latest first, and at each step look
    /// for a merge of the two pieces now facing each other that ranks before
    /// the merge just undone.
    pub(crate) fn is_valid_pair(&self, mut left: u32, mut right: u32) -> bool {
        let mut limit = NONE;
        loop {
            if self
                .merged(left, right)
                .is_some_and(|merged| merged < limit)
            {
                return false;
            }
            if left > right {
                limit = left;
                left = self.split_of(left)[1];
                if left == limit {
                    limit = right + 1;
                    right = self.split_of(right)[0];
                    if right + 1 == limit {
                        return true;
                    }
                }
            } else {
                limit = right + 1;
                right = self.split_of(right)[0];
                if right + 1 == limit {
                    limit = left;
                    left = self.split_of(left)[1];
                    if left == limit {
                        return true;
                    }
                }
            }
        }
    }

    fn child(&self, cell: usize, byte: u8) -> Option<usize> {
        let base = self.cells.get(cell)?[BASE];
        if base == NONE {
            return None;
        }
        let at = (base as usize).checked_add(usize::from(byte))?;
        (self.cells.get(at)?[CHECK] as usize == cell).then_some(at)
    }

    /// The longest token that is a prefix of `text`.
    pub fn longest_prefix(&self, text: &[u8]) -> Option<u32> {
        let mut cell = 0;
        let mut best = None;
        for &byte in text {
            let Some(child) = self.child(cell, byte) else {
                break;
            };
            cell = child;
            match self.cells.get(cell) {
                Some(c) if c[TOKEN] != NONE => best = Some(c[TOKEN]),
                _ => {}
            }
        }
        best
    }

    /// Recovers BPE's merge for token `rank` from the ranks alone: the merge
    /// of its longest prefix token `a` and the rest `b` such that both came
    /// before it and BPE would have produced exactly `[a, b]` from their
    /// bytes. Ranks are merge order, so building in rank order only ever
    /// consults merges already recovered.
    fn merge_that_made(&self, rank: u32) -> Option<[u32; 2]> {
        let token = self.token(rank);
        let mut candidate = self.shorter(rank);
        while let Some(left) = candidate {
            let rest = token.get(self.token_len(left)..).unwrap_or(&[]);
            if let Some(right) = self.rank_of(rest) {
                if left < rank && right < rank && self.is_valid_pair(left, right) {
                    return Some([left, right]);
                }
            }
            candidate = self.shorter(left);
        }
        None
    }

    /// Cells in use (trie nodes), for tests.
    #[cfg(test)]
    pub(crate) fn nodes(&self) -> usize {
        1 + self.cells.iter().filter(|c| c[CHECK] != NONE).count()
    }
}

/// The slots of a `slots`-long merge table that a pair's probe visits: its
/// home slot by Fibonacci hashing, then the next ones, wrapping, each once (so
/// that even a damaged, full table ends the probe).
fn probe(slots: usize, left: u32, right: u32, shift: u32) -> impl Iterator<Item = usize> {
    let key = (u64::from(left) << 32) | u64::from(right);
    let home = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize;
    let mask = slots.wrapping_sub(1);
    (0..slots).map(move |i| home.wrapping_add(i) & mask)
}

/// The next `count` `T`s of the blob at `*at`, moving `*at` past them to the
/// next 8-byte boundary.
fn section<'t, T: Pod>(
    blob: &'t [u8],
    at: &mut usize,
    count: usize,
) -> Result<&'t [T], TableError> {
    let len = count
        .checked_mul(std::mem::size_of::<T>())
        .ok_or(TableError::BadBlob("section size overflows"))?;
    let end = at
        .checked_add(len)
        .ok_or(TableError::BadBlob("section size overflows"))?;
    let bytes = blob.get(*at..end).ok_or(TableError::BadBlob("truncated"))?;
    *at = end.next_multiple_of(8);
    bytemuck::try_cast_slice(bytes).map_err(|_| TableError::BadBlob("misaligned"))
}

/// The tables built from a vocabulary: `n` (u32 LE), `n` token lengths (u8),
/// then the tokens' bytes, in rank order.
pub struct Builder<'v> {
    bytes: &'v [u8],
    starts: Vec<u32>,
    cells: Vec<[u32; 3]>,
    next_prefix: Vec<u32>,
    split: Vec<[u32; 2]>,
    merges: Vec<u64>,
    shift: u32,
}

impl<'v> Builder<'v> {
    pub fn from_vocab(file: &'v [u8]) -> Result<Builder<'v>, TableError> {
        let (head, rest) = file.split_first_chunk::<4>().ok_or(TableError::Malformed)?;
        let n = u32::from_le_bytes(*head);
        let n_usize = usize::try_from(n).map_err(|_| TableError::Malformed)?;
        if n_usize > MAX_TOKENS {
            return Err(TableError::TooManyTokens(n_usize));
        }
        let (lens, bytes) = rest
            .split_at_checked(n_usize)
            .ok_or(TableError::Malformed)?;
        let mut starts = Vec::with_capacity(n_usize + 1);
        let mut offset = 0u32;
        starts.push(0);
        for (rank, &len) in (0u32..).zip(lens) {
            if len == 0 {
                return Err(TableError::EmptyToken(rank));
            }
            offset = offset
                .checked_add(u32::from(len))
                .ok_or(TableError::Malformed)?;
            starts.push(offset);
        }
        if usize::try_from(offset).ok() != Some(bytes.len()) {
            return Err(TableError::Malformed);
        }
        let mut b = Builder {
            bytes,
            starts,
            cells: Vec::new(),
            next_prefix: Vec::new(),
            split: Vec::new(),
            merges: Vec::new(),
            shift: 63,
        };
        b.cells = build_trie(&b.view())?;
        for byte in 0..=u8::MAX {
            if b.view().rank_of(&[byte]).is_none() {
                return Err(TableError::MissingByte(byte));
            }
        }
        let view = b.view();
        b.next_prefix = (0..n)
            .map(|rank| {
                let token = view.token(rank);
                let shorter = token.get(..token.len().saturating_sub(1)).unwrap_or(&[]);
                view.longest_prefix(shorter).unwrap_or(NONE)
            })
            .collect();
        b.build_merges(n);
        Ok(b)
    }

    pub fn view(&self) -> Tables<'_> {
        Tables {
            bytes: self.bytes,
            starts: &self.starts,
            cells: &self.cells,
            next_prefix: &self.next_prefix,
            split: &self.split,
            merges: &self.merges,
            shift: self.shift,
        }
    }

    fn build_merges(&mut self, n: u32) {
        let slots = (2 * n as usize).next_power_of_two().max(2);
        self.merges = vec![EMPTY; slots];
        self.shift = 64 - slots.trailing_zeros();
        self.split = Vec::with_capacity(n as usize);
        for rank in 0..n {
            let pair = self.view().merge_that_made(rank);
            if let Some([left, right]) = pair {
                self.insert_merge(left, right, rank);
            }
            self.split.push(pair.unwrap_or([rank, rank]));
        }
    }

    fn insert_merge(&mut self, left: u32, right: u32, merged: u32) {
        let entry = (u64::from(left) << (2 * RANK_BITS))
            | (u64::from(right) << RANK_BITS)
            | u64::from(merged);
        for slot in probe(self.merges.len(), left, right, self.shift) {
            if let Some(cell) = self.merges.get_mut(slot).filter(|cell| **cell == EMPTY) {
                *cell = entry;
                return;
            }
        }
    }

    /// The blob of these tables, numbers in the given byte order.
    pub fn blob(&self, big_endian: bool) -> Vec<u8> {
        let mut out = Blob {
            bytes: MAGIC.to_vec(),
            swap: big_endian != cfg!(target_endian = "big"),
        };
        let counts = [
            self.starts.len() - 1,
            self.bytes.len(),
            self.cells.len(),
            self.merges.len(),
        ]
        .map(|count| count as u64);
        out.put(&counts, 8);
        out.put(&self.starts, 4);
        out.put(&self.next_prefix, 4);
        out.put(&self.split, 4);
        out.put(&self.cells, 4);
        out.put(&self.merges, 8);
        out.put(self.bytes, 1);
        out.bytes
    }
}

/// A blob being written: each section starts 8-aligned.
struct Blob {
    bytes: Vec<u8>,
    /// Whether the target's byte order is not this machine's.
    swap: bool,
}

impl Blob {
    /// Appends `values`, made of numbers `word` bytes wide, in the target's
    /// byte order, then pads to 8 bytes.
    fn put<T: Pod>(&mut self, values: &[T], word: usize) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytemuck::cast_slice(values));
        if let (true, Some(new)) = (self.swap, self.bytes.get_mut(start..)) {
            new.chunks_exact_mut(word).for_each(<[u8]>::reverse);
        }
        self.bytes.resize(self.bytes.len().next_multiple_of(8), 0);
    }
}

/// The trie in breadth-first layout, the step before packing: node `v`'s
/// children are the nodes `first_child[v]..first_child[v + 1]`, sorted by the
/// byte on their edge.
struct Levels {
    /// Per node `[first_child, token]`, plus a sentinel closing the last range.
    nodes: Vec<[u32; 2]>,
    /// The byte on the edge into each node (the root's is unused).
    label: Vec<u8>,
}

impl Levels {
    /// Builds the trie level by level over the ranks sorted by their bytes:
    /// the tokens below a node are a contiguous run of that order, and its
    /// children split the run by the next byte. A token equal to the node's
    /// prefix sorts first in the run.
    fn build(bpe: &Tables<'_>) -> Result<Levels, TableError> {
        let mut order: Vec<u32> = (0..bpe.num_tokens() as u32).collect();
        order.sort_unstable_by(|&a, &b| bpe.token(a).cmp(bpe.token(b)));
        let mut trie = Levels {
            nodes: vec![[0, NONE]],
            label: vec![0],
        };
        let mut level = vec![(0, order.len())];
        let mut first_node = 0;
        let mut depth = 0;
        while !level.is_empty() {
            let mut next_level = Vec::new();
            for (node, &(mut lo, hi)) in (first_node..).zip(&level) {
                let mut entry = [trie.label.len() as u32, NONE];
                let spells_prefix = |i: usize| {
                    order
                        .get(i)
                        .filter(|&&rank| i < hi && bpe.token(rank).len() == depth)
                        .copied()
                };
                if let Some(rank) = spells_prefix(lo) {
                    entry[1] = rank;
                    lo += 1;
                    if let Some(again) = spells_prefix(lo) {
                        return Err(TableError::Duplicate(again.max(rank)));
                    }
                }
                if let Some(slot) = trie.nodes.get_mut(node) {
                    *slot = entry;
                }
                while lo < hi {
                    let byte_at = |i: usize| {
                        order
                            .get(i)
                            .and_then(|&rank| bpe.token(rank).get(depth).copied())
                    };
                    let Some(byte) = byte_at(lo) else { break };
                    let mut end = lo + 1;
                    while end < hi && byte_at(end) == Some(byte) {
                        end += 1;
                    }
                    trie.label.push(byte);
                    trie.nodes.push([0, NONE]);
                    next_level.push((lo, end));
                    lo = end;
                }
            }
            first_node += level.len();
            level = next_level;
            depth += 1;
        }
        trie.nodes.push([trie.label.len() as u32, NONE]);
        Ok(trie)
    }

    fn children(&self, node: usize) -> std::ops::Range<usize> {
        let lo = self.nodes.get(node).map_or(0, |n| n[0] as usize);
        let hi = self.nodes.get(node + 1).map_or(lo, |n| n[0] as usize);
        lo..hi
    }
}

/// Wide nodes (many children) need a run of free cells that the densely
/// packed front rarely has; they search from their own cursor, which only
/// moves forward, so that packing stays linear.
const WIDE: usize = 8;

/// Packs the trie of `bpe`'s tokens into double-array cells.
fn build_trie(bpe: &Tables<'_>) -> Result<Vec<[u32; 3]>, TableError> {
    let levels = Levels::build(bpe)?;
    let n = levels.label.len();
    let mut cells = vec![FREE; 1024];
    let mut used = vec![false; 1024];
    let mut cell_of = vec![NONE; n];
    if let (Some(root), Some(used), Some(cell), Some(first)) = (
        cells.first_mut(),
        used.first_mut(),
        cell_of.first_mut(),
        levels.nodes.first(),
    ) {
        root[TOKEN] = first[1];
        *used = true;
        *cell = 0;
    }
    let mut narrow_from = 1;
    let mut wide_from = 1;
    for node in 0..n {
        let children = levels.children(node);
        let Some(labels) = levels.label.get(children.clone()) else {
            continue;
        };
        let Some(&first) = labels.first() else {
            continue;
        };
        let first = usize::from(first);
        let wide = labels.len() > WIDE;
        let mut pos = if wide { wide_from } else { narrow_from }.max(first + 1);
        let base = loop {
            if pos + 256 > used.len() {
                used.resize(used.len() * 2, false);
                cells.resize(used.len(), FREE);
            }
            let base = pos - first;
            let fits = labels
                .iter()
                .all(|&c| used.get(base + usize::from(c)) == Some(&false));
            if fits {
                break base;
            }
            pos += 1;
        };
        if wide {
            wide_from = pos + 1;
        }
        let parent = cell_of.get(node).copied().unwrap_or(NONE);
        if let Some(cell) = cells.get_mut(parent as usize) {
            cell[BASE] = base as u32;
        }
        for (child, &c) in children.zip(labels) {
            let at = base + usize::from(c);
            if let (Some(cell), Some(slot)) = (cells.get_mut(at), used.get_mut(at)) {
                *slot = true;
                *cell = [NONE, parent, levels.nodes.get(child).map_or(NONE, |n| n[1])];
            }
            if let Some(slot) = cell_of.get_mut(child) {
                *slot = at as u32;
            }
        }
        while used.get(narrow_from) == Some(&true) {
            narrow_from += 1;
        }
    }
    let last_used = used.iter().rposition(|&u| u).unwrap_or(0);
    cells.truncate(last_used + 1);
    Ok(cells)
}
