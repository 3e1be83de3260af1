//! A compact, exact byte-pair encoder for OpenAI's tiktoken encodings: the
//! vocabulary tables of one encoding and the count of tokens in one
//! pre-tokenized piece. Pre-tokenization (the encoding's regex) is the
//! caller's: the gateway's `tokens::count` module.
//!
//! Counts are tiktoken's (the tests below, and the gateway's
//! `tests/tokenizer_diff.rs`). The algorithm is the backtracking encoder of
//! GitHub's `bpe` crate (van Antwerpen and Neubeck, "So many tokens, so little
//! time"), which finds tiktoken's tokenization without its merge loop: take
//! the longest token that is a prefix of the rest of the piece; if BPE would
//! not have kept it next to the previous token, try the next shorter prefix
//! token; if none fits, step back. What differs is the representation. The
//! `bpe` crate keeps three double-array Aho-Corasick automata per encoding
//! (its o200k_base file alone is 32 MB, and loading it put ~80 MB in the
//! gateway's resident memory); counting needs only a longest-prefix search,
//! which one byte trie answers. Packed as a double array it is one array
//! access per byte (o200k_base: 421,661 nodes, 5 MB), and walking it also
//! tells whether a piece is a single token, the common case. With the merge
//! tables, o200k_base takes ~13 MB, built from the vocabulary at load.
//!
//! The vocabularies are extracted from tiktoken-rs by `build.rs` and read in
//! place ([`O200K_BASE`], [`CL100K_BASE`]): token bytes are never copied.
//!
//! A crate of its own so that it is optimized in debug builds too (see the
//! workspace's `Cargo.toml`): building the tables takes ~0.2 s optimized and
//! ten times that without, once per process, and every test process starts
//! gateways.

/// The `o200k_base` vocabulary (gpt-4o and later), for [`Bpe::from_vocab`].
pub static O200K_BASE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.vocab"));
/// The `cl100k_base` vocabulary (gpt-4, gpt-3.5-turbo), for [`Bpe::from_vocab`].
pub static CL100K_BASE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.vocab"));

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// "No token" in the `u32` tables.
const NONE: u32 = u32::MAX;

/// Why an embedded vocabulary could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("the vocabulary file is truncated or malformed")]
    Malformed,
    #[error("token {0} is empty")]
    EmptyToken(u32),
    #[error("token {0} repeats an earlier token")]
    Duplicate(u32),
    #[error("byte {0:#04x} is not a token")]
    MissingByte(u8),
}

/// One encoding's tables.
pub struct Bpe {
    /// Every token's bytes, concatenated in rank order (the embedded file).
    bytes: &'static [u8],
    /// Token `r` is `bytes[starts[r]..starts[r + 1]]`.
    starts: Vec<u32>,
    trie: Trie,
    /// The longest token that is a proper prefix of token `r`, or `NONE`.
    next_prefix: Vec<u32>,
    /// The two tokens whose merge made token `r` (`[r, r]` for the tokens no
    /// merge made: single bytes).
    split: Vec<[u32; 2]>,
    /// The token that merging a pair makes, keyed `left << 32 | right`.
    merges: HashMap<u64, u32, BuildHasherDefault<FxHasher>>,
}

impl Bpe {
    /// Loads the `build.rs` format: `n` (u32 LE), `n` token lengths (u8),
    /// then the tokens' bytes.
    pub fn from_vocab(file: &'static [u8]) -> Result<Bpe, VocabError> {
        let (head, rest) = file.split_first_chunk::<4>().ok_or(VocabError::Malformed)?;
        let n = u32::from_le_bytes(*head);
        let n_usize = usize::try_from(n).map_err(|_| VocabError::Malformed)?;
        let (lens, bytes) = rest
            .split_at_checked(n_usize)
            .ok_or(VocabError::Malformed)?;
        let mut starts = Vec::with_capacity(n_usize + 1);
        let mut offset = 0u32;
        starts.push(0);
        for (rank, &len) in (0u32..).zip(lens) {
            if len == 0 {
                return Err(VocabError::EmptyToken(rank));
            }
            offset = offset
                .checked_add(u32::from(len))
                .ok_or(VocabError::Malformed)?;
            starts.push(offset);
        }
        if usize::try_from(offset).ok() != Some(bytes.len()) {
            return Err(VocabError::Malformed);
        }
        let mut bpe = Bpe {
            bytes,
            starts,
            trie: Trie::default(),
            next_prefix: Vec::new(),
            split: Vec::new(),
            merges: HashMap::default(),
        };
        bpe.trie = Trie::build(&bpe)?;
        for byte in 0..=u8::MAX {
            if bpe.rank_of(&[byte]).is_none() {
                return Err(VocabError::MissingByte(byte));
            }
        }
        bpe.next_prefix = (0..n)
            .map(|rank| {
                let token = bpe.token(rank);
                let shorter = token.get(..token.len().saturating_sub(1)).unwrap_or(&[]);
                bpe.trie.longest_prefix(shorter).unwrap_or(NONE)
            })
            .collect();
        bpe.build_merges(n);
        Ok(bpe)
    }

