//! The offline quick start's upstream: runs the in-process mock provider
//! ([`ai4free::mock`]) as a standalone OpenAI-compatible server until Ctrl-C.
//!
//! ```text
//! cargo run --example mock_provider -- [--listen 127.0.0.1:9090] [--usage when-asked|always|never]
//!                                      [--words N] [--chunk-delay-ms N]
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use ai4free::mock::{self, MockConfig, UsageMode};
use clap::{Parser, ValueEnum};

/// Command line of the mock provider.
#[derive(Debug, Parser)]
#[command(
    about = "OpenAI-compatible mock provider for ai4free's quick start, tests and benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// When streamed responses end with a usage chunk.
    #[arg(long, value_enum, default_value_t = Usage::WhenAsked)]
    usage: Usage,
    /// Completion length in pieces when the request does not choose one.
    #[arg(long, default_value_t = mock::DEFAULT_WORDS)]
    words: usize,
    /// Pause between stream events, to look like a model typing.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
}

/// `--usage` values; mirrors [`UsageMode`], which stays free of clap.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Usage {
    WhenAsked,
    Always,
    Never,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = MockConfig {
        usage_in_stream: match args.usage {
            Usage::WhenAsked => UsageMode::WhenAsked,
            Usage::Always => UsageMode::Always,
            Usage::Never => UsageMode::Never,
        },
        // A long-running server would otherwise grow its recording without bound.
        record: false,
        default_words: args.words,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        ..MockConfig::default()
    };
    let handle = match mock::start(args.listen, cfg).await {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("mock provider: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!("mock provider listening on http://{}/v1", handle.addr);
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("mock provider: cannot wait for Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    handle.shutdown();
    ExitCode::SUCCESS
}
