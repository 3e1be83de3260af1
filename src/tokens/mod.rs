//! Token accounting: SSE parsing, provider usage extraction and exact token
//! counting. Pure, synchronous code with no IO, safe to call from Pingora's
//! body filters.
//!
//! - [`count`]: tiktoken encodings and OpenAI's prompt/response counting rules.
//! - [`sse`]: incremental `text/event-stream` scanner and byte-exact event splitter.
//! - [`usage`]: `usage` extraction and per-stream accounting.

pub mod count;
pub mod sse;
pub mod usage;
mod usage_scan;

pub use count::{
    count_chat_completion_response, count_chat_prompt, count_completion_prompt,
    count_embedding_input, count_text_completion_response, CountError, Tokenizer,
};
pub use sse::{SseEvent, SseEventSplitter, SsePiece, SseScanner};
pub use usage::{usage_from_response_body, StreamAccounting, Usage};
