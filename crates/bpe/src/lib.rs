//! A compact, exact byte-pair encoder for OpenAI's tiktoken encodings: the
//! count of tokens in one pre-tokenized piece, over one encoding's tables
//! ([`tables`]). Pre-tokenization (the encoding's regex) is the caller's: the
//! gateway's `tokens::count` module.
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
//! tells whether a piece is a single token, the common case.
//!
//! `build.rs` builds the tables of each encoding from tiktoken-rs's
//! vocabulary at compile time; the binary embeds them ([`O200K_BASE`]: 13.9
//! MB, [`CL100K_BASE`]: 6.9 MB) and [`Bpe::from_blob`] reads them in place, so
//! loading an encoding costs nothing and its tables are read-only pages of the
//! executable: shared between processes, resident only once touched, never
//! heap.

pub mod tables;

pub use tables::{TableError, Tables};

use std::cell::RefCell;

/// An encoding's tables as the gateway holds them: borrowed from the binary.
pub type Bpe = Tables<'static>;

/// `include_bytes!` guarantees no alignment; the tables are read in place as
/// `u32`s and `u64`s, so the blobs are embedded in an 8-aligned wrapper.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static O200K: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.bpe")));
static CL100K: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/cl100k_base.bpe"
)));

/// The `o200k_base` tables (gpt-4o and later), for [`Bpe::from_blob`].
pub static O200K_BASE: &[u8] = &O200K.0;
/// The `cl100k_base` tables (gpt-4, gpt-3.5-turbo), for [`Bpe::from_blob`].
pub static CL100K_BASE: &[u8] = &CL100K.0;

