//! The `ai4free` binary: everything lives in the library; this only hands over to the CLI.

fn main() -> std::process::ExitCode {
    ai4free::cli::main()
}