    /// Heap bytes held by the tables (the vocabulary itself is the embedded
    /// file, not counted).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        // hashbrown: a power-of-two bucket count at most 7/8 full, one control
        // byte per bucket.
        let merge_buckets = (self.merges.capacity() * 8 / 7).next_power_of_two();
        self.starts.capacity() * size_of::<u32>()
            + self.trie.cells.capacity() * size_of::<Cell>()
            + self.next_prefix.capacity() * size_of::<u32>()
            + self.split.capacity() * size_of::<[u32; 2]>()
            + merge_buckets * (size_of::<(u64, u32)>() + 1)
    }

    /// Number of ordinary tokens (ranks `0..num_tokens()`).
    pub fn num_tokens(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// The bytes of token `rank` (empty for a rank out of range).
    pub fn token(&self, rank: u32) -> &'static [u8] {
        let i = rank as usize;
        match (self.starts.get(i), self.starts.get(i + 1)) {
            (Some(&start), Some(&end)) => self.bytes.get(start as usize..end as usize),
            _ => None,
        }
        .unwrap_or(&[])
    }

    fn token_len(&self, rank: u32) -> usize {
        self.token(rank).len()
    }

    /// The rank of the token whose bytes are exactly `bytes`, if there is one.
    pub fn rank_of(&self, bytes: &[u8]) -> Option<u32> {
        self.trie
            .longest_prefix(bytes)
            .filter(|&rank| self.token_len(rank) == bytes.len())
    }

    /// Recovers BPE's merge order from the ranks alone: token `r` was made by
    /// the merge of its longest prefix token `a` and the rest `b` such that
    /// both came before it and BPE would have produced exactly `[a, b]` from
    /// their bytes. Ranks are merge order, so building in rank order only ever
    /// consults merges already recovered.
    fn build_merges(&mut self, n: u32) {
        self.split = Vec::with_capacity(n as usize);
        self.merges = HashMap::with_capacity_and_hasher(n as usize, Default::default());
        for rank in 0..n {
            let token = self.token(rank);
            let mut candidate = self.shorter(rank);
            let mut pair = [rank, rank];
            while let Some(left) = candidate {
                let rest = token.get(self.token_len(left)..).unwrap_or(&[]);
                if let Some(right) = self.rank_of(rest) {
                    if left < rank && right < rank && self.is_valid_pair(left, right) {
                        pair = [left, right];
                        self.merges.insert(pair_key(left, right), rank);
                        break;
                    }
                }
                candidate = self.shorter(left);
            }
            self.split.push(pair);
        }
    }

    /// The longest token that is a proper prefix of token `rank`.
    fn shorter(&self, rank: u32) -> Option<u32> {
        self.next_prefix
            .get(rank as usize)
            .copied()
            .filter(|&r| r != NONE)
    }

    fn split_of(&self, rank: u32) -> [u32; 2] {
        self.split
            .get(rank as usize)
            .copied()
            .unwrap_or([rank, rank])
    }

    /// Whether BPE, run on the bytes of `left` followed by those of `right`,
    /// yields exactly the two tokens `[left, right]`. It does unless some
    /// merge across their boundary comes before the merges that complete
    /// them: undo the two tokens' merges latest first, and at each step look
    /// for a merge of the two pieces now facing each other that ranks before
    /// the merge just undone.
    fn is_valid_pair(&self, mut left: u32, mut right: u32) -> bool {
        let mut limit = NONE;
        loop {
            if let Some(&merged) = self.merges.get(&pair_key(left, right)) {
                if merged < limit {
                    return false;
                }
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

    /// The number of tokens BPE encodes `piece` into. Linear in `piece` in
    /// practice; allocation-free after a thread's first call (the scratch
    /// buffers are kept per thread, bounded).
    pub fn count(&self, piece: &[u8]) -> usize {
        if piece.is_empty() {
            return 0;
        }
        // The trie walk answers "is the piece one token?" (most pieces of
        // prose and code are) and, when not, gives the encoder its first step.
        let first = self.trie.longest_prefix(piece);
        if first.is_some_and(|token| self.token_len(token) == piece.len()) {
            return 1;
        }
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => {
                let n = self.backtrack(piece, first, &mut scratch);
                scratch.trim();
                n
            }
            Err(_) => self.backtrack(piece, first, &mut Scratch::default()),
        })
    }

    /// Counts `piece` given the longest token it starts with, `first`.
    fn backtrack(&self, piece: &[u8], first: Option<u32>, scratch: &mut Scratch) -> usize {
        scratch.reset(piece.len());
        let tokens = &mut scratch.tokens;
        let mut pos = 0;
        let mut next = first;
        while let Some(mut token) = next {
            let last = tokens.last().copied();
            loop {
                let end = pos + self.token_len(token);
                if scratch.reachable.get(end)
                    && last.is_none_or(|last| self.is_valid_pair(last, token))
                {
                    tokens.push(token);
                    pos = end;
                    next = self.trie.longest_prefix(piece.get(end..).unwrap_or(&[]));
                    break;
                }
                match self.shorter(token) {
                    Some(shorter) => token = shorter,
                    None => {
                        // No token starting here can be followed through to
                        // the end: `pos` is a dead end; retry the previous
                        // token shorter.
                        scratch.reachable.clear(pos);
                        tokens.pop();
                        pos -= last.map_or(0, |last| self.token_len(last));
                        next = last;
                        break;
                    }
                }
            }
        }
        tokens.len()
    }
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The backtracking encoder's working memory, reused across calls.
#[derive(Default)]
struct Scratch {
    tokens: Vec<u32>,
    reachable: BitSet,
}

impl Scratch {
    /// Past this many entries a buffer is freed after use, so that one huge
    /// piece does not pin its memory to the thread for good.
    const KEEP: usize = 1 << 14;

    fn reset(&mut self, len: usize) {
        self.tokens.clear();
        self.reachable.fill(len + 1);
    }

    fn trim(&mut self) {
        if self.tokens.capacity() > Self::KEEP {
            self.tokens = Vec::new();
        }
        if self.reachable.words.capacity() > Self::KEEP {
            self.reachable.words = Vec::new();
        }
    }
}

/// Positions of a piece not yet known to be dead ends.
#[derive(Default)]
struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    fn fill(&mut self, bits: usize) {
        self.words.clear();
        self.words.resize(bits.div_ceil(64), u64::MAX);
    }

    fn get(&self, bit: usize) -> bool {
        self.words
            .get(bit / 64)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }

    fn clear(&mut self, bit: usize) {
        if let Some(word) = self.words.get_mut(bit / 64) {
            *word &= !(1 << (bit % 64));
        }
    }
}