impl Tables<'_> {
    /// The number of tokens BPE encodes `piece` into. Linear in `piece` in
    /// practice; allocation-free after a thread's first call (the scratch
    /// buffers are kept per thread, bounded).
    pub fn count(&self, piece: &[u8]) -> usize {
        if piece.is_empty() {
            return 0;
        }
        // The trie walk answers "is the piece one token?" (most pieces of
        // prose and code are) and, when not, gives the encoder its first step.
        let first = self.longest_prefix(piece);
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
                    next = self.longest_prefix(piece.get(end..).unwrap_or(&[]));
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

    /// The tables of a vocabulary the way the gateway gets them: built,
    /// written as a blob, and read back in place from 8-aligned memory.
    fn load(file: &[u8]) -> Result<Bpe, TableError> {
        Ok(Bpe::from_blob(aligned(&tables::Builder::from_vocab(file)?.blob(BIG))).unwrap())
    }

    const BIG: bool = cfg!(target_endian = "big");

    fn aligned(blob: &[u8]) -> &'static [u8] {
        let words: &'static mut [u64] = vec![0u64; blob.len().div_ceil(8)].leak();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(words);
        bytes[..blob.len()].copy_from_slice(blob);
        &bytes[..blob.len()]
    }

    /// The vocabulary file of some tables: their tokens in rank order.
    fn vocab_of(bpe: &Bpe) -> Vec<u8> {
        let n = bpe.num_tokens() as u32;
        let mut file = n.to_le_bytes().to_vec();
        file.extend((0..n).map(|r| bpe.token(r).len() as u8));
        file.extend((0..n).flat_map(|r| bpe.token(r).iter().copied()));
        file
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
        let bpe = load(vocab(&[
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
        let bpe = load(vocab(&[
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
        let bpe = load(vocab(&["ab", "abc", "abcde"])).unwrap();
        let rank = |t: &str| bpe.rank_of(t.as_bytes()).unwrap();
        assert_eq!(bpe.longest_prefix(b"abcdx"), Some(rank("abc")));
        assert_eq!(bpe.longest_prefix(b"abcdef"), Some(rank("abcde")));
        assert_eq!(bpe.longest_prefix(b"b"), Some(rank("b")));
        assert_eq!(bpe.longest_prefix(b""), None);
        assert_eq!(bpe.shorter(rank("abcde")), Some(rank("abc")));
        assert_eq!(bpe.shorter(rank("b")), None);
        // Root, 256 bytes, then "ab" / "abc" / "abcd" / "abcde" nodes.
        assert_eq!(bpe.nodes(), 1 + 256 + 4);
    }

    /// The real vocabularies against tiktoken's own merge loop
    /// (`byte_pair_split`), on pieces no pre-tokenizer would produce: every
    /// token with its successor glued on, and runs of several tokens. This
    /// is where a wrong merge table would show, since each boundary asks
    /// whether BPE keeps two tokens apart.
    #[test]
    fn real_vocabularies_match_tiktokens_merge_loop() {
        for blob in [O200K_BASE, CL100K_BASE] {
            let bpe = Bpe::from_blob(blob).unwrap();
            let n = bpe.num_tokens() as u32;
            // The point of this crate: a few MB, not bpe-openai's ~80.
            assert!(blob.len() < 16 << 20, "{} bytes", blob.len());
            eprintln!("{n} tokens: {} bytes of tables", blob.len());
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
        let from = |file: &[u8]| tables::Builder::from_vocab(file).map(|_| ());
        assert!(matches!(from(&[1, 0]), Err(TableError::Malformed)));
        let mut missing = vocab(&[]).to_vec();
        missing[0] = 255; // 255 tokens claimed: lengths and bytes disagree
        assert!(from(&missing).is_err());
        assert!(matches!(
            from(vocab(&["ab", "ab"])),
            Err(TableError::Duplicate(_))
        ));
        let mut no_z = vocab(&[]).to_vec();
        no_z[4 + 256 + usize::from(b'z')] = b'y';
        assert!(matches!(from(&no_z), Err(TableError::Duplicate(_))));
        let mut empty = (257u32).to_le_bytes().to_vec();
        empty.extend(std::iter::repeat_n(1, 256));
        empty.push(0);
        empty.extend(0..=u8::MAX);
        assert!(matches!(from(&empty), Err(TableError::EmptyToken(256))));
    }

    /// A blob reads back as the tables it was written from.
    #[test]
    fn blobs_read_back_as_the_tables_they_were_written_from() {
        let file = vocab(&["ab", "bc", "abc", "cd", "bcd", "abcd", "aa", "aaa"]);
        let built = tables::Builder::from_vocab(file).unwrap();
        let view = built.view();
        let read = Bpe::from_blob(aligned(&built.blob(BIG))).unwrap();
        assert_eq!(read.num_tokens(), view.num_tokens());
        for rank in 0..view.num_tokens() as u32 {
            assert_eq!(read.token(rank), view.token(rank));
            assert_eq!(read.split_of(rank), view.split_of(rank));
            assert_eq!(read.shorter(rank), view.shorter(rank));
        }
        for piece in ["abcd", "aaaaabc", "xbcdab"] {
            assert_eq!(read.count(piece.as_bytes()), view.count(piece.as_bytes()));
        }
        // The other byte order is a different blob of the same size.
        let other = built.blob(!BIG);
        assert_eq!(other.len(), built.blob(BIG).len());
        assert_ne!(other, built.blob(BIG));
    }

    #[test]
    fn damaged_blobs_are_errors_not_panics() {
        let good = tables::Builder::from_vocab(vocab(&["ab", "abc"]))
            .unwrap()
            .blob(BIG);
        assert!(Bpe::from_blob(aligned(&good)).is_ok());
        let bad = |blob: &[u8]| Bpe::from_blob(aligned(blob)).err().map(|e| e.to_string());
        assert!(bad(&good[..good.len() - 8]).is_some(), "truncated");
        assert!(
            bad(&[good.as_slice(), &[0; 8]].concat()).is_some(),
            "trailing"
        );
        assert!(bad(&good[..20]).is_some(), "truncated header");
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(bad(&magic).unwrap().contains("not a tables blob"));
        let word = |v: u64| {
            if BIG {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        for (field, value) in [(0, 300), (1, 7), (2, 1 << 40), (3, 3), (3, 0), (0, 1 << 30)] {
            let mut b = good.clone();
            b[8 + 8 * field..16 + 8 * field].copy_from_slice(&word(value));
            assert!(bad(&b).is_some(), "count {field} = {value}");
        }
        // Misaligned memory is refused, not read unaligned.
        let words = vec![0u64; good.len() / 8 + 1].leak();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(words);
        bytes[1..=good.len()].copy_from_slice(&good);
        assert!(matches!(
            Bpe::from_blob(&bytes[1..=good.len()]),
            Err(TableError::BadBlob("misaligned"))
        ));
    }

    /// Every merge the embedded tables record can be found again, and
    /// rebuilding them from their own vocabulary gives the same bytes: the
    /// build and the reading agree.
    #[test]
    fn embedded_tables_are_whole() {
        for blob in [O200K_BASE, CL100K_BASE] {
            let bpe = Bpe::from_blob(blob).unwrap();
            for rank in 0..bpe.num_tokens() as u32 {
                let [left, right] = bpe.split_of(rank);
                if [left, right] != [rank, rank] {
                    assert_eq!(bpe.merged(left, right), Some(rank));
                    assert_eq!(
                        bpe.token(rank),
                        [bpe.token(left), bpe.token(right)].concat()
                    );
                } else {
                    assert_eq!(bpe.token(rank).len(), 1, "{rank} has no merge");
                }
            }
            let rebuilt = tables::Builder::from_vocab(&vocab_of(&bpe))
                .unwrap()
                .blob(BIG);
            assert!(rebuilt == blob, "rebuilt tables differ");
        }
    }
}
