//! The `ai4free` binary: everything lives in the library; this only hands over to the CLI.

// A profile under load showed ~9% of the gateway's CPU in glibc malloc; jemalloc
// (as Pingora's own examples use) handles the proxy's many short-lived buffers better.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    ai4free::cli::main()
}