/// A byte trie of every token as a double array: the child of the node in
/// cell `s` along byte `c` is cell `t = cells[s].base + c`, if
/// `cells[t].check == s`. One step down is one array access, with no search
/// among siblings; the cell holds the token the node spells, so the whole
/// walk touches one cache line per byte. Twelve bytes a cell, and the packing
/// leaves few cells empty.
#[derive(Default)]
struct Trie {
    cells: Vec<Cell>,
}

#[derive(Clone, Copy)]
struct Cell {
    /// Where this node's children start (`NONE`: it has none).
    base: u32,
    /// The parent's cell (`NONE`: the cell is free, or the root).
    check: u32,
    /// The token this node spells, or `NONE`.
    token: u32,
}

impl Cell {
    const FREE: Cell = Cell {
        base: NONE,
        check: NONE,
        token: NONE,
    };
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
    fn build(bpe: &Bpe) -> Result<Levels, VocabError> {
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
                        return Err(VocabError::Duplicate(again.max(rank)));
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

impl Trie {
    fn build(bpe: &Bpe) -> Result<Trie, VocabError> {
        let levels = Levels::build(bpe)?;
        let n = levels.label.len();
        let mut cells = vec![Cell::FREE; 1024];
        let mut used = vec![false; 1024];
        let mut cell_of = vec![NONE; n];
        if let (Some(root), Some(used), Some(cell), Some(first)) = (
            cells.first_mut(),
            used.first_mut(),
            cell_of.first_mut(),
            levels.nodes.first(),
        ) {
            root.token = first[1];
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
                    cells.resize(used.len(), Cell::FREE);
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
                cell.base = base as u32;
            }
            for (child, &c) in children.zip(labels) {
                let at = base + usize::from(c);
                if let (Some(cell), Some(slot)) = (cells.get_mut(at), used.get_mut(at)) {
                    *slot = true;
                    *cell = Cell {
                        base: NONE,
                        check: parent,
                        token: levels.nodes.get(child).map_or(NONE, |n| n[1]),
                    };
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
        cells.shrink_to_fit();
        Ok(Trie { cells })
    }

    fn child(&self, cell: usize, byte: u8) -> Option<usize> {
        let base = self.cells.get(cell)?.base;
        if base == NONE {
            return None;
        }
        let at = base as usize + usize::from(byte);
        (self.cells.get(at)?.check as usize == cell).then_some(at)
    }

    /// The longest token that is a prefix of `text`.
    fn longest_prefix(&self, text: &[u8]) -> Option<u32> {
        let mut cell = 0;
        let mut best = None;
        for &byte in text {
            let Some(child) = self.child(cell, byte) else {
                break;
            };
            cell = child;
            match self.cells.get(cell) {
                Some(c) if c.token != NONE => best = Some(c.token),
                _ => {}
            }
        }
        best
    }

    /// Nodes in the trie (cells in use).
    #[cfg(test)]
    fn nodes(&self) -> usize {
        1 + self.cells.iter().filter(|c| c.check != NONE).count()
    }
}

/// FxHash (rustc's hasher) for the merge table's `u64` pair keys: a few
/// cycles per key, ample for a fixed set of keys that no client chooses.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A toy vocabulary in `build.rs`'s format: every byte, then `extra` in
    /// rank (merge) order.
    fn vocab(extra: &[&str]) -> &'static [u8] {
        let mut tokens: Vec<Vec<u8>> = (0..=u8::MAX).map(|b| vec![b]).collect();
        tokens.extend(extra.iter().map(|t| t.as_bytes().to_vec()));
        let mut file = (tokens.len() as u32).to_le_bytes().to_vec();
        file.extend(tokens.iter().map(|t| t.len() as u8));
        file.extend(tokens.concat());
        Box::leak(file.into_boxed_slice())
    }

    /// tiktoken's merge loop, the definition BPE counts are checked against.
    fn reference_count(bpe: &Bpe, piece: &[u8]) -> usize {
        let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| {
                    let joined = [parts[i].as_slice(), parts[i + 1].as_slice()].concat();
                    bpe.rank_of(&joined).map(|rank| (rank, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let right = parts.remove(i + 1);
            parts[i].extend(right);
        }
        parts.len()
    }

    #[test]
    fn toy_vocabulary_counts_like_the_merge_loop() {
        // "ab" ranks before "bc", so "abc" is [ab, c]; "bcd" before "abcd"
        // cannot form since "ab" took the "b" first.
        let bpe = Bpe::from_vocab(vocab(&[
            "ab", "bc", "abc", "cd", "bcd", "abcd", "aa", "aaa",
        ]))
        .unwrap();
        for piece in [
            "abc", "abcd", "bcd", "aaaa", "aaaaa", "abab", "cdab", "xbcdx", "aabcd", "abcabc",
        ] {
            assert_eq!(
                bpe.count(piece.as_bytes()),
                reference_count(&bpe, piece.as_bytes()),
                "{piece}"
            );
        }
    }

    #[test]
    fn exhaustive_short_pieces_over_a_small_alphabet() {
        let bpe = Bpe::from_vocab(vocab(&[
            "ab", "ba", "aa", "bb", "aba", "bab", "abab", "aab", "bba", "aaa", "baab", "abba",
        ]))
        .unwrap();
        for len in 1..=10u32 {
            for bits in 0..(1u32 << len) {
                let piece: Vec<u8> = (0..len)
                    .map(|i| if bits >> i & 1 == 1 { b'a' } else { b'b' })
                    .collect();
                assert_eq!(
                    bpe.count(&piece),
                    reference_count(&bpe, &piece),
                    "{}",
                    String::from_utf8_lossy(&piece)
                );
            }
        }
    }

    #[test]
    fn trie_finds_the_longest_prefix_token() {
        let bpe = Bpe::from_vocab(vocab(&["ab", "abc", "abcde"])).unwrap();
        let rank = |t: &str| bpe.rank_of(t.as_bytes()).unwrap();
        assert_eq!(bpe.trie.longest_prefix(b"abcdx"), Some(rank("abc")));
        assert_eq!(bpe.trie.longest_prefix(b"abcdef"), Some(rank("abcde")));
        assert_eq!(bpe.trie.longest_prefix(b"b"), Some(rank("b")));
        assert_eq!(bpe.trie.longest_prefix(b""), None);
        assert_eq!(bpe.next_prefix[rank("abcde") as usize], rank("abc"));
        // Root, 256 bytes, then "ab" / "abc" / "abcd" / "abcde" nodes.
        assert_eq!(bpe.trie.nodes(), 1 + 256 + 4);
    }

    /// The real vocabularies against tiktoken's own merge loop
    /// (`byte_pair_split`), on pieces no pre-tokenizer would produce: every
    /// token with its successor glued on, and runs of several tokens. This
    /// is where a wrong merge table would show, since each boundary asks
    /// whether BPE keeps two tokens apart.
    #[test]
    fn real_vocabularies_match_tiktokens_merge_loop() {
        for file in [O200K_BASE, CL100K_BASE] {
            let bpe = Bpe::from_vocab(file).unwrap();
            let n = bpe.num_tokens() as u32;
            // The point of this crate: a few MB, not bpe-openai's ~80.
            assert!(bpe.heap_bytes() < 16 << 20, "{} bytes", bpe.heap_bytes());
            eprintln!("{n} tokens: {} heap bytes", bpe.heap_bytes());
            let ranks: rustc_hash::FxHashMap<Vec<u8>, tiktoken_rs::Rank> =
                (0..n).map(|r| (bpe.token(r).to_vec(), r)).collect();
            for rank in 0..n {
                assert_eq!(bpe.count(bpe.token(rank)), 1);
            }
            // A fixed LCG, so a failure reproduces.
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let mut next = |bound: u32| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                ((seed >> 33) % u64::from(bound)) as u32
            };
            for i in 0..40_000 {
                let parts = 2 + (i % 4);
                let mut piece = Vec::new();
                let mut rank = next(n);
                for _ in 0..parts {
                    piece.extend_from_slice(bpe.token(rank));
                    rank = if next(2) == 0 {
                        (rank + 1) % n
                    } else {
                        next(n)
                    };
                }
                let expected = tiktoken_rs::byte_pair_split(&piece, &ranks).len();
                assert_eq!(bpe.count(&piece), expected, "{piece:?}");
            }
        }
    }

    #[test]
    fn malformed_vocabularies_are_errors() {
        assert!(matches!(
            Bpe::from_vocab(&[1, 0]),
            Err(VocabError::Malformed)
        ));
        let mut missing = vocab(&[]).to_vec();
        missing[0] = 255; // 255 tokens claimed: lengths and bytes disagree
        assert!(Bpe::from_vocab(Box::leak(missing.into_boxed_slice())).is_err());
        assert!(matches!(
            Bpe::from_vocab(vocab(&["ab", "ab"])),
            Err(VocabError::Duplicate(_))
        ));
    }
}
