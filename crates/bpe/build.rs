//! Builds the tables of the encodings the gateway counts with, from
//! tiktoken-rs's vocabularies (OpenAI's own files, the reference our counts
//! are tested against), and writes each as a blob in `OUT_DIR` that
//! `src/lib.rs` embeds with `include_bytes!` and reads in place.
//!
//! Done at build time so that the running gateway neither parses base64
//! vocabularies nor builds tables: loading an encoding costs nothing, and its
//! tables are read-only pages of the binary rather than heap.

use std::path::PathBuf;

#[allow(dead_code)]
#[path = "src/tables.rs"]
mod tables;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/tables.rs");
    // The blob holds numbers in the target's byte order, read in place.
    let big_endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() == Ok("big");
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        fail("OUT_DIR is not set");
    };
    let out_dir = PathBuf::from(out_dir);
    let encodings = [
        ("o200k_base", tiktoken_rs::o200k_base()),
        ("cl100k_base", tiktoken_rs::cl100k_base()),
    ];
    for (name, bpe) in encodings {
        let bpe = bpe.unwrap_or_else(|e| fail(&format!("tiktoken-rs {name}: {e}")));
        let file = vocabulary(name, &bpe);
        let tables =
            tables::Builder::from_vocab(&file).unwrap_or_else(|e| fail(&format!("{name}: {e}")));
        let path = out_dir.join(format!("{name}.bpe"));
        std::fs::write(&path, tables.blob(big_endian))
            .unwrap_or_else(|e| fail(&format!("writing {}: {e}", path.display())));
    }
}

/// The vocabulary in [`tables::Builder::from_vocab`]'s format: `n` (u32 LE),
/// `n` token lengths (u8), then the tokens' bytes, in rank order. Ordinary
/// tokens have the ranks 0..n with no gap; special tokens sit above them and
/// are not part of ordinary encoding, so they are left out.
fn vocabulary(name: &str, bpe: &tiktoken_rs::CoreBPE) -> Vec<u8> {
    let mut lens = Vec::new();
    let mut bytes = Vec::new();
    let specials: Vec<u32> = bpe
        .special_tokens()
        .iter()
        .filter_map(|s| bpe.encode_with_special_tokens(s).first().copied())
        .collect();
    for rank in 0u32.. {
        if specials.contains(&rank) {
            break;
        }
        let Ok(token) = bpe.decode_bytes(&[rank]) else {
            break;
        };
        let Ok(len) = u8::try_from(token.len()) else {
            fail(&format!("{name}: token {rank} is longer than 255 bytes"));
        };
        if len == 0 {
            fail(&format!("{name}: token {rank} is empty"));
        }
        lens.push(len);
        bytes.extend_from_slice(&token);
    }
    let n = u32::try_from(lens.len()).unwrap_or_else(|_| fail("too many tokens"));
    if n < 256 {
        fail(&format!("{name}: only {n} tokens; every byte must be one"));
    }
    // A rank above the contiguous range that still decodes would be an
    // ordinary token this format cannot hold.
    for rank in n + 1..n + 64 {
        if !specials.contains(&rank) && bpe.decode_bytes(&[rank]).is_ok() {
            fail(&format!("{name}: ordinary ranks are not contiguous at {n}"));
        }
    }
    let mut file = Vec::with_capacity(4 + lens.len() + bytes.len());
    file.extend_from_slice(&n.to_le_bytes());
    file.extend_from_slice(&lens);
    file.extend_from_slice(&bytes);
    file
}

fn fail(message: &str) -> ! {
    eprintln!("build.rs: {message}");
    std::process::exit(1)
}
