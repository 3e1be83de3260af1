//! The `ai4free` binary: everything lives in the library; this only hands over to the CLI.

// A profile under load showed ~9% of the gateway's CPU in glibc malloc; jemalloc
// (as Pingora's own examples use) handles the proxy's many short-lived buffers better.
// Its options (a background purge thread, 1 s decay) are built in: .cargo/config.toml.
// `--no-default-features` builds with the system allocator, for heap profilers.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    ai4free::cli::main()
}
